"""`goldstream serve`: the query API and the live dashboard a QC lead reads (issue #13).

A QC lead asks "who is slipping, which label is bad, what is waiting for review, is the pipeline
keeping up". The answers live in Redis (standing, counters, alert states) and on the topics
(escalations, alerts, reviews); this server reads both and answers in JSON, with an OpenAPI
document at `/openapi.json` and a dashboard page at `/` that polls the same API.

Everything here is read-only and derived: the figures are those `goldstream report` prints, the
standing is `scoring.policy.proficiency` over the worker's counters, and the escalation queue is
the tail of the `escalations` topic less what the `reviews` topic already judged. Topic tails are
followed by one background consumer per topic (no consumer group, bounded per project), so a
request never waits for Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis

from goldstream import schemas as s
from goldstream.commands import endpoints, report, topic_partitions, worker_report
from goldstream.scoring.counters import Counters
from goldstream.scoring.policy import proficiency
from goldstream.streams.settings import Settings
from goldstream.streams.state import (
    SCALE,
    SEP,
    AlertFlags,
    CriteriaStore,
    Keys,
    ProficiencyStore,
    RedisState,
    buckets_of,
    connect,
    level_of,
)
from goldstream.streams.topics import Topics

PAGE = Path(__file__).with_name("dashboard.html")
TAIL_KEEP = 2000  # messages kept per project and topic


# ----------------------------------------------------------------------------- figures (pure)


def trend(buckets: Mapping[int, tuple[int, int]], window_s: int) -> tuple[float | None, float | None]:
    """(mean of the latest window, its difference from the mean before it) of a worker's or a
    label's score buckets (count, scaled sum). Event time: the window ends at the latest bucket,
    so a replayed history reads the same."""
    if not buckets:
        return None, None
    end = max(buckets)
    recent = [(n, v) for start, (n, v) in buckets.items() if start > end - window_s]
    before = [(n, v) for start, (n, v) in buckets.items() if start <= end - window_s]

    def mean(rows: list[tuple[int, int]]) -> float | None:
        n = sum(r[0] for r in rows)
        return sum(r[1] for r in rows) / SCALE / n if n else None

    now, then = mean(recent), mean(before)
    return now, (None if now is None or then is None else now - then)


def top_confusions(confusions: Mapping[tuple[str, str], int], k: int = 3) -> list[dict[str, Any]]:
    """The worker's most frequent mistakes against known answers ('' truth: an extra object,
    '' given: a missed one)."""
    wrong = [(n, t, g) for (t, g), n in confusions.items() if t != g]
    return [
        {"truth": t or None, "given": g or None, "n": n} for n, t, g in sorted(wrong, key=lambda x: (-x[0], x[1]))[:k]
    ]


def label_trend(fields: Mapping[str, int], window_s: int) -> tuple[float | None, float | None]:
    """A label's F1 over the latest window and its difference from before, from its bucket hash
    ('<start>:tp' / 'fp' / 'fn')."""
    per: dict[int, list[int]] = {}
    for name, value in fields.items():
        start, _, part = name.partition(":")
        if part in ("tp", "fp", "fn"):
            per.setdefault(int(start), [0, 0, 0])[("tp", "fp", "fn").index(part)] += value
    if not per:
        return None, None
    end = max(per)

    def f1(starts: list[int]) -> float | None:
        tp, fp, fn = (sum(per[b][i] for b in starts) for i in range(3))
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None

    now = f1([b for b in per if b > end - window_s])
    then = f1([b for b in per if b <= end - window_s])
    return now, (None if now is None or then is None else now - then)


# ----------------------------------------------------------------------------- topic tails


@dataclass
class Tail:
    """The latest messages of one topic per project, followed from the end of the topic less
    `keep` per partition, so a restarted server shows the queue as it is, not from the beginning."""

    settings: Settings
    logical: str
    model: type[s.Message]
    keep: int = TAIL_KEEP
    by_project: dict[str, deque[s.Message]] = field(default_factory=dict)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    undecodable: int = 0

    def of(self, project_id: str) -> list[Any]:
        return list(self.by_project.get(project_id, ()))

    async def follow(self, stop: asyncio.Event) -> None:
        ep = endpoints(self.settings)
        name = Topics(self.settings.topic_prefix).name(self.logical)
        consumer = AIOKafkaConsumer(bootstrap_servers=ep.bootstrap_servers, **ep.kafka, enable_auto_commit=False)
        await consumer.start()
        try:
            while not (numbers := await topic_partitions(ep, name)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)  # the topic appears with the first worker
                if stop.is_set():
                    return
            parts = [TopicPartition(name, p) for p in numbers]
            consumer.assign(parts)
            begin, end = await consumer.beginning_offsets(parts), await consumer.end_offsets(parts)
            for tp in parts:
                consumer.seek(tp, max(begin[tp], end[tp] - self.keep))
            while not stop.is_set():
                got = await consumer.getmany(timeout_ms=500, max_records=1000)
                for records in got.values():
                    for r in records:
                        self._add(r.value)
                if not self.caught_up.is_set() and all([await consumer.position(tp) >= end[tp] for tp in parts]):
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def _add(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            message = s.decode(self.model, value)
        except s.SchemaError:
            self.undecodable += 1
            return
        project = getattr(message, "project_id", "")
        self.by_project.setdefault(project, deque(maxlen=self.keep)).append(message)


# ----------------------------------------------------------------------------- the server


@dataclass
class Api:
    """The queries, over one Redis client and the topic tails."""

    settings: Settings
    redis: Redis
    tails: dict[str, Tail]
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.key_prefix)
        self.state = RedisState(self.redis, self.keys)
        self.store = ProficiencyStore(self.state)
        self.criteria_store = CriteriaStore(self.redis, self.keys, ttl_s=5.0, state=self.state)

    async def criteria(self, project_id: str) -> s.ProjectCriteria:
        found = await self.criteria_store.get(project_id, time.monotonic())
        return found or s.ProjectCriteria(project_id=project_id)

    async def projects(self) -> list[str]:
        """Projects with scores (their workers hash) or criteria."""
        found = set()
        async for key in self.redis.scan_iter(match=f"{self.keys.prefix}:{{*}}:workers", count=1000):
            tag = key.decode().split(":", 1)[1].rsplit(":", 1)[0]
            if SEP not in tag:
                found.add(tag[1:-1])
        async for key in self.redis.scan_iter(match=self.keys.criteria("*"), count=1000):
            found.add(key.decode().rsplit(":", 1)[1])
        return sorted(found)

    async def leaderboard(self, project_id: str) -> list[dict[str, Any]]:
        """Every worker of the project: standing, recent trend, pace, top confusions; best first."""
        criteria = await self.criteria(project_id)
        workers = sorted(await self.store.workers(project_id))
        if not workers:
            return []
        views, totals = await self.store.views_and_totals({project_id: criteria}, [(project_id, w) for w in workers])
        model = views[project_id].model
        extra = await self.store.hashes(
            [self.keys.worker(project_id, w, suffix) for w in workers for suffix in ("buckets", "confusions")]
        )
        rows = []
        for k, (w, t) in enumerate(zip(workers, totals, strict=True)):
            standing = proficiency(t, criteria, level_of(model, t))
            recent, change = trend(buckets_of(extra[2 * k]), criteria.alerts.window_s)
            confusions = {tuple(name.split("\t", 1)): n for name, n in extra[2 * k + 1].items()}
            rows.append({
                "worker_id": w, "state": standing.state.value, "items": standing.items,
                "gold_items": standing.gold_items, "known_answers": standing.known, "consensus_rounds": standing.rounds,
                "mean_score": _r(standing.mean_score), "level": _r(standing.estimate),
                "lower_bound": _r(standing.lower_bound), "upper_bound": _r(standing.upper_bound),
                "recent_mean": _r(recent), "trend": _r(change),
                "time_on_task_s": round(t["tot_ms"] / 1000 / t["tot_n"], 2) if t.get("tot_n") else None,
                "top_confusions": top_confusions(confusions),  # type: ignore[arg-type]
            })  # fmt: skip
        return sorted(rows, key=lambda r: (r["lower_bound"] is None, -(r["lower_bound"] or 0.0), r["worker_id"]))

    async def history(self, project_id: str, worker_id: str) -> list[dict[str, Any]]:
        """The worker's scores by time bucket (event time): count, mean, pass rate."""
        (fields,) = await self.store.hashes([self.keys.worker(project_id, worker_id, "buckets")])
        passes = buckets_of(fields, "p")
        return [
            {"start": start, "n": n, "mean_score": _r(v / SCALE / n), "pass_rate": _r(passes[start][1] / n)}
            for start, (n, v) in sorted(buckets_of(fields).items()) if n
        ]  # fmt: skip

    async def labels(self, project_id: str) -> list[dict[str, Any]]:
        """Every label's precision, recall and F1 over the project's history and its recent F1 and
        trend; worst first."""
        criteria = await self.criteria(project_id)
        (fields,) = await self.store.hashes([self.keys.project(project_id)])
        figures = Counters.from_fields(fields).compute(criteria.empty_item_correct)
        names = sorted(figures.labels)
        buckets = await self.store.hashes([self.keys.project(project_id, f"label:{n}") for n in names])
        rows = []
        for name, b in zip(names, buckets, strict=True):
            m = figures.labels[name]
            recent, change = label_trend(b, criteria.alerts.window_s)
            rows.append({
                "label": name, "precision": _r(m.precision), "recall": _r(m.recall), "f1": _r(m.f1),
                "mean_similarity": _r(m.mean_similarity), "recent_f1": _r(recent), "trend": _r(change),
            })  # fmt: skip
        return sorted(rows, key=lambda r: (r["f1"] is None, r["f1"] or 0.0, r["label"]))

    async def alerts(self, project_id: str) -> list[dict[str, Any]]:
        """Alerts firing now (the flags the workers keep), each with its latest message's figures."""
        flags = await AlertFlags(self.redis, self.keys, self.state).current(project_id)
        latest: dict[str, s.QualityAlert] = {}
        for a in self.tails["alerts"].of(project_id):
            latest[f"{a.scope.value}:{a.scope_id}:{a.metric}"] = a
        out = []
        for name, state in sorted(flags.items()):
            if state == "resolved":
                continue
            scope, _, rest = name.partition(":")
            scope_id, _, metric = rest.rpartition(":")
            a = latest.get(name)
            out.append({
                "scope": scope, "scope_id": scope_id, "metric": metric, "state": state,
                "severity": a.severity if a else None, "value": a.value if a else None,
                "target": a.target if a else None, "window": a.window if a else None,
                "raised_at": a.raised_at.isoformat() if a else None, "detail": a.detail if a else None,
            })  # fmt: skip
        return out

    def escalations(
        self, project_id: str, order: str = "priority", reason: str | None = None, pending: bool = True, limit: int = 50
    ) -> dict[str, Any]:
        """The review queue from the escalations topic: one entry per annotation (its reasons
        united), less those a review already judged; by priority or newest first."""
        reviewed = {r.annotation_event_id for r in self.tails["reviews"].of(project_id)}
        queue: dict[str, dict[str, Any]] = {}
        for e in self.tails["escalations"].of(project_id):
            entry = queue.get(e.annotation.event_id)
            if entry is None:
                queue[e.annotation.event_id] = entry = {
                    "annotation_event_id": e.annotation.event_id, "item_id": e.item_id, "worker_id": e.worker_id,
                    "reasons": [], "priority": 0, "score": e.score, "risk": e.risk, "created_at": e.created_at,
                    "reviewed": e.annotation.event_id in reviewed, "detail": e.detail,
                }  # fmt: skip
            entry["reasons"] += [r.value for r in e.reasons if r.value not in entry["reasons"]]
            entry["priority"] = max(entry["priority"], e.priority)
            entry["created_at"] = min(entry["created_at"], e.created_at)
        rows = [
            r
            for r in queue.values()
            if (not pending or not r["reviewed"]) and (reason is None or reason in r["reasons"])
        ]
        key: Callable[[dict[str, Any]], Any] = (
            (lambda r: (-r["priority"], r["created_at"])) if order == "priority" else (lambda r: r["created_at"])
        )
        rows.sort(key=key, reverse=order == "newest")
        for r in rows:
            r["created_at"] = r["created_at"].isoformat()
        return {"total": len(rows), "reviewed": len(reviewed), "escalations": rows[:limit]}

    async def status(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "topics_caught_up": {k: t.caught_up.is_set() for k, t in self.tails.items()},
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def application(api: Api) -> web.Application:
    """The HTTP routes: the JSON API, its OpenAPI document, and the dashboard page."""

    def project(request: web.Request) -> str:
        return request.match_info["project"]

    async def projects(_: web.Request) -> web.Response:
        return web.json_response({"projects": await api.projects()})

    async def project_report(request: web.Request) -> web.Response:
        return web.json_response(await report(api.settings, project(request)))

    async def workers(request: web.Request) -> web.Response:
        return web.json_response({"project_id": project(request), "workers": await api.leaderboard(project(request))})

    async def worker(request: web.Request) -> web.Response:
        p, w = project(request), request.match_info["worker"]
        data = await worker_report(api.settings, p, w)
        return web.json_response({**data, "history": await api.history(p, w)})

    async def labels(request: web.Request) -> web.Response:
        return web.json_response({"project_id": project(request), "labels": await api.labels(project(request))})

    async def alerts(request: web.Request) -> web.Response:
        return web.json_response({"project_id": project(request), "alerts": await api.alerts(project(request))})

    async def escalations(request: web.Request) -> web.Response:
        q = request.query
        order = q.get("order", "priority")
        if order not in ("priority", "newest"):
            raise web.HTTPBadRequest(text=f'{{"error": "order must be priority or newest, not {order!r}"}}',
                                     content_type="application/json")  # fmt: skip
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"error": "limit must be an integer"}', content_type="application/json"
            ) from None
        pending = q.get("pending", "true").lower() not in ("0", "false", "no")
        data = api.escalations(project(request), order, q.get("reason"), pending, max(1, min(limit, 1000)))
        return web.json_response({"project_id": project(request), **data})

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await api.status())

    async def openapi_doc(_: web.Request) -> web.Response:
        return web.json_response(openapi())

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    app = web.Application()
    app.add_routes([
        web.get("/", page), web.get("/openapi.json", openapi_doc), web.get("/api/status", status),
        web.get("/api/projects", projects), web.get("/api/projects/{project}", project_report),
        web.get("/api/projects/{project}/workers", workers),
        web.get("/api/projects/{project}/workers/{worker}", worker),
        web.get("/api/projects/{project}/labels", labels), web.get("/api/projects/{project}/alerts", alerts),
        web.get("/api/projects/{project}/escalations", escalations),
    ])  # fmt: skip
    return app


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API (the message schemas from `goldstream.schemas`)."""

    def get(summary: str, params: list[str] = (), query: list[tuple[str, str]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        parameters += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}, "description": d}
                       for n, d in query]  # fmt: skip
        ok = {"200": {"description": "JSON", "content": {"application/json": {}}}}
        return {"get": {"summary": summary, "parameters": parameters, "responses": ok}}

    p = ["project"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "goldstream query API", "version": "1"},
        "paths": {
            "/api/status": get("the server: uptime, whether the topic tails caught up"),
            "/api/projects": get("projects with scores or criteria"),
            "/api/projects/{project}": get("the project's report: figures against targets, review figures", p),
            "/api/projects/{project}/workers": get(
                "the leaderboard: state, items, gold items, mean score, level and bounds, recent mean and trend, "
                "time on task, top confusions; best lower bound first", p),
            "/api/projects/{project}/workers/{worker}": get(
                "one worker: standing, pace, confusions, drift, and history by time bucket", [*p, "worker"]),
            "/api/projects/{project}/labels": get("labels: precision, recall, F1, recent F1 and trend; worst first", p),
            "/api/projects/{project}/alerts": get("alerts firing now, with their latest figures", p),
            "/api/projects/{project}/escalations": get(
                "the review queue from the escalations topic", p,
                [("order", "priority (default) or newest"), ("reason", "only this escalation reason"),
                 ("pending", "true (default): leave out reviewed annotations"), ("limit", "at most (50)")]),
        },
        "components": {"schemas": {m.__name__: m.model_json_schema() for m in (s.Escalation, s.QualityAlert)}},
    }  # fmt: skip


async def leaderboard_of(settings: Settings, project_id: str) -> list[dict[str, Any]]:
    """The leaderboard without a server (`goldstream workers`)."""
    redis = connect(settings.redis_url, **settings.redis())
    try:
        return await Api(settings, redis, {}).leaderboard(project_id)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def running(settings: Settings, host: str, port: int) -> AsyncIterator[str]:
    """The server with its topic tails, until the block ends; yields its address."""
    redis = connect(settings.redis_url, **settings.redis())
    tails = {
        "escalations": Tail(settings, "escalations", s.Escalation),
        "alerts": Tail(settings, "alerts", s.QualityAlert),
        "reviews": Tail(settings, "reviews", s.ReviewResult),
    }
    stop = asyncio.Event()
    followers = [asyncio.create_task(t.follow(stop)) for t in tails.values()]
    runner = web.AppRunner(application(Api(settings, redis, tails)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        stop.set()
        await asyncio.gather(*followers, return_exceptions=True)
        await runner.cleanup()
        await redis.aclose()


async def serve(settings: Settings, host: str, port: int) -> None:
    """`goldstream serve`: run until SIGTERM / SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, host, port) as url:
        print(f"goldstream serve on {url} (dashboard: {url}/, API: {url}/api/projects, {url}/openapi.json)", flush=True)
        await stop.wait()


__all__ = [
    "Api",
    "Tail",
    "application",
    "label_trend",
    "leaderboard_of",
    "openapi",
    "running",
    "serve",
    "top_confusions",
    "trend",
]
