"""`goldstream bridge`: labeling tools' webhooks in, goldstream messages on Kafka out (issue #12).

Label Studio posts every annotation event to `POST /label-studio/webhook`. It waits about a
second for the answer and never retries, so the bridge converts, publishes, waits for Kafka's
acknowledgement and answers at once; what it missed while down, `goldstream sync label-studio`
pulls over Label Studio's API (the same ids, so nothing is counted twice). Ids are derived from
the delivery: a redelivery publishes the same event id, an update (a new `updated_at`) a
resubmission. A delivery that cannot be converted is answered 4xx with what is wrong, and its raw
body goes to the dead-letter topic.

Label Studio authenticates only through custom headers it sends with each delivery: configure the
webhook with `X-Goldstream-Token: <token>` and give the bridge the same token
(`GOLDSTREAM_BRIDGE_TOKEN` or `--token-file`).

CVAT has no annotation-level webhook: every save of a job fires `update:job`, signed with
`X-Signature-256: sha256=<HMAC-SHA256 of the body with the webhook's secret>`. Once the job's state
is `completed` (its annotator is done), `POST /cvat/webhook` reads the job's annotations from
CVAT's API and publishes one annotation per frame, its id derived from the frame's content: the
same change delivered again (CVAT retries, and one save may fire several deliveries) is the same
event, a changed frame a resubmission.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from goldstream import schemas as s
from goldstream.commands import create_topics, endpoints
from goldstream.cvat import CvatProjects, Labels, Unsupported, frame_contents, job_annotations, submitted
from goldstream.label_studio import (
    BadDelivery,
    LabelStudioProjects,
    Published,
    delivery_project,
    label_studio_messages,
)
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics

TOKEN_HEADER = "X-Goldstream-Token"
SIGNATURE_HEADER = "X-Signature-256"
WEBHOOK_SOURCE = "label-studio-webhook"
CVAT_SOURCE = "cvat-webhook"
SYNC_SOURCE = "label-studio-sync"
PUBLISH_TIMEOUT_S = 10.0  # Label Studio gives up after about a second; other senders may wait longer


def dead_letter(body: bytes, reason: str, error: str, source: str = WEBHOOK_SOURCE) -> s.DeadLetter:
    """The raw body of a refused delivery, with why; its id depends on the body only, so a
    redelivery of the same bad body is one dead letter."""
    letter = s.DeadLetter.of(
        body, topic=source, partition=-1, offset=-1, reason=reason, error=error, stage="bridge",
        received_at=datetime.now(UTC),
    )  # fmt: skip
    return letter.model_copy(update={"event_id": s.derive_id("deadletter", source, hashlib.sha256(body).hexdigest())})


Send = Callable[[Sequence[Published]], Awaitable[None]]
CriteriaOf = Callable[[str], Awaitable[s.ProjectCriteria | None]]


async def _no_criteria(project_id: str) -> s.ProjectCriteria | None:
    return None


@dataclass(frozen=True)
class Cvat:
    """What the CVAT endpoint needs: the webhook's secret (None: unsigned deliveries accepted),
    a reader of a job from CVAT's API, and the project mapping."""

    secret: str | None
    fetch: Callable[[int], Awaitable[CvatJob]]
    projects: CvatProjects = field(default_factory=CvatProjects)


@dataclass(frozen=True)
class CvatJob:
    """A job as CVAT's REST API has it now: the job, its annotations, labels and frames."""

    job: dict[str, Any]
    annotations: dict[str, Any]
    labels: list[dict[str, Any]]
    meta: dict[str, Any]


