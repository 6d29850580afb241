"""The Faust application: thin agents that feed Kafka records to the engine and send its output.

- `score`: annotations, gold, reviews and control (all keyed by item_id, co-partitioned) ->
  scores, escalations, gold promotions, dead letters. One event at a time, because item state is
  a Faust table whose changelog partition is taken from the event being processed.
- `proficiency`: scores (keyed by worker_id) -> Redis, in batches from its own aiokafka consumer
  group, one pipelined round trip per step, offsets committed after applying -> alerts.
- `projects`: criteria -> Redis, shared by every worker.
- a timer that asks, through `control`, for consensus rounds past their timeout to be closed.

Delivery is at least once: Faust acknowledges an event after its batch is processed and flushes
the producer before it commits offsets. The engine's derived ids and Redis' dedup keys make the
effects exactly once.

A worker is either working or gone (`streams.watchdog`): Redis outages are waited out inside the
calls (`streams.state.RedisGuard`), so no agent sees them; anything else an agent raises, and a
Redis that lost its state, end the process with a non-zero status instead of letting Faust
restart the agent past the event (which would drop it) or hang; a watchdog ends a worker whose
partitions have lag and no progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition

from goldstream.settings import Settings
from streams.engine import Emit, Engine, Record
from streams.engine import Settings as EngineSettings
from streams.state import AlertFlags, CriteriaStore, Keys, ProficiencyStore, RedisGuard, RedisState, StateLost, connect
from streams.topics import Topics
from streams.watchdog import (
    EXIT_CRASHED,
    EXIT_STALLED,
    EXIT_STATE_LOST,
    Health,
    Progress,
    hard_exit,
    heartbeat,
    lag_and_offsets,
    total_lag,
)

SCORE_INPUTS = ("annotations", "gold", "reviews", "control")
log = logging.getLogger(__name__)


class TableItems(MutableMapping[str, bytes]):
    """The engine's item store over a Faust table with raw (bytes) keys and values."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> bytes:
        value = self.table[key.encode()]
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.table.get(key.encode())
        return default if value is None else value

    def __setitem__(self, key: str, value: bytes) -> None:
        self.table[key.encode()] = value

    def __delitem__(self, key: str) -> None:
        del self.table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in list(self.table.keys()))

    def __len__(self) -> int:
        return len(self.table)

    def items(self) -> Any:  # type: ignore[override]
        return [(k.decode(), v) for k, v in list(self.table.items()) if v is not None]


@dataclass
class Fault:
    """Fault injection for the tests of the watchdog and the lifeline (setting `fault`, never set
    in production): after `after` input events, `stall` pauses the Faust consumer as the observed
    faust-streaming stall does (assigned, Ready, consuming nothing), `crash` crashes the app from
    one of its tasks (as a Faust-internal error does)."""

    kind: str
    after: int
    seen: int = 0

    @classmethod
    def parse(cls, spec: str) -> Fault | None:
        if not spec:
            return None
        kind, _, after = spec.partition(":")
        if kind not in ("stall", "crash"):
            raise ValueError(f"unknown fault {spec!r} (stall:N or crash:N)")
        return cls(kind, int(after or 0))

    async def after_event(self, app: faust.App) -> None:
        self.seen += 1
        if self.seen != self.after:
            return
        log.warning("fault injection: %s after %d events", self.kind, self.seen)
        if self.kind == "stall":
            app.consumer.pause_partitions(app.consumer.assignment())
        elif self.kind == "crash":
            app.add_future(_raise(RuntimeError("injected crash")))


async def _raise(exc: BaseException) -> None:
    raise exc


def base_app(settings: Settings) -> faust.App:
    """The Faust app and its broker settings, without agents (the benchmarks' forwarding baseline
    uses it too, so that both differ only in what their agents do)."""
    embedded = settings.services_kind == "embedded"
    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        # Faust makes a data directory even for memory stores; keep it out of the working directory
        datadir=os.path.join(tempfile.gettempdir(), "goldstream-faust-{conf.name}"),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        producer_acks=-1,
        producer_enable_idempotence=not embedded,
        broker_commit_every=settings.batch_max,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
        topic_allow_declare=True,
        # A worker that dies without leaving its group (kill -9, a lost machine) holds its
        # partitions until its session times out: keep that short. Tansu (embedded) also holds a
        # JoinGroup for up to the rebalance timeout.
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=8.0 if embedded else 2 * settings.session_timeout_s,
        broker_heartbeat_interval=1.0 if embedded else max(settings.session_timeout_s / 5, 1.0),
    )


