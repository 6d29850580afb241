"""What the `goldstream` subcommands do, as functions the CLI and the tests both call."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from goldstream.schemas.base import SchemaError, decode, validate
from goldstream.schemas.criteria import ProjectCriteria
from goldstream.schemas.messages import MESSAGES, DeadLetter, Message, QualityAlert, ScoreRecord
from goldstream.scoring.counters import Counters
from goldstream.scoring.reliability import Risks
from goldstream.services import Endpoints
from goldstream.streams.settings import Settings
from goldstream.streams.state import (
    AlertFlags,
    CriteriaStore,
    Increment,
    Keys,
    Position,
    ProficiencyStore,
    RedisGuard,
    RedisState,
    alert_flag,
    connect,
    dead_letter_increment,
)
from goldstream.streams.topics import LOGICAL, Topics, ensure_topics, live_metadata

MODEL_OF = {m.topic: m for m in MESSAGES}


async def create_topics(settings: Settings) -> list[str]:
    """The deployment's missing topics, as its settings have them (partitions, replication)."""
    return await ensure_topics(
        endpoints(settings),
        Topics(settings.topic_prefix),
        settings.partitions,
        settings.replication_factor,
        settings.min_insync_replicas,
    )


def endpoints(settings: Settings) -> Endpoints:
    """Where the services are, with the security options of every client (streams.security)."""
    return Endpoints(
        settings.kafka_bootstrap, settings.redis_url, settings.services_kind, settings.kafka(), settings.redis()
    )


# ----------------------------------------------------------------------------- worker


def run_worker(settings: Settings) -> None:
    """Create missing topics, make sure Redis holds the state (`ensure_state`), then run the
    worker (`streams.worker`) until it is stopped."""
    from goldstream.streams.worker import main

    asyncio.run(create_topics(settings))
    outcome = asyncio.run(ensure_state(settings))
    print(f"goldstream worker: Redis state {outcome}", file=sys.stderr, flush=True)
    main(settings)


# ----------------------------------------------------------------------------- state


STATE_TOPICS = ("projects", "scores", "deadletter", "alerts")


async def ensure_state(settings: Settings, *, lock_ttl_s: int = 60) -> str:
    """Make sure Redis holds goldstream's state before a worker counts anything.

    Redis' epoch key is written when the state is created. Without it, either nothing happened yet
    (the topics are empty: write it, 'created'), or Redis lost the state (a flush, a failover to an
    empty replica): rebuild it from the topics ('rebuilt'), one worker at a time under a lock,
    never count on from zero. `redis_lost_state: stop` refuses instead, and so does a `scores`
    topic that retention already truncated (the history is not there to rebuild from)."""
    redis = connect(settings.redis_url, **settings.redis())
    keys = Keys(settings.key_prefix)
    guard = RedisGuard(redis)
    try:
        if await guard.run(lambda: redis.get(keys.epoch()), "epoch") is not None:
            await check_positions(settings, redis, keys)
            return "present"
        begins, ends = await topic_bounds(settings, STATE_TOPICS)
        # a new deployment: no worker ever wrote a score or a dead letter, nor committed an input
        # (criteria, gold or annotations waiting for a round leave no output but are state)
        if not (ends["scores"] or ends["deadletter"]) and not await has_committed(settings):
            await guard.run(lambda: redis.set(keys.epoch(), _new_epoch(), nx=True), "epoch")
            return "created"
        if await guard.run(lambda: redis.get(keys.epoch()), "epoch") is not None:
            # another worker of a new deployment created it while this one read the topics: what
            # it consumed since is the activity seen there, not a sign of lost state
            return "present"
        where = f"Redis {settings.redis_url.split('@')[-1]} (prefix {keys.prefix!r})"
        if settings.redis_lost_state == "stop":
            raise SystemExit(
                f"{where} has no goldstream state but the topics hold {ends['scores']} score(s): Redis lost it. "
                "Rebuild it with `goldstream rebuild-state`, or start the worker with redis_lost_state=rebuild."
            )
        if begins["scores"] or begins["deadletter"]:
            raise SystemExit(
                f"{where} lost goldstream's state and the scores topic no longer starts at offset 0 (retention): "
                "it cannot be rebuilt exactly. Restore Redis from a backup, or rebuild what is left with "
                "`goldstream rebuild-state`."
            )
        token = _new_epoch()
        lock = keys.epoch() + ":rebuild"
        while not await guard.run(lambda: redis.set(lock, token, nx=True, ex=lock_ttl_s), "lock"):
            print(f"{where}: another worker is rebuilding the state; waiting", file=sys.stderr, flush=True)
            while await guard.run(lambda: redis.exists(lock), "lock"):
                await asyncio.sleep(1.0)
            if await guard.run(lambda: redis.get(keys.epoch()), "epoch") is not None:
                return "rebuilt by another worker"
        print(f"{where} lost goldstream's state: rebuilding it from the topics", file=sys.stderr, flush=True)
        counts = await rebuild_state(settings, keep_alive=lambda: redis.expire(lock, lock_ttl_s))
        if await guard.run(lambda: redis.get(lock), "lock") != token.encode():
            raise SystemExit(f"{where}: the rebuild lock expired during the rebuild; start again")
        await guard.run(lambda: redis.set(keys.epoch(), token, nx=True), "epoch")
        await guard.run(lambda: redis.delete(lock), "lock")
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"{where}: state rebuilt ({summary})", file=sys.stderr, flush=True)
        return f"rebuilt ({summary})"
    finally:
        await redis.aclose()