def app(
    send: Send,
    projects: LabelStudioProjects,
    token: str | None,
    *,
    cvat: Cvat | None = None,
    criteria_of: CriteriaOf = _no_criteria,
) -> web.Application:
    """The bridge's HTTP application; `send` publishes and returns once Kafka acknowledged;
    `criteria_of` gives a project's criteria (its keypoint schemas lay out keypoints)."""

    async def label_studio(request: web.Request) -> web.Response:
        if token is not None and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return _error(401, f"missing or wrong {TOKEN_HEADER} header")
        body = await request.read()
        try:
            payload = _object(body)
            project = delivery_project(payload, projects)
            criteria = await criteria_of(project) if project else None
            messages, ignored = label_studio_messages(payload, projects, criteria)
        except BadDelivery as exc:
            return await _refuse(send, body, exc, 400 if exc.reason == "undecodable" else 422)
        if ignored is not None:
            return web.json_response({"published": [], "ignored": ignored})
        # Label Studio will not retry: say so, and how to catch up (the same ids, no double count)
        return await _publish(send, messages, "run `goldstream sync label-studio` once it is back")

    async def cvat_webhook(request: web.Request) -> web.Response:
        if cvat is None:
            return _error(404, "CVAT is not configured: start the bridge with --cvat-url")
        body = await request.read()
        if cvat.secret is not None:
            expected = "sha256=" + hmac.new(cvat.secret.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
                return _error(401, f"missing or wrong {SIGNATURE_HEADER} (HMAC-SHA256 of the body with the secret)")
        try:
            return await _cvat_delivery(send, cvat, criteria_of, _object(body))
        except BadDelivery as exc:
            return await _refuse(send, body, exc, 400 if exc.reason == "undecodable" else 422, CVAT_SOURCE)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    application = web.Application(client_max_size=s.DEFAULT_LIMITS.max_message_bytes)
    application.add_routes([
        web.post("/label-studio/webhook", label_studio),
        web.post("/cvat/webhook", cvat_webhook),
        web.get("/healthz", health),
    ])  # fmt: skip
    return application


def _object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadDelivery("undecodable", f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadDelivery("schema", "the body is JSON but not an object")
    return payload


async def _publish(send: Send, messages: Sequence[Published], catch_up: str, **extra: Any) -> web.Response:
    try:
        await asyncio.wait_for(send(messages), PUBLISH_TIMEOUT_S)
    except (KafkaError, TimeoutError) as exc:
        return _error(503, f"could not publish to Kafka ({type(exc).__name__}); {catch_up}", "unavailable")
    published = [{"topic": t, "event_id": m.event_id} for t, _, m in messages if t != "deadletter"]
    return web.json_response({"published": published, "ignored": None, **extra})


async def _cvat_delivery(send: Send, cvat: Cvat, criteria_of: CriteriaOf, payload: dict[str, Any]) -> web.Response:
    """`update:job` of a job its annotator completed: read the job's annotations from CVAT (the
    delivery does not carry them) and publish one annotation per frame; other events, and saves
    of a job still in progress, publish nothing."""
    event = payload.get("event")
    if event != "update:job":
        return web.json_response({"published": [], "ignored": f"event {event!r} carries no annotation to score"})
    job = payload.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("id"), int):
        raise BadDelivery("schema", "update:job without a job object with an integer id")
    if not submitted(job):
        return web.json_response({"published": [], "ignored": _not_done(job)})
    try:
        now = await asyncio.wait_for(cvat.fetch(job["id"]), PUBLISH_TIMEOUT_S)
    except (aiohttp.ClientError, TimeoutError, ToolError) as exc:  # CVAT retries a 5xx delivery
        return _error(503, f"could not read job {job['id']} from CVAT: {exc}", "unavailable")
    if not submitted(now.job):  # reopened since: its next completion publishes
        return web.json_response({"published": [], "ignored": _not_done(now.job)})
    project = cvat.projects(now.job)
    criteria = await criteria_of(project) or s.ProjectCriteria(project_id=project)
    messages, refusals = cvat_messages(now, project, criteria, payload.get("sender"))
    return await _publish(send, messages, "CVAT retries the delivery", refused=refusals)


def cvat_messages(
    now: CvatJob, project: str, criteria: s.ProjectCriteria, sender: object = None
) -> tuple[list[Published], list[dict[str, Any]]]:
    """A completed job's annotations, one per frame (the worker: its assignee, else whoever
    completed it), and the frames refused, each as a dead letter with its shapes."""
    job_id = now.job.get("id")
    user = now.job.get("assignee") or sender
    if not isinstance(user, dict) or "id" not in user:
        raise BadDelivery("schema", f"job {job_id} has no assignee and the delivery no sender: whose work is it?")
    try:
        labels = Labels.of(now.labels)
        contents = frame_contents(now.job, now.annotations, labels, now.meta, criteria)
        at = datetime.fromisoformat(str(now.job["updated_date"]).replace("Z", "+00:00"))
        annotations, refused = job_annotations(now.job, f"cvat-user-{user['id']}", contents, project, at)
    except (Unsupported, KeyError, TypeError, ValueError) as exc:
        raise BadDelivery("schema", f"job {job_id} as CVAT returned it: {type(exc).__name__}: {exc}") from None
    messages: list[Published] = [("annotations", a.item_id, a) for a in annotations]
    for frame, name, exc in refused:
        shapes = [x for x in now.annotations.get("shapes", []) if x.get("frame") == frame]
        raw = orjson.dumps({"job": now.job, "frame": frame, "name": name, "shapes": shapes})
        letter = dead_letter(raw, "unsupported", f"frame {frame} ({name}): {exc}", CVAT_SOURCE)
        messages.append(("deadletter", None, letter))
    return messages, [{"frame": f, "name": n, "error": str(e)} for f, n, e in refused]


async def pull_cvat(
    client: CvatClient, job_ids: Sequence[int], projects: CvatProjects, criteria_of: CriteriaOf = _no_criteria
) -> tuple[list[Published], dict[str, int]]:
    """Completed jobs as the webhook would have published them (content-derived ids: what it did
    publish is the same event); jobs still in progress are skipped and counted."""
    out: list[Published] = []
    counts = {"annotations": 0, "refused": 0, "in progress": 0}
    for job_id in job_ids:
        now = await client.job(job_id)
        if not submitted(now.job):
            counts["in progress"] += 1
            continue
        project = projects(now.job)
        messages, refused = cvat_messages(
            now, project, await criteria_of(project) or s.ProjectCriteria(project_id=project)
        )
        out += messages
        counts["annotations"] += sum(t == "annotations" for t, _, _ in messages)
        counts["refused"] += len(refused)
    return out, counts


def _not_done(job: dict[str, Any]) -> str:
    return (f"job {job.get('id')} is {job.get('state')!r} in stage {job.get('stage')!r}: its annotations are "
            "published when the annotator completes it")  # fmt: skip


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    return web.json_response({"error": message, **({"reason": reason} if reason else {})}, status=status)


async def _refuse(send: Send, body: bytes, exc: BadDelivery, status: int, source: str = WEBHOOK_SOURCE) -> web.Response:
    await send([("deadletter", None, dead_letter(body, exc.reason, str(exc), source))])
    return _error(status, str(exc), exc.reason)


class ToolError(RuntimeError):
    """A labeling tool's API refused a call; the message has its status and answer."""


@dataclass
class CvatClient:
    """The CVAT REST calls the bridge makes to read a completed job (a personal access token:
    `Authorization: Bearer`; a legacy API key: scheme `Token`)."""

    url: str
    token: str
    scheme: str = "Bearer"
    http: aiohttp.ClientSession | None = None

    async def get(self, path: str, **params: str) -> Any:
        if self.http is None:
            self.http = aiohttp.ClientSession(
                headers={"Authorization": f"{self.scheme} {self.token}"}, timeout=aiohttp.ClientTimeout(total=30)
            )
        async with self.http.get(path if "://" in path else f"{self.url.rstrip('/')}{path}", params=params) as r:
            if r.status != 200:
                raise ToolError(f"CVAT answered {r.status} to GET {path}: {(await r.text())[:300]}")
            return await r.json(content_type=None)

    async def job(self, job_id: int) -> CvatJob:
        job, annotations, meta = await asyncio.gather(
            self.get(f"/api/jobs/{job_id}"), self.get(f"/api/jobs/{job_id}/annotations"),
            self.get(f"/api/jobs/{job_id}/data/meta"),
        )  # fmt: skip
        labels: list[dict[str, Any]] = []
        page = await self.get("/api/labels", job_id=str(job_id), page_size="500")
        while True:
            labels += page["results"]
            if not page.get("next"):
                return CvatJob(job, annotations, labels, meta)
            page = await self.get(page["next"])

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


async def pull_label_studio(
    url: str, token: str, ls_project: int | str, projects: LabelStudioProjects
) -> tuple[list[Published], dict[str, int]]:
    """Every annotation of a Label Studio project as the webhook would have delivered it, read
    from its JSON export: the same ids, so what the webhook already published is not counted
    twice (the engine applies an event id once). Refused annotations come back as dead letters."""

    headers = {"Authorization": f"Token {token}"}
    params = {"exportType": "JSON", "download_all_tasks": "true"}
    async with (
        aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as http,
        http.get(f"{url.rstrip('/')}/api/projects/{ls_project}/export", params=params) as r,
    ):
        if r.status != 200:
            raise SystemExit(f"Label Studio answered {r.status} for project {ls_project}'s export: {await r.text()}")
        tasks = await r.json(content_type=None)
    out: list[Published] = []
    counts = {"annotations": 0, "gold": 0, "reviews": 0, "ignored": 0, "refused": 0}
    for task in tasks:
        for a in task.get("annotations", []):
            payload = {
                "action": "ANNOTATION_UPDATED",
                "annotation": {**a, "task": task["id"], "project": ls_project},
                "task": {"id": task["id"], "data": task.get("data", {})},  # a review task's fields make a review
            }
            try:
                messages, ignored = label_studio_messages(payload, projects)
            except BadDelivery as exc:
                out.append(("deadletter", None, dead_letter(orjson.dumps(payload), exc.reason, str(exc), SYNC_SOURCE)))
                counts["refused"] += 1
                continue
            counts["ignored"] += ignored is not None
            for topic, key, message in messages:
                counts[topic] += 1
                out.append((topic, key, message))
    return out, counts


@dataclass(frozen=True)
class CvatConnection:
    """Where the bridge reads completed jobs from, and the webhook's secret."""

    url: str
    token: str
    secret: str | None
    scheme: str = "Bearer"
    projects: CvatProjects = field(default_factory=CvatProjects)


def criteria_reader(settings: Settings, timeout_s: float = 2.0) -> tuple[CriteriaOf, Callable[[], Awaitable[None]]]:
    """A project's criteria from Redis (cached briefly), and how to close the connection. Only
    keypoints need them (the schema's point order); with Redis away the defaults serve, and a
    keypoint set they cannot place is dead-lettered, not guessed."""
    from goldstream.streams.state import CriteriaStore, Keys, connect

    redis = connect(settings.redis_url, **settings.redis())
    store = CriteriaStore(redis, Keys(settings.key_prefix), ttl_s=10.0)

    async def criteria_of(project_id: str) -> s.ProjectCriteria | None:
        try:
            return await asyncio.wait_for(store.get(project_id, asyncio.get_running_loop().time()), timeout_s)
        except Exception:  # any Redis trouble: the defaults, as documented
            return None

    return criteria_of, redis.aclose


async def serve(
    settings: Settings,
    host: str,
    port: int,
    projects: LabelStudioProjects,
    token: str | None,
    cvat: CvatConnection | None = None,
) -> None:
    """Run the bridge until SIGTERM / SIGINT: one producer (acks from all in-sync replicas)."""
    ep = endpoints(settings)
    topics = Topics(settings.topic_prefix)
    await create_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=ep.bootstrap_servers, **ep.kafka, **ep.producer_options())
    await producer.start()
    criteria_of, close_redis = criteria_reader(settings)
    client = CvatClient(cvat.url, cvat.token, cvat.scheme) if cvat else None

    async def send(messages: Sequence[Published]) -> None:
        pending = [
            await producer.send(topics.name(t), m.to_bytes(), key=k.encode() if k else None) for t, k, m in messages
        ]
        await asyncio.gather(*pending)

    receiver = Cvat(cvat.secret, client.job, cvat.projects) if cvat and client else None
    runner = web.AppRunner(app(send, projects, token, cvat=receiver, criteria_of=criteria_of), handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]  # the port the system chose for --port 0
        routes = "POST /label-studio/webhook" + (", POST /cvat/webhook" if cvat else "")
        print(f"goldstream bridge on http://{host}:{bound} ({routes})", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await producer.stop()
        await close_redis()
        if client is not None:
            await client.close()


__all__ = [
    "SIGNATURE_HEADER",
    "TOKEN_HEADER",
    "BadDelivery",
    "Cvat",
    "CvatClient",
    "CvatConnection",
    "CvatJob",
    "LabelStudioProjects",
    "app",
    "dead_letter",
    "label_studio_messages",
    "pull_label_studio",
    "serve",
]
