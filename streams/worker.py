"""The goldstream worker: plain Kafka consumer groups that commit only what they applied.

- score step: annotations, gold, reviews, control and projects (keyed by item / project, same
  partition count) -> the engine, one batch at a time: the batch's item states read from Redis
  in one round trip, every record handled, changed states written back, the outputs produced and
  acknowledged, and only then the offsets committed.
- proficiency step: scores (keyed by worker) -> Redis through the apply-once script, in
  batches, committed after applying -> alerts.
- consensus timer: items of this worker's partitions that waited past their project's timeout
  get a `RoundTimeout` on `control`, so the consumer that owns the item closes the round.
- heartbeat, watchdog, probes and lifeline (`streams.watchdog`).

This was a Faust app. faust-streaming 0.15.3 committed offsets of input events it had never
processed when a worker restarted after another left without leaving its group (27 of 200
annotations never scored in one run of tests/test_faults.py), and sometimes stalled (Ready,
consuming nothing). Both are gone with consumers whose commits follow our own processing;
docs/reliability.md has the evidence. Delivery is at least once (a crash before the commit
redelivers the batch) and effects exactly once: outputs derive their ids from their inputs, item
states are plain writes of what the engine derived, counters go through the apply-once script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from goldstream.schemas.messages import ScoreRecord
from goldstream.streams.engine import Emit, Engine, ItemState, Record
from goldstream.streams.engine import Settings as EngineSettings
from goldstream.streams.items import ITEM_TOPICS, watched
from goldstream.streams.memory import tune_gc
from goldstream.streams.metrics import Metrics
from goldstream.streams.settings import Settings
from goldstream.streams.state import (
    SOCKET_TIMEOUT_S,
    AlertFlags,
    Candidate,
    CriteriaStore,
    ItemStore,
    Keys,
    ProficiencyStore,
    RedisGuard,
    RedisState,
    StateLost,
    Stored,
    connect,
)
from goldstream.streams.topics import Topics
from goldstream.streams.watchdog import (
    EXIT_CRASHED,
    EXIT_STALLED,
    EXIT_STATE_LOST,
    Health,
    HealthServer,
    Lifeline,
    Progress,
    hard_exit,
    heartbeat,
    lag_and_offsets,
    total_lag,
)

SCORE_INPUTS = ("annotations", "gold", "reviews", "control", "projects")
BATCH_ORDER = {t: i for i, t in enumerate(("projects", "gold", "annotations", "reviews", "control"))}
log = logging.getLogger("goldstream.worker")


@dataclass
class Fault:
    """Fault injection for the tests of the watchdog and the lifeline (setting `fault`, never set
    in production): after `after` input records, `stall` stops the score step as the observed
    faust-streaming stall did (assigned, consuming nothing), `crash` raises inside it."""

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

    async def after_records(self, n: int) -> None:
        before, self.seen = self.seen, self.seen + n
        if not before < self.after <= self.seen:
            return
        log.warning("fault injection: %s after %d records", self.kind, self.after)
        if self.kind == "stall":
            await asyncio.Event().wait()
        raise RuntimeError("injected crash")


def retention_entries(
    expiring: Sequence[tuple[str, int]],
    loaded: Mapping[str, bytes],
    changed: Mapping[str, object],
    due_of: Callable[[str], float | None],
) -> dict[str, tuple[int, float | None]]:
    """Retention index entries for the items the sweep listed that the batch does not write: an
    item gone already loses its entry; one not out of retention after all (`item_retention_s`
    was raised since its entry was written) moves to when it is. Else the sweep would load it
    again at every batch until then, up to its limit per partition."""
    out: dict[str, tuple[int, float | None]] = {}
    for item, partition in expiring:
        if item not in loaded:
            out[item] = (partition, None)
        elif item not in changed:
            out[item] = (partition, due_of(item))
    return out


class ParsedItems:
    """Item states as stored in Redis, parsed, with the latest few thousand kept by their bytes:
    an item's next annotation usually finds its state as this worker wrote it, and parsing it
    again (every annotation of the item, validated) was a large share of the score step. The
    bytes decide, so a state another worker wrote is parsed afresh.

    Bounded by count (`size`) and by the JSON the kept states came from (`budget`): a parsed state
    takes about ten times its JSON (16 KB a kept annotation on the QC workloads), so a count alone
    let a worker whose items hold many annotations keep gigabytes."""

    def __init__(self, size: int = 20_000, budget: int = 64 << 20) -> None:
        self.size = size
        self.budget = budget
        self._bytes = 0
        self._kept: OrderedDict[str, tuple[bytes, ItemState]] = OrderedDict()

    def parse(self, loaded: Mapping[str, bytes]) -> dict[str, ItemState]:
        out = {}
        for item_id, raw in loaded.items():
            kept = self._kept.get(item_id)
            out[item_id] = kept[1] if kept is not None and kept[0] == raw else ItemState.model_validate_json(raw)
        return out

    @staticmethod
    def known(
        item_ids: Iterable[str],
        arrived: Sequence[tuple[object, bytes]],
        states: Mapping[str, ItemState] | None = None,
        loaded: Mapping[str, Stored] | None = None,
    ) -> dict[int, bytes | memoryview]:
        """JSON of annotations by `id()` (`ItemState.encode`): those that arrived in the batch,
        and those of `states` (`item_ids` of them) as they lie in what was `loaded` (the bytes
        Redis holds: stored again as they are, a state stays what it loads as, and the next load
        finds it kept, whether it was kept or parsed afresh). The objects are alive (in the
        batch, or in `states`), so their ids name them."""
        out: dict[int, bytes | memoryview] = {id(a): raw for a, raw in arrived}
        for item_id in item_ids:
            found = loaded.get(item_id) if loaded is not None else None
            st = states.get(item_id) if states is not None else None
            if found is None or st is None or not found.spans:
                continue
            view = memoryview(found.full)
            for a in st.annotations:
                span = found.spans.get(a.event_id)
                if span is not None:
                    out.setdefault(id(a), view[span[0] : span[1]])
        return out

    def keep(self, states: Mapping[str, tuple[bytes, ItemState]]) -> None:
        for item_id, entry in states.items():
            old = self._kept.get(item_id)
            self._bytes += len(entry[0]) - (0 if old is None else len(old[0]))
            self._kept[item_id] = entry
            self._kept.move_to_end(item_id)
        while self._kept and (len(self._kept) > self.size or self._bytes > self.budget):
            self._bytes -= len(self._kept.popitem(last=False)[1][0])


class SentScores:
    """ScoreRecords this worker sent, by their bytes, until its proficiency step reads them back:
    decoding a score again (validating its result's match rows) was most of what reading one
    cost. The bytes decide, as in `ParsedItems`: a score another worker sent is decoded afresh,
    and one that waited longer than the last `size` sent is too."""

    def __init__(self, size: int = 5_000) -> None:
        self.size = size
        self._sent: OrderedDict[bytes, ScoreRecord] = OrderedDict()

    def note(self, raw: bytes, record: ScoreRecord) -> None:
        self._sent[raw] = record
        if len(self._sent) > self.size:
            self._sent.popitem(last=False)

    def take(self, raw: bytes | None) -> ScoreRecord | None:
        return None if raw is None else self._sent.pop(raw, None)


def item_id_of(rec: Record) -> str | None:
    """The item an input record concerns, to load its state before the engine runs (the engine
    itself reads it from the decoded message; the key is the item id by convention)."""
    if rec.value is not None:
        try:
            doc = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("item_id"), str):
            return doc["item_id"]
    if rec.key is not None:
        try:
            return rec.key.decode()
        except UnicodeDecodeError:
            return None
    return None


class Commits:
    """A step's offset commits, in the background and in order, one at a time.

    A batch's commit (a round trip to the group coordinator, about 6 ms here) overlaps the next
    batch's work instead of delaying it; it is still sent only after the batch was applied, so
    what is committed was applied. A rebalance and a stop wait for the one in flight (`flush`).
    """

    def __init__(self, commit: Callable[[Mapping[Any, Sequence[Any]]], Awaitable[None]]) -> None:
        self._commit = commit
        self._task: asyncio.Task[None] | None = None

    async def submit(self, batch: Mapping[Any, Sequence[Any]]) -> None:
        await self.flush()
        self._task = asyncio.create_task(self._commit(batch))

    async def flush(self) -> None:
        """Wait for the commit in flight; its error, if any, is raised here."""
        task, self._task = self._task, None
        if task is not None:
            await task


class Prefetch:
    """Takes a consumer's records as soon as they are fetched, into a buffer of up to `limit`
    records that the step drains one batch at a time.

    Why: aiokafka fetches a broker's partitions again only once the records it fetched were
    taken (`getmany`). A step that takes records only between its batches leaves what arrives
    during a batch at the broker until the fetch after the next one: a bare consumer with 6 ms
    of work per batch at 780 records/s saw records 10 ms (p50) after they were produced, 1.3 ms
    without the work; with this reader the stream benchmark's p50 at that rate fell from 21 to
    15 ms. Records fetched before a rebalance are dropped with the batch generation (`drop`):
    the partitions' next owner, maybe this worker again, reads them from the committed offsets
    (aiokafka hands out no record between the start of a reassignment and its end)."""

    def __init__(self, consumer: AIOKafkaConsumer, limit: int, poll_s: float) -> None:
        self.consumer, self.limit, self.poll_s = consumer, limit, poll_s
        self.records: dict[Any, list[Any]] = {}
        self.count = 0
        self.generation = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def run(self) -> None:
        while True:
            await self._room.wait()
            got = await self.consumer.getmany(timeout_ms=int(self.poll_s * 1000), max_records=self.limit - self.count)
            for tp, rs in got.items():
                self.records.setdefault(tp, []).extend(rs)
                self.count += len(rs)
            if self.count:
                self._arrived.set()
            if self.count >= self.limit:
                self._room.clear()

    async def take(self, timeout_s: float) -> tuple[dict[Any, list[Any]], int]:
        """What arrived (waiting up to `timeout_s` for something), with its generation."""
        if not self.count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
        batch, self.records, self.count = self.records, {}, 0
        self._arrived.clear()
        self._room.set()
        return batch, self.generation

    def drop(self) -> None:
        """A rebalance: what was fetched belongs to the previous assignment."""
        self.records, self.count = {}, 0
        self.generation += 1
        self._arrived.clear()
        self._room.set()


class _Revoke(ConsumerRebalanceListener):
    """A rebalance waits for the batch in hand to be applied and committed (the lock, then the
    commit in flight), so a partition's next owner starts exactly where this one stopped; records
    prefetched and not yet handled are dropped (`Prefetch`)."""

    def __init__(self, lock: asyncio.Lock, health: Health, name: str, commits: Commits) -> None:
        self.lock, self.health, self.name, self.commits = lock, health, name, commits
        self.prefetch: Prefetch | None = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.health.rebalancing.add(self.name)
        async with self.lock:
            await self.commits.flush()
            if self.prefetch is not None:
                self.prefetch.drop()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.health.rebalancing.discard(self.name)
        by_topic: dict[str, list[int]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        for topic, parts in sorted(by_topic.items()):
            log.info("assigned %s %s: %s", self.name, topic, sorted(parts))


class Worker:
    """One worker process's steps, sharing one producer, one Redis client and one guard."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.keys = Keys(settings.key_prefix)
        # every call of the worker goes through its guard, which times each call out as a whole
        self.redis = connect(settings.redis_url, **settings.redis(), socket_timeout=None)
        self.guard = RedisGuard(self.redis, epoch_key=self.keys.epoch(), timeout_s=SOCKET_TIMEOUT_S)
        self.state = RedisState(self.redis, self.keys, settings.dedup_ttl_s, self.guard)
        self.items = ItemStore(self.state)
        self.parsed = ParsedItems()
        # held by the score step for a batch, from its loads to its writes; the consensus timer
        # takes it to move index entries by states that cannot change under it meanwhile
        self.score_lock = asyncio.Lock()
        self.sent = SentScores()
        self.health = Health()
        self.metrics = Metrics(self.guard)
        self.stopping = asyncio.Event()
        self.fault = Fault.parse(settings.fault)
        self.consumers: dict[str, AIOKafkaConsumer] = {}
        self.producer: AIOKafkaProducer | None = None
        self.logical = {self.topics.name(t): t for t in self.topics.all()}

    def engine(self) -> Engine:
        """An engine over the shared stores (the score step and the timer each have their own:
        the item store is swapped per batch)."""
        return Engine(
            items={},
            criteria=CriteriaStore(self.redis, self.keys, state=self.state),
            proficiency=ProficiencyStore(self.state),
            alerts=AlertFlags(self.redis, self.keys, self.state),
            settings=EngineSettings(
                unknown_projects=self.settings.unknown_projects,
                stage="worker",
                item_retention_s=self.settings.item_retention_s,
            ),
        )

    def consumer(
        self, name: str, group: str, topics: Sequence[str], listener: _Revoke, linger_ms: int = 0
    ) -> AIOKafkaConsumer:
        """A consumer that commits only what was applied; `linger_ms`: how long the broker may hold
        a fetch to fill it (up to 1 MiB), for a step whose batches have a fixed cost."""
        s = self.settings
        linger = {"fetch_min_bytes": 1 << 20, "fetch_max_wait_ms": linger_ms} if linger_ms > 0 else {}
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            **s.kafka(),
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(s.session_timeout_s / 5, 1.0) * 1000),
            rebalance_timeout_ms=int(max(2 * s.session_timeout_s, 8.0) * 1000),
            max_poll_records=s.batch_max,
            **linger,
        )
        consumer.subscribe([self.topics.name(t) for t in topics], listener=listener)
        self.consumers[name] = consumer
        return consumer

    async def send(self, emits: Sequence[Emit]) -> None:
        """Produce and wait for every acknowledgement (before any commit)."""
        assert self.producer is not None
        pending = []
        for e in emits:
            value = None if e.value is None else e.value.to_bytes()
            if isinstance(e.value, ScoreRecord) and value is not None:
                self.sent.note(value, e.value)
            key = e.key.encode() if e.key else None
            pending.append(await self.producer.send(self.topics.name(e.topic), value, key=key))
        if pending:
            await asyncio.gather(*pending)
            self.metrics.emitted(e.value for e in emits)

    async def commit(self, consumer: AIOKafkaConsumer, batch: Mapping[Any, Sequence[Any]]) -> None:
        try:
            await consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items() if records})
        except (CommitFailedError, IllegalStateError) as exc:
            # the group moved on while the batch was held (a Redis outage longer than the
            # rebalance timeout): the new owner reads it again; counters are applied once and
            # item states are written only over the state they were derived from (ItemStore)
            log.warning("commit refused (%s); the batch will be read again", exc)

    async def pause(self, seconds: float) -> bool:
        """Sleep, unless asked to stop meanwhile; True when stopping (a stop must not wait for
        the consensus timer's next tick)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ steps

    async def score_step(self) -> None:
        lock = self.score_lock
        commits = Commits(lambda batch: self.commit(consumer, batch))
        revoke = _Revoke(lock, self.health, "score", commits)
        consumer = self.consumer("score", self.settings.app_id, SCORE_INPUTS, revoke)
        prefetch = revoke.prefetch = Prefetch(consumer, self.settings.batch_max, self.settings.batch_within_s)
        await consumer.start()
        engine = self.engine()
        reader = asyncio.create_task(prefetch.run(), name="score-prefetch")
        try:
            while not self.stopping.is_set():
                if reader.done():
                    reader.result()  # the reader's error (a fetch that failed) is the step's
                batch, generation = await prefetch.take(self.settings.batch_within_s)
                if not batch:
                    continue
                async with lock:
                    if generation != prefetch.generation:
                        continue  # a rebalance came between: the records are dropped, read again
                    await self.score_batch(engine, batch, self.item_partitions(consumer))
                    await commits.submit(batch)
                self.metrics.batch_done("score", [r.timestamp for rs in batch.values() for r in rs])
                if self.fault is not None:
                    await commits.flush()  # a fault counts committed records
                    await self.fault.after_records(sum(len(r) for r in batch.values()))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await commits.flush()

    def item_partitions(self, consumer: AIOKafkaConsumer) -> list[int]:
        """The input partitions this worker owns (every item topic has the same partitions)."""
        items = {self.topics.name(t) for t in ITEM_TOPICS}
        return sorted({tp.partition for tp in consumer.assignment() if tp.topic in items})

    async def score_batch(self, engine: Engine, batch: Mapping[Any, Sequence[Any]], owned: Sequence[int] = ()) -> None:
        """One batch: its items' states loaded, with those of the owned partitions (`owned`)
        that fell out of retention; the records handled; outputs sent, then states stored."""
        records = [
            Record(self.logical.get(tp.topic, tp.topic), r.value, r.key, tp.partition, r.offset, tp.topic)
            for tp, rs in batch.items()
            for r in rs
        ]
        # Kafka orders a partition, not topics: within a batch, criteria and gold go first, so an
        # annotation fetched together with its item's gold is scored against it (a stable sort:
        # each topic-partition keeps its offset order)
        records.sort(key=lambda rec: BATCH_ORDER.get(rec.topic, len(BATCH_ORDER)))
        partition_of: dict[str, int] = {}
        for rec in records:
            if rec.topic in ITEM_TOPICS and (item := item_id_of(rec)) is not None:
                partition_of.setdefault(item, rec.partition)
        # retention first, at the event time each partition reached before this batch: a record
        # of an item out of retention finds what is left of it (a late review, its marker), as
        # it would have had the item been swept the moment it fell out
        now = engine.item_processor.retention_clocks(set(owned) | set(partition_of.values()), time.time())
        named = set(partition_of)
        stored, expiring = await self.items.load_due(sorted(partition_of), now)
        loaded = {k: v.full for k, v in stored.items()}
        for item, partition in expiring:
            partition_of.setdefault(item, partition)
        engine.items = self.parsed.parse(loaded)
        before = dict(engine.items)  # as loaded: where the timer's index has them
        processor = engine.item_processor
        emits: list[Emit] = []
        for partition, at in sorted(now.items()):
            emits += processor.expire([item for item, p in expiring if p == partition], at)
        if expiring:
            await engine.count_dead(emits)
            self.metrics.items_expired(len([i for i, _ in expiring if i in loaded]))
        emits += await engine.process(records)
        known = self.parsed.known(engine.dirty, processor.arrived, engine.items, stored)
        encoded = {k: engine.items[k].encode(known) for k in engine.dirty}
        changed = {k: e for k, e in encoded.items() if e[0] != loaded.get(k)}
        changed |= {k: (b"", {}) for k in processor.removed if k in loaded}
        kept = {k: (b, engine.items[k]) for k, (b, _) in changed.items() if b}
        waiting, due = {}, {}
        for item, (b, _) in changed.items():
            was = watched(before[item]) if item in before else None
            waiting[item] = (partition_of.get(item, 0), was, processor.watched(item) if b else None)
            due[item] = (partition_of.get(item, 0), processor.due(engine.items[item]) if b else None)
        due |= retention_entries(expiring, loaded, changed, lambda item: processor.due(engine.items[item]))
        for item in named & (loaded.keys() - changed.keys() - due.keys()):
            # inputs seen before (a redelivery): the state has them, but the index entries written
            # after it may not, had the worker died in between; written again, they are
            st = engine.items[item]
            waiting[item] = (partition_of[item], watched(st), watched(st))
            due[item] = (partition_of[item], processor.due(st))
        processor.removed.clear()
        engine.forget(engine.items)
        # outputs first, then the states that record them: a state must never say "done" for
        # outputs that were not acknowledged (a redelivery re-derives them only from the state
        # as it was before, e.g. a round closed by a timeout or a parked review)
        progress = {f"{tp.topic}:{tp.partition}": rs[-1].offset for tp, rs in batch.items() if rs}
        await self.send(emits)
        await self.items.store(changed, waiting, stored, due, progress)
        self.parsed.keep(kept)

    async def proficiency_step(self) -> None:
        lock = asyncio.Lock()
        commits = Commits(lambda batch: self.commit(consumer, batch))
        consumer = self.consumer(
            "proficiency",
            f"{self.settings.app_id}-proficiency",
            ("scores",),
            _Revoke(lock, self.health, "proficiency", commits),
            self.settings.proficiency_linger_ms,
        )
        await consumer.start()
        engine = self.engine()
        while not self.stopping.is_set():
            batch = await consumer.getmany(
                timeout_ms=int(self.settings.batch_within_s * 1000), max_records=self.settings.batch_max
            )
            recs = [
                Record("scores", r.value, r.key, tp.partition, r.offset, tp.topic)
                for tp, rs in batch.items()
                for r in rs
            ]
            if not recs:
                continue
            async with lock:
                await self.send(await engine.apply_scores(recs, self.sent.take))
                await commits.submit(batch)
            self.metrics.batch_done("proficiency", [r.timestamp for rs in batch.values() for r in rs])
        await commits.flush()

    async def consensus_timer(self) -> None:
        engine = self.engine()
        annotations = self.topics.name("annotations")
        while not await self.pause(self.settings.consensus_check_s):
            consumer = self.consumers.get("score")
            if consumer is None:
                continue
            mine = sorted(tp.partition for tp in consumer.assignment() if tp.topic == annotations)
            rules = engine.item_processor.round_rules
            candidates = await self.items.watched(mine, rules, time.time()) if mine else []
            if not candidates:
                continue
            engine.items = self.parsed.parse(await self.items.load(sorted({c.item_id for c in candidates})))
            misplaced = [c for c in candidates if self._misplaced(c, engine.items.get(c.item_id))]
            # each item once, since when its state says it waits (an entry left behind may be older)
            entries = {item: e for item, st in engine.items.items() if (e := watched(st)) is not None}
            when = [(item, e.since) for item, e in sorted(entries.items())]
            requests = await engine.timed_out(datetime.now(UTC), when)
            await self.send([Emit("control", r.item_id, r) for r in requests])
            engine.forget(engine.items)
            if misplaced:
                await self.rewatch(misplaced)

    def _misplaced(self, c: Candidate, st: ItemState | None) -> bool:
        """Whether an entry the timer read is not where the item's state puts it: an earlier
        version's index, or a set left behind (a worker that died between a batch's states and
        its entries, or whose partitions moved on meanwhile)."""
        entry = watched(st) if st is not None else None
        return entry is None or c.found_in != self.keys.watched(c.partition, entry.workers, entry.project_id)

    async def rewatch(self, misplaced: Sequence[Candidate]) -> None:
        """Move misplaced timer entries to where their states, read again under the score step's
        lock (so no batch of this worker is between its loads and its writes), put them. An
        earlier version's index drains so, and a set left behind empties."""
        async with self.score_lock:
            fresh = self.parsed.parse(await self.items.load(sorted({c.item_id for c in misplaced})))
            moves = []
            for c in misplaced:
                st = fresh.get(c.item_id)
                if self._misplaced(c, st):
                    moves.append((c.item_id, c.partition, c.found_in, watched(st) if st is not None else None))
            await self.items.rewatch(moves)

    async def watchdog(self) -> None:
        """Ends a worker whose partitions have lag and no progress for `stall_timeout_s`, and keeps
        the readiness figures. A Redis outage or a rebalance is not a stall: the clock restarts."""
        from aiokafka.admin import AIOKafkaAdminClient

        s = self.settings
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, **s.kafka())
        probe = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **s.kafka(), enable_auto_commit=False)
        await admin.start()
        await probe.start()
        progress = Progress(s.stall_timeout_s)
        loop = asyncio.get_running_loop()
        groups = {"score": s.app_id, "proficiency": f"{s.app_id}-proficiency"}
        groups = {step: group for step, group in groups.items() if step in s.step_names()}
        try:
            while not await self.pause(s.watch_every_s):
                self.health.redis_down = self.guard.down
                if self.guard.down or self.health.rebalancing:
                    self.health.ready = False
                    self.health.reason = "redis unreachable" if self.guard.down else "rebalancing"
                    progress.reset(loop.time())
                    continue
                try:
                    signal_, lag, assigned = (), 0, 0
                    for name, group in groups.items():
                        consumer = self.consumers.get(name)
                        parts = sorted(consumer.assignment()) if consumer is not None else []
                        committed, ends = await lag_and_offsets(admin, probe, group, parts)
                        self.metrics.set_lag(name, committed, ends)
                        signal_ += (tuple(sorted(committed.items())),)
                        lag += total_lag(committed, ends)
                        assigned += len(parts)
                except Exception as exc:  # the watchdog must never be what ends a worker
                    log.warning("watchdog could not read offsets: %r", exc)
                    continue
                self.health.lag, self.health.assigned = lag, assigned
                self.health.ready = lag <= s.ready_max_lag
                self.health.reason = "ok" if self.health.ready else f"lag {lag}"
                if s.stall_timeout_s > 0 and (stalled := progress.observe(signal_, lag, loop.time())):
                    self.health.stalled = stalled
                    hard_exit(EXIT_STALLED, f"stalled: {stalled}")
        finally:
            await probe.stop()
            await admin.close()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, lifeline: Lifeline) -> None:
        s = self.settings
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            **s.kafka(),
            acks="all",
            enable_idempotence=s.services_kind != "embedded",  # Tansu takes no idempotent producer
            linger_ms=0,  # a batch's outputs are all sent before the sender runs: lingering only adds latency
        )
        await self.producer.start()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self.guard.down:  # the batch in hand can neither finish nor be committed
                hard_exit(0, "stop signal during a Redis outage: nothing in flight is committed")
            log.info("signal %d: stopping after the batch in hand", signum)
            lifeline.request_stop()
            self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        mine = s.step_names()
        steps: dict[str, Callable[[], Awaitable[None]]] = {"the watchdog": self.watchdog}
        if "score" in mine:
            steps |= {"the score step": self.score_step, "the consensus timer": self.consensus_timer}
        if "proficiency" in mine:
            steps["the proficiency step"] = self.proficiency_step
        tasks = {asyncio.create_task(fn(), name=name): name for name, fn in steps.items()}
        beat = asyncio.create_task(heartbeat(self.health))
        stop = asyncio.create_task(self.stopping.wait())
        log.info("worker started: group %s, topics %s*, steps %s", s.app_id, s.topic_prefix, ",".join(sorted(mine)))
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    fatal(task.exception(), tasks[task])  # type: ignore[arg-type]
            done, _ = await asyncio.wait(tasks, timeout=s.shutdown_timeout_s)  # each ends after its batch
            for task in done:  # a step that failed while stopping still ends the process non-zero
                if task.exception() is not None:
                    fatal(task.exception(), tasks[task])  # type: ignore[arg-type]
        finally:
            for task in [*tasks, beat, stop]:
                task.cancel()
            for consumer in self.consumers.values():
                await consumer.stop()  # leaves the group; commits nothing (auto commit is off)
            await self.producer.stop()
            await self.redis.aclose()
        log.info("worker stopped")