async def check_positions(settings: Settings, redis: Any, keys: Keys) -> None:
    """Refuse to count on when an input partition ends before the offset the score step already
    handled there: the topic was recreated, or the deployment points at another Kafka. Its new
    inputs would reuse offsets that the applied positions (`streams.state.Position`) say were
    applied, and their scores would be skipped as redeliveries."""
    from goldstream.streams.worker import SCORE_INPUTS

    handled = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.inputs())).items()}
    if not handled:
        return
    ep = endpoints(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=ep.bootstrap_servers, **ep.kafka)
    await consumer.start()
    try:
        for logical in SCORE_INPUTS:
            name = Topics(settings.topic_prefix).name(logical)
            parts = [TopicPartition(name, p) for p in await topic_partitions(ep, name)]
            ends = await consumer.end_offsets(parts) if parts else {}
            for tp, end in sorted(ends.items()):
                last = handled.get(f"{tp.topic}:{tp.partition}")
                if last is not None and last >= end:
                    raise SystemExit(
                        f"{tp.topic} partition {tp.partition} ends at offset {end}, but goldstream already handled "
                        f"its offset {last}: the topic was recreated, or this deployment now points at another "
                        "Kafka. New inputs there would be taken for ones already applied. Keep the state under "
                        "a new key_prefix, or run `goldstream reset-positions` to count the new topic's "
                        "offsets from the start."
                    )
    finally:
        await consumer.stop()


async def reset_positions(settings: Settings) -> int:
    """`goldstream reset-positions`: forget which input positions were applied (every slot's
    `applied` hash and the score step's progress), for topics recreated under kept state. The
    counters stay; the next inputs count as new. Run it with the workers stopped."""
    redis = connect(settings.redis_url, **settings.redis())
    keys = Keys(settings.key_prefix)
    try:
        names = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*:applied", count=1000)]
        names.append(keys.inputs().encode())
        for name in names:
            await redis.delete(name)
        return len(names) - 1
    finally:
        await redis.aclose()


async def restore_state(settings: Settings) -> dict[str, int]:
    """`goldstream rebuild-state`: rebuild from the topics, then mark Redis as holding the state."""
    counts = await rebuild_state(settings)
    redis = connect(settings.redis_url, **settings.redis())
    try:
        await redis.set(Keys(settings.key_prefix).epoch(), _new_epoch(), nx=True)
    finally:
        await redis.aclose()
    return counts


async def has_committed(settings: Settings) -> bool:
    """Has the score step's group committed any offset of its inputs?"""
    from goldstream.streams.worker import SCORE_INPUTS

    return any(o > 0 for o in (await committed_offsets(settings, SCORE_INPUTS)).values())


