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
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any

import faust
from redis.asyncio import Redis

from goldstream.settings import Settings
from streams.engine import Emit, Engine, Record
from streams.engine import Settings as EngineSettings
from streams.state import AlertFlags, CriteriaStore, Keys, ProficiencyStore, RedisState
from streams.topics import Topics

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
    state: dict[str, Engine] = {}

    def engine() -> Engine:
        if "engine" not in state:
            redis = Redis.from_url(settings.redis_url)
            keys = Keys(settings.key_prefix)
            state["engine"] = Engine(
                items=TableItems(items),
                criteria=CriteriaStore(redis, keys),
                proficiency=ProficiencyStore(RedisState(redis, keys, settings.dedup_ttl_s)),
                alerts=AlertFlags(redis, keys),
                settings=EngineSettings(unknown_projects=settings.unknown_projects, stage="worker"),
            )
        return state["engine"]

    async def send(emits: list[Emit]) -> None:
        for e in emits:
            value = None if e.value is None else e.value.to_bytes()
            await out[e.topic].send(key=e.key.encode() if e.key else None, value=value)

    def record(event: Any) -> Record:
        m = event.message
        return Record(logical_of.get(m.topic, m.topic), m.value, m.key, m.partition, m.offset, m.topic)

    @app.agent(raw_topic(app, *(topics.name(t) for t in SCORE_INPUTS)), name="score")
    async def score(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await send(await engine().handle(record(event)))

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
                await consumer.commit()
        finally:
            await consumer.stop()

    @app.agent(topic("projects"), name="projects")
    async def projects(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await send(await engine().handle(record(event)))

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
        except Exception:
            log.exception("consensus timeout check failed; retrying in %.0f s", settings.consensus_check_s)

    app.goldstream_agents = (score, projects)  # type: ignore[attr-defined]
    return app