def raw_topic(app: faust.App, *names: str, partitions: int | None = None) -> faust.TopicT:
    """Topics of raw bytes keys and values: goldstream decodes with `schemas`, not Faust."""
    return app.topic(
        *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=partitions
    )


def create_app(settings: Settings) -> faust.App:
    """A goldstream Faust app for these settings (topics must exist: `streams.topics.ensure_topics`)."""
    app = base_app(settings)
    topics = Topics(settings.topic_prefix)

    def topic(logical: str) -> faust.TopicT:
        return raw_topic(app, topics.name(logical), partitions=settings.partitions)

    out = {name: topic(name) for name in ("scores", "escalations", "alerts", "deadletter", "gold", "control")}
    logical_of = {topics.name(name): name for name in topics.all()}
    raw = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    # key_type / value_type bytes: the changelog is written and read back raw (the schema alone is not
    # enough, recovery would decode the changelog as JSON)
    items = app.Table(
        "items", default=None, schema=raw, key_type=bytes, value_type=bytes, partitions=settings.partitions
    )
    keys = Keys(settings.key_prefix)
    redis = connect(settings.redis_url)
    guard = RedisGuard(redis, epoch_key=keys.epoch())
    redis_state = RedisState(redis, keys, settings.dedup_ttl_s, guard)
    the_engine = Engine(
        items=TableItems(items),
        criteria=CriteriaStore(redis, keys, state=redis_state),
        proficiency=ProficiencyStore(redis_state),
        alerts=AlertFlags(redis, keys, redis_state),
        settings=EngineSettings(unknown_projects=settings.unknown_projects, stage="worker"),
    )
    health = Health()
    shared: dict[str, Any] = {}

    def engine() -> Engine:
        return the_engine

    def fatal(exc: BaseException, where: str) -> None:
        """Never let Faust restart an agent past the event it failed on (that event would be
        dropped), nor a Redis without our state be counted from zero: end the process."""
        if isinstance(exc, StateLost):
            hard_exit(EXIT_STATE_LOST, str(exc))
        log.exception("%s failed", where)
        hard_exit(EXIT_CRASHED, f"{where} raised {type(exc).__name__}: {exc}")

    async def send(emits: list[Emit]) -> None:
        for e in emits:
            value = None if e.value is None else e.value.to_bytes()
            await out[e.topic].send(key=e.key.encode() if e.key else None, value=value)

    def record(event: Any) -> Record:
        m = event.message
        return Record(logical_of.get(m.topic, m.topic), m.value, m.key, m.partition, m.offset, m.topic)

    fault = Fault.parse(settings.fault)

    @app.agent(raw_topic(app, *(topics.name(t) for t in SCORE_INPUTS)), name="score")
    async def score(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await send(await engine().handle(record(event)))
            except Exception as exc:
                fatal(exc, "the score agent")
            if fault is not None:
                await fault.after_event(app)

    @app.task
    async def proficiency() -> None:
        """scores -> Redis, with a plain aiokafka consumer group of its own.

        Batches come from `getmany` (one pipelined Redis step per batch) and offsets are committed
        only after a batch is applied and its alerts are flushed. A Faust agent did this first, but
        with faust-streaming 0.15.3 a worker restarted after a kill -9 lost applications of scores
        (it committed past them) or stopped consuming; the kill -9 test caught both."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topics.name("scores"),
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=f"{settings.app_id}-proficiency",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(settings.session_timeout_s / 5, 1.0) * 1000),
        )
        await consumer.start()
        shared["proficiency"] = consumer
        try:
            while True:
                batch = await consumer.getmany(
                    timeout_ms=int(settings.batch_within_s * 1000), max_records=settings.batch_max
                )
                recs = [
                    Record("scores", r.value, r.key, tp.partition, r.offset, tp.topic)
                    for tp, records in batch.items()
                    for r in records
                ]
                if not recs:
                    continue
                await send(await engine().apply_scores(recs))
                await app.producer.flush()
                try:
                    await consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items() if records})
                except (CommitFailedError, IllegalStateError) as exc:
                    # the group moved on while the batch was held (a long Redis outage outlasts
                    # max.poll.interval): its new owner re-reads it, and the apply-once script
                    # keeps the effects single
                    log.warning("proficiency commit refused (%s); the batch will be re-read", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if app.should_stop:  # the app is stopping (or crashed: the lifeline ends the process)
                log.info("proficiency step ends with the app (%s)", exc)
                return
            fatal(exc, "the proficiency step")
        finally:
            shared.pop("proficiency", None)
            await consumer.stop()

    @app.agent(topic("projects"), name="projects")
    async def projects(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await send(await engine().handle(record(event)))
            except Exception as exc:
                fatal(exc, "the projects agent")

    @app.on_rebalance_complete.connect
    async def reindex(sender: Any, **kwargs: Any) -> None:
        engine().reindex()  # recovered or revoked partitions changed the item table

    @app.timer(interval=settings.consensus_check_s)
    async def consensus_timeouts() -> None:
        """Only asks for rounds to close; an error here is logged and retried at the next tick,
        never allowed to crash the worker (a crashed Faust timer stops the whole app)."""
        try:
            for req in await engine().timed_out(datetime.now(UTC)):
                await out["control"].send(key=req.item_id.encode(), value=req.to_bytes())
        except StateLost as exc:
            fatal(exc, "the consensus timer")
        except Exception:
            log.exception("consensus timeout check failed; retrying in %.0f s", settings.consensus_check_s)

    @app.task
    async def beat() -> None:
        await heartbeat(health)

    inputs = {topics.name(t) for t in (*SCORE_INPUTS, "projects")}

    async def reading(admin: Any, probe: Any) -> tuple[tuple, int, int]:
        """(progress signal, lag, partitions) of this worker's own partitions."""
        mine = [TopicPartition(tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in inputs]
        committed, ends = await lag_and_offsets(admin, probe, settings.app_id, mine)
        prof = shared.get("proficiency")
        pparts = sorted(prof.assignment()) if prof is not None else []
        pcommitted, pends = await lag_and_offsets(admin, probe, f"{settings.app_id}-proficiency", pparts)
        recovery = sorted((str(k), v) for k, v in app.tables.recovery.active_offsets.items())
        signal = (tuple(sorted(committed.items())), tuple(sorted(pcommitted.items())), tuple(recovery))
        return signal, total_lag(committed, ends) + total_lag(pcommitted, pends), len(mine) + len(pparts)

    @app.task
    async def watchdog() -> None:
        """Ends a worker whose partitions have lag and no progress for `stall_timeout_s` (the
        faust-streaming stall after a restart: Ready, assigned, consuming nothing); keeps the
        readiness figures. A Redis outage or a rebalance is not a stall: the clock restarts."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await admin.start()
        await probe.start()
        progress = Progress(settings.stall_timeout_s)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(settings.watch_every_s)
                health.redis_down = guard.down
                if guard.down or app.rebalancing:
                    health.ready, health.reason = False, "redis unreachable" if guard.down else "rebalancing"
                    progress.reset(loop.time())
                    continue
                try:
                    signal, lag, assigned = await reading(admin, probe)
                except (TimeoutError, KafkaError, OSError) as exc:
                    log.warning("watchdog could not read offsets: %s", exc)
                    continue
                recovering = bool(app.tables.recovery.in_recovery)
                health.lag, health.assigned = lag, assigned
                health.ready = not recovering and lag <= settings.ready_max_lag
                health.reason = "recovering tables" if recovering else ("ok" if health.ready else f"lag {lag}")
                if settings.stall_timeout_s > 0:
                    stalled = progress.observe(signal, lag, loop.time())
                    if stalled:
                        health.stalled = stalled
                        hard_exit(EXIT_STALLED, f"stalled: {stalled}")
        finally:
            await probe.stop()
            await admin.close()

    app.goldstream_agents = (score, projects)  # type: ignore[attr-defined]
    app.goldstream_health = health  # type: ignore[attr-defined]
    app.goldstream_guard = guard  # type: ignore[attr-defined]
    return app