async def committed_offsets(settings: Settings, logicals: Iterable[str]) -> dict[TopicPartition, int]:
    """The score step's group's committed offsets on these topics (0 where it has none)."""
    from aiokafka.admin import AIOKafkaAdminClient

    ep = endpoints(settings)
    parts = []
    for logical in logicals:
        name = Topics(settings.topic_prefix).name(logical)
        parts += [TopicPartition(name, p) for p in await topic_partitions(ep, name)]
    if not parts:
        return {}
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=ep.bootstrap_servers, **ep.kafka)
    await admin.start()
    try:
        delay = 0.2
        for attempt in range(40):  # a broker that just started has no group coordinator yet
            try:
                committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=parts)
                break
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or attempt == 39:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
    finally:
        await admin.close()
    found = {tp: o.offset for tp, o in committed.items() if o is not None and o.offset > 0}
    return {tp: found.get(tp, 0) for tp in parts}


def _new_epoch() -> str:
    import uuid

    return f"{time.time():.0f}-{uuid.uuid4().hex}"


async def rebuild_state(settings: Settings, keep_alive: Any = None, batch: int = 500) -> dict[str, int]:
    """Rebuild Redis from the topics, the log of record: criteria from `projects` (last value per
    project), proficiency from `scores`, dead letter counts from `deadletter`, alert states from
    `alerts`. Counters go through the apply-once script, so what a worker applied meanwhile (or a
    second rebuild) is not counted twice."""
    redis = connect(settings.redis_url, **settings.redis())
    keys = Keys(settings.key_prefix)
    state = RedisState(redis, keys, settings.dedup_ttl_s)
    criteria = CriteriaStore(redis, keys, ttl_s=float("inf"), state=state)
    proficiency = ProficiencyStore(state)
    flags = AlertFlags(redis, keys, state)
    counts = {"projects": 0, "items": 0, "scores": 0, "dead letters": 0, "alert states": 0}
    try:
        latest: dict[bytes, bytes | None] = {}
        async for records in iter_topic(settings, "projects", batch):
            latest.update((k, v) for k, v in records if k is not None)
        for key, value in latest.items():
            if value is None:
                await criteria.delete(key.decode(), 0.0)
                continue
            try:
                await criteria.set(decode(ProjectCriteria, value), 0.0)
                counts["projects"] += 1
            except SchemaError:
                continue
        counts["items"] = await rebuild_items(settings, state, keep_alive)
        async for records in iter_topic(settings, "scores", batch, raw=True):
            pending, lanes = [], []
            for r in records:
                try:
                    rec = decode(ScoreRecord, r.value or b"")
                except SchemaError:
                    continue
                c = await criteria.get(rec.project_id, 0.0) or ProjectCriteria(project_id=rec.project_id)
                pending.append((rec, c))
                lanes.append(r.partition)  # as the worker applied it
            counts["scores"] += sum(await proficiency.apply(pending, lanes))
            if keep_alive is not None:
                await keep_alive()
        # dead letters are counted by their source position, as the worker counted them: in the
        # order of those positions (the deadletter topic's partitions interleave them)
        letters: dict[str, Increment] = {}
        async for records in iter_topic(settings, "deadletter", batch):
            for _, value in records:
                try:
                    letter = decode(DeadLetter, value or b"")
                except SchemaError:
                    continue
                letters[letter.event_id] = dead_letter_increment(letter)
        ordered = sorted(letters.values(), key=lambda inc: (inc.at is not None, inc.at or Position("", 0)))
        for start in range(0, len(ordered), batch):
            counts["dead letters"] += sum(await state.apply(ordered[start : start + batch]))
        states: dict[tuple[str, str], str] = {}
        async for records in iter_topic(settings, "alerts", batch):
            for _, value in records:
                try:
                    alert = decode(QualityAlert, value or b"")
                except SchemaError:
                    continue
                flag = alert_flag(alert)
                if flag is not None:
                    states[(alert.project_id, flag[0])] = flag[1]
        for (project, name), value in states.items():
            await flags.change(project, name, value)
        counts["alert states"] = len(states)
        return counts
    finally:
        await redis.aclose()