def fatal(exc: BaseException, where: str) -> None:
    """A step that raised ends the process: never skip past the batch it failed on (that would
    drop it), never count on a Redis that lost the state."""
    if isinstance(exc, StateLost):
        hard_exit(EXIT_STATE_LOST, str(exc))
    log.error("%s failed", where, exc_info=exc)
    hard_exit(EXIT_CRASHED, f"{where} raised {type(exc).__name__}: {exc}")


def main(settings: Settings) -> None:
    """Run a worker until a stop signal, under its lifeline and probes."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    worker = Worker(settings)  # asyncio objects bind to the loop on first use, not here
    tune_gc()
    lifeline = Lifeline(
        crashed=lambda: None,  # a step that raises ends the process itself (fatal)
        health=worker.health,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        loop_block_s=settings.loop_block_s,
    )
    lifeline.start()
    if settings.health_port:
        try:
            HealthServer(worker.health, settings.health_port, settings.loop_block_s, metrics=worker.metrics).start()
        except OSError as exc:  # several workers on one host: only the first gets the port
            log.error("no /healthz on port %d: %s", settings.health_port, exc)
    try:
        asyncio.run(worker.run(lifeline))
    finally:
        lifeline.finish()


__all__ = ["SCORE_INPUTS", "Fault", "ParsedItems", "Worker", "item_id_of", "main"]