async def rebuild_items(settings: Settings, state: RedisState, keep_alive: Any = None) -> int:
    """Item states (gold, annotations, rounds) and the waiting index, by running the engine over
    the input topics again up to the score step's committed offsets, outputs discarded (they are
    on the output topics already, with the same ids). Not further: a state that records an input
    says its outputs were sent, so the worker, which resumes at the committed offsets, would make
    nothing for the inputs past them. Records are taken in the order they were appended (their
    timestamps), which is the order the worker saw them in up to the interleaving of partitions;
    an item's records share one partition, so each item's history is replayed in its own order."""
    from goldstream.streams.engine import Engine, ItemState, Record
    from goldstream.streams.engine import Settings as EngineSettings
    from goldstream.streams.state import ItemStore
    from goldstream.streams.worker import ITEM_TOPICS

    records: list[tuple[int, int, Record]] = []
    done = await committed_offsets(settings, ITEM_TOPICS)
    for logical in ITEM_TOPICS:
        name = Topics(settings.topic_prefix).name(logical)
        async for batch in iter_topic(settings, logical, 500, raw=True):
            for r in batch:
                if r.offset < done.get(TopicPartition(name, r.partition), 0):
                    rec = Record(logical, r.value, r.key, r.partition, r.offset, name)
                    records.append((r.timestamp, r.offset, rec))
    records.sort(key=lambda x: (x[0], x[2].partition, x[1]))
    items: dict[str, ItemState] = {}
    engine = Engine(
        items=items,
        criteria=CriteriaStore(state.client, state.keys, ttl_s=float("inf"), state=state),
        proficiency=ProficiencyStore(state),
        alerts=AlertFlags(state.client, state.keys, state),
        settings=EngineSettings(
            unknown_projects=settings.unknown_projects, stage="worker", item_retention_s=settings.item_retention_s
        ),
    )
    partition_of: dict[str, int] = {}
    for _, _, rec in records:
        if rec.key is not None:
            partition_of.setdefault(rec.key.decode(errors="replace"), rec.partition)
    for n in range(0, len(records), 500):  # in the worker's batches; outputs discarded: it emitted them
        await engine.process([rec for _, _, rec in records[n : n + 500]])
        if keep_alive is not None:
            await keep_alive()
    waiting = {item: (partition_of.get(item, 0), None, engine.watched(item)) for item in items}
    store = ItemStore(state)
    names = sorted(items)
    for i in range(0, len(names), 500):
        chunk = names[i : i + 500]
        states = {k: items[k].encode() for k in chunk}
        due = {k: (waiting[k][0], engine.item_processor.due(items[k])) for k in chunk}  # the worker's sweep expires
        await store.store(states, {k: waiting[k] for k in chunk}, None, due)
    return len(items)


async def topic_bounds(settings: Settings, logicals: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
    """For each topic, the sum over partitions of its first offset, and of its end offset."""
    ep = endpoints(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=ep.bootstrap_servers, **ep.kafka)
    await consumer.start()
    begins: dict[str, int] = {}
    ends: dict[str, int] = {}
    try:
        for logical in logicals:
            name = Topics(settings.topic_prefix).name(logical)
            parts = [TopicPartition(name, p) for p in await topic_partitions(ep, name)]
            begins[logical] = sum((await consumer.beginning_offsets(parts)).values()) if parts else 0
            ends[logical] = sum((await consumer.end_offsets(parts)).values()) if parts else 0
    finally:
        await consumer.stop()
    return begins, ends


async def iter_topic(
    settings: Settings,
    logical: str,
    batch: int = 500,
    raw: bool = False,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Any:
    """Batches of (key, value) (`raw`: the records) of a topic from its start to its end as of
    the call, streamed (a rebuild must not hold a month of scores in memory)."""
    ep = endpoints(settings)
    name = Topics(settings.topic_prefix).name(logical)
    partitions = await topic_partitions(ep, name)
    if not partitions:
        return
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ep.bootstrap_servers, **ep.kafka, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = [TopicPartition(name, p) for p in partitions]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            left = [tp for tp in parts if await consumer.position(tp) < end[tp]]
            if not left:
                return
            got = await consumer.getmany(*left, timeout_ms=int(poll_s * 1000), max_records=batch)
            records = [r if raw else (r.key, r.value) for tp, rs in got.items() for r in rs if r.offset < end[tp]]
            if records:
                yield records
    finally:
        await consumer.stop()


# ----------------------------------------------------------------------------- publish


def key_of(message: Message) -> str | None:
    """The key a message takes on its topic (DESIGN §2)."""
    if isinstance(message, ScoreRecord):
        return message.worker_id
    if isinstance(message, QualityAlert):
        return message.key
    if isinstance(message, ProjectCriteria):
        return message.project_id
    return getattr(message, "item_id", None)


def read_messages(path: Path, topic: str | None) -> list[tuple[str, str | None, bytes | None]]:
    """(logical topic, key, value bytes) from JSONL: envelopes, or bare messages of `topic`.

    The whole file is validated before anything is returned, so goldstream's own tools publish
    nothing invalid, and nothing at all from a file with a bad line."""
    return list(_read_messages(path, topic))


def _read_messages(path: Path, topic: str | None) -> Iterator[tuple[str, str | None, bytes | None]]:
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not JSON ({exc})") from None
            if topic is None:
                t, value, key = doc["topic"], doc.get("value"), doc.get("key")
            else:
                t, value, key = topic, doc, None
            if t not in MODEL_OF:
                raise SystemExit(f"{path}:{n}: unknown topic {t!r} (topics: {', '.join(LOGICAL)})")
            if value is None:
                yield t, key, None
                continue
            try:
                message = validate(MODEL_OF[t], value)
            except SchemaError as exc:
                raise SystemExit(f"{path}:{n}: {exc}") from None
            yield t, key or key_of(message), message.to_bytes()


async def publish(
    settings: Settings, messages: Iterable[tuple[str, str | None, bytes | None]], rate: float | None = None
) -> int:
    """Send (logical topic, key, value) to Kafka; `rate`: messages per second, else as fast as acked."""
    ep = endpoints(settings)
    topics = Topics(settings.topic_prefix)
    await create_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=ep.bootstrap_servers, **ep.kafka, linger_ms=5, **ep.producer_options()
    )
    await producer.start()
    n = 0
    start = time.monotonic()
    try:
        pending = []
        for topic, key, value in messages:
            pending.append(await producer.send(topics.name(topic), value, key=key.encode() if key else None))
            n += 1
            if rate:
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    return n


# ----------------------------------------------------------------------------- criteria


def load_criteria(path: Path) -> ProjectCriteria:
    """A criteria file, YAML or JSON; only what differs from the defaults needs to be in it."""
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else orjson.loads(path.read_bytes())
    return validate(ProjectCriteria, data)


async def set_criteria(settings: Settings, criteria: ProjectCriteria, wait_s: float = 30.0) -> None:
    """Publish criteria on `projects`; wait until the workers have them (in Redis), unless wait_s is 0."""
    await publish(settings, [("projects", criteria.project_id, criteria.to_bytes())])
    if wait_s <= 0:
        return
    redis = connect(settings.redis_url, **settings.redis())
    try:
        store = CriteriaStore(redis, Keys(settings.key_prefix), ttl_s=0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if await store.get(criteria.project_id, time.monotonic()) == criteria:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"no worker applied the criteria of {criteria.project_id!r} within {wait_s:.0f} s")
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------- topics


async def topic_partitions(ep: Endpoints, name: str) -> list[int]:
    """Partition numbers of a topic (empty if it does not exist), from the cluster's metadata as
    any live broker has it (`streams.topics.live_metadata`)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=ep.bootstrap_servers, **ep.kafka)
    await admin.start()
    try:
        return sorted((await live_metadata(admin)).partitions_for_topic(name) or ())
    finally:
        await admin.close()


async def committed_to_end(settings: Settings, group: str, logical: str) -> bool:
    """Has `group` committed every partition of a topic up to its end? (Kafka orders partitions,
    not topics: whoever needs gold consumed before annotations arrive must wait for this.)"""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, RequestTimedOutError

    name = Topics(settings.topic_prefix).name(logical)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    await consumer.start()
    await admin.start()
    try:
        parts = [TopicPartition(name, p) for p in await topic_partitions(endpoints(settings), name)]
        end = await consumer.end_offsets(parts)
        # with the partitions named: Tansu (the embedded broker) answers only that form
        try:
            committed = await admin.list_consumer_group_offsets(group, partitions=parts) if parts else {}
        except (NodeNotReadyError, KafkaConnectionError, RequestTimedOutError):
            return False  # the node asked is down (a broker lost): not known yet, ask again
        return all(end[tp] == 0 or (committed.get(tp) is not None and committed[tp].offset >= end[tp]) for tp in parts)
    finally:
        await consumer.stop()
        await admin.close()


async def group_members(settings: Settings, group: str) -> tuple[str, int | None]:
    """A consumer group's state ('Stable', 'Empty', 'PreparingRebalance', ...) and member count;
    ('Unknown', None) while no broker coordinates it yet: a fresh cluster creates its offsets topic
    on the first group lookup, and a caller waiting for members should ask again, not fail (nor
    read it as no members)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    await admin.start()
    try:
        try:
            (resp,) = await admin.describe_consumer_groups([group])
        except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
            return "Unknown", None
        (desc,) = resp.to_object()["groups"]
        return desc["state"], len(desc["members"])
    finally:
        await admin.close()


async def read_topic(
    settings: Settings, logical: str, *, until_idle_s: float = 2.0, timeout_s: float = 120.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) of a topic from the start up to its current end (no consumer group)."""
    out: list[tuple[bytes | None, bytes | None]] = []
    async for records in iter_topic(settings, logical, poll_s=until_idle_s, timeout_s=timeout_s):
        out.extend(records)
    return out


async def rebuild_proficiency(
    settings: Settings, keys: Keys | None = None, batch: int = 500, force: bool = False
) -> tuple[int, int]:
    """Replay the `scores` topic into an empty Redis prefix (the log of record -> the view).

    Returns (scores applied, records skipped as unreadable). Counters are integers, so the result
    does not depend on the order the scores are read in: it equals the live state. A prefix that
    already holds proficiency is refused (FileExistsError) unless `force` deletes it first."""
    redis = connect(settings.redis_url, **settings.redis())
    keys = keys or Keys(settings.key_prefix)
    try:
        existing = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{*", count=1000)]
        if existing and not force:
            raise FileExistsError(
                f"{len(existing)} proficiency key(s) already under '{keys.prefix}': rebuild into an empty "
                "prefix (--into NEW) or pass --force to delete them"
            )
        for k in existing:
            await redis.delete(k)
        criteria = CriteriaStore(redis, Keys(settings.key_prefix))  # bucket sizes come from the criteria
        store = ProficiencyStore(RedisState(redis, keys, settings.dedup_ttl_s))
        applied = skipped = 0
        async for records in iter_topic(settings, "scores", batch, raw=True):  # to its end, however long
            pending: list[tuple[ScoreRecord, ProjectCriteria]] = []
            lanes: list[int] = []
            for r in records:
                try:
                    rec = decode(ScoreRecord, r.value or b"")
                except SchemaError:
                    skipped += 1
                    continue
                c = await criteria.get(rec.project_id, time.monotonic()) or ProjectCriteria(project_id=rec.project_id)
                pending.append((rec, c))
                lanes.append(r.partition)
            applied += sum(await store.apply(pending, lanes))
        return applied, skipped
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------- report


@contextlib.asynccontextmanager
async def project_state(settings: Settings, project_id: str) -> AsyncIterator[tuple[ProficiencyStore, ProjectCriteria]]:
    """The proficiency store and a project's criteria (its defaults when it has none), for a report."""
    redis = connect(settings.redis_url, **settings.redis())
    keys = Keys(settings.key_prefix)
    try:
        criteria = await CriteriaStore(redis, keys).get(project_id, time.monotonic())
        yield ProficiencyStore(RedisState(redis, keys)), criteria or ProjectCriteria(project_id=project_id)
    finally:
        await redis.aclose()


async def report(settings: Settings, project_id: str, batch_id: str | None = None) -> dict[str, Any]:
    """Figures of a project (or one batch) against its targets, with a verdict for batches."""
    async with project_state(settings, project_id) as (store, criteria):
        key = store.keys.project(project_id, f"batch:{batch_id}" if batch_id else "totals")
        (fields,) = await store.hashes([key])
        figures = Counters.from_fields(fields).compute(criteria.empty_item_correct)
        targets = criteria.targets
        checks = {}
        for name, value in (
            ("accuracy", figures.accuracy),
            ("precision", figures.precision),
            ("recall", figures.recall),
            ("f1", figures.f1),
            ("item_score", figures.mean_score),
        ):
            target = getattr(targets, name)
            if target is not None:
                checks[name] = {"value": value, "target": target, "ok": value is not None and value >= target}
        verdict = "accept" if figures.items and all(c["ok"] for c in checks.values()) else "reject"
        workers = await store.workers(project_id)
        out = {
            "project_id": project_id,
            "batch_id": batch_id,
            "figures": figures.model_dump(mode="json"),
            "targets": checks,
            "verdict": verdict if batch_id else None,
            "workers": len(workers),
        }
        if not batch_id:
            out["review"] = review_figures((await store.view(project_id, criteria, fresh=True)).risks, criteria)
        return out


BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def review_figures(risks: Risks, criteria: ProjectCriteria) -> dict[str, Any]:
    """What review costs and buys: the expected bad share of non-gold work (its mean risk), the
    share sent to review so far, and what each budget would catch (`scoring.reliability.budget_table`)."""
    from goldstream.scoring.reliability import budget_table

    n, expected = risks.judged, risks.expected_bad_share
    return {
        "annotations_judged": n,
        "expected_bad_share": None if expected is None else round(expected, 4),
        "escalated_share": round(risks.escalated / n, 4) if n else None,
        "review_budget": criteria.escalation.review_budget,
        "budgets": budget_table(risks.hist, BUDGETS) if n else [],
    }


async def worker_report(settings: Settings, project_id: str, worker_id: str) -> dict[str, Any]:
    """One worker's standing: its level from all the evidence with its uncertainty, its
    qualification, its pace against the project's, its label confusions against known answers,
    and the drift test on its latest evidence."""
    from goldstream.scoring.policy import drift_flag, proficiency, worker_drift
    from goldstream.streams.state import level_of

    async with project_state(settings, project_id) as (store, criteria):
        view = await store.view(project_id, criteria, fresh=True)
        (totals,) = await store.totals([(project_id, worker_id)])
        level = level_of(view.model, totals)
        standing = proficiency(totals, criteria, level)
        (seq,) = await store.evidence([(project_id, worker_id)])
        found = worker_drift(seq, view.model, criteria)
        confusions = await store.confusions(project_id, worker_id)
        matrix: dict[str, dict[str, int]] = {}
        for (truth, given), n in sorted(confusions.items()):
            matrix.setdefault(truth or "(extra)", {})[given or "(missed)"] = n
        lb, ub = level.interval(criteria.proficiency.confidence)
        return {
            "project_id": project_id,
            "worker_id": worker_id,
            "state": standing.state.value,
            "items": standing.items,
            "known_answers": standing.known,
            "consensus_rounds": standing.rounds,
            "level": round(level.estimate, 4) if standing.estimate is not None else None,
            "level_sd": round(level.sd, 4) if standing.estimate is not None else None,
            "interval": [round(lb, 4), round(ub, 4)] if standing.estimate is not None else None,
            "mean_score": standing.mean_score,
            "project_median_time_on_task_s": view.pace.median_s,
            "confusions": matrix,
            "drift": None
            if found is None
            else {
                "statistic": round(found.statistic, 2),
                "from_item": found.at + 1,
                "of_items": len(seq),
                "before": round(found.before, 4),
                "after": round(found.after, 4),
                "recent": round(found.recent, 4),
                "alerting": drift_flag(None, found, criteria) == "firing",
            },
        }


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


async def emit_batch_verdict(settings: Settings, data: dict[str, Any]) -> None:
    """Publish a batch verdict as a QualityAlert (scope batch): firing = reject, resolved = accept."""
    from datetime import UTC, datetime

    from goldstream.schemas.messages import AlertScope, derive_id

    f1 = data["figures"].get("f1")
    reject = data["verdict"] == "reject"
    failing = [k for k, c in data["targets"].items() if not c["ok"]]
    alert = QualityAlert(
        event_id=derive_id("batch-verdict", data["project_id"], data["batch_id"], data["verdict"]),
        project_id=data["project_id"],
        scope=AlertScope.BATCH,
        scope_id=data["batch_id"],
        metric="batch_verdict",
        value=f1,
        target=(data["targets"].get("f1") or {}).get("target"),
        window="batch",
        severity="critical" if reject else "info",
        state="firing" if reject else "resolved",
        raised_at=datetime.now(UTC),
        detail=f"{data['verdict']}: " + (f"below target on {', '.join(failing)}" if failing else "all targets met"),
    )
    await publish(settings, [("alerts", alert.key, alert.to_bytes())])
