"""Round trips through the real services and the embedded pair: Kafka with goldstream's
serialisation and topics, Redis with goldstream's Lua scripts."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from goldstream.streams.state import Increment, Keys, Position, RedisState
from goldstream.streams.topics import Topics, delete_topics, ensure_topics
from redis.asyncio import Redis

from goldstream import schemas as s
from goldstream.services import Endpoints
from tests.conftest import OPS

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _annotation(n: int) -> s.AnnotationSubmitted:
    return s.AnnotationSubmitted(
        event_id=f"ev-{n}",
        project_id="p1",
        item_id=f"item-{n % 5}",
        worker_id=f"w{n % 3}",
        submitted_at=NOW,
        content=s.Content(
            objects=[
                s.AnnotatedObject(id="a", label="car", shape=s.BBox(x=n, y=2.5, w=10, h=20)),
                s.AnnotatedObject(id="b", label="road", shape=s.Polygon(points=[(0, 0), (n + 1, 0), (0, 7.25)])),
            ]
        ),
    )


async def _round_trip(ep: Endpoints, topics: Topics, n: int = 30) -> None:
    created = await ensure_topics(ep, topics, partitions=3)
    assert set(created) == set(topics.all().values())
    assert await ensure_topics(ep, topics, partitions=3) == []  # idempotent
    name = topics.name("annotations")
    sent = [_annotation(i) for i in range(n)]
    producer = AIOKafkaProducer(bootstrap_servers=ep.bootstrap_servers, **ep.producer_options())
    await producer.start()
    try:
        partition_of = {}
        for m in sent:
            meta = await producer.send_and_wait(name, m.to_bytes(), key=m.item_id.encode())
            assert partition_of.setdefault(m.item_id, meta.partition) == meta.partition
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=ep.bootstrap_servers,
        group_id=f"{name}-g",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[s.AnnotationSubmitted] = []
    try:
        async with asyncio.timeout(60):
            while len(got) < n:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for rec in records:
                        assert rec.partition == partition_of[rec.key.decode()]
                        got.append(s.AnnotationSubmitted.from_bytes(rec.value))
    finally:
        await consumer.stop()
    assert sorted(got, key=lambda m: m.event_id) == sorted(sent, key=lambda m: m.event_id)
    assert len(partition_of) == 5 and len(set(partition_of.values())) > 1


def test_kafka_round_trip_with_goldstream_serialisation(backend: Endpoints, topics: Topics) -> None:
    async def main() -> None:
        try:
            await _round_trip(backend, topics)
        finally:
            await delete_topics(backend, topics)

    asyncio.run(main())


def test_gold_and_projects_topics_are_compacted(services: Endpoints, topics: Topics) -> None:
    async def main() -> dict[str, str]:
        await ensure_topics(services, topics, partitions=2)
        admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap_servers)
        await admin.start()
        try:
            names = [topics.name(t) for t in ("gold", "projects", "annotations")]
            res = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
            policies = {}
            for response in res:
                for _err, _msg, _type, rname, configs in response.resources:
                    policies[rname] = {c[0]: c[1] for c in configs}["cleanup.policy"]
            return policies
        finally:
            await admin.close()
            await delete_topics(services, topics)

    policies = asyncio.run(main())
    assert policies == {
        topics.name("gold"): "compact",
        topics.name("projects"): "compact",
        topics.name("annotations"): "delete",
    }


def test_lua_apply_once_counts_each_event_once(backend: Endpoints, redis_keys: Keys) -> None:
    keys = redis_keys

    async def main() -> tuple[list[bool], list[bool], dict[str, float], dict[str, float]]:
        client = Redis.from_url(backend.redis_url)
        try:
            state = RedisState(client, keys, dedup_ttl_s=60)
            tag = keys.tag("p1", "w1")
            batch = [
                Increment(tag, f"e{i}", {"totals": {"items": 1, "score": 25 * i}, "label:car": {"tp": i % 2}})
                for i in range(4)
            ]
            first = await state.apply(batch)
            again = await state.apply([batch[1], batch[3]])  # a re-delivery
            ttl = await client.ttl(keys.seen(tag, "e0"))
            assert 0 < ttl <= 60
            return (
                first,
                again,
                await state.counters(keys.worker("p1", "w1")),
                await state.counters(keys.worker("p1", "w1", "label:car")),
            )
        finally:
            await client.aclose()

    first, again, totals, car = asyncio.run(main())
    assert first == [True] * 4 and again == [False, False]
    assert totals == {"items": 4, "score": 150}
    assert car == {"tp": 2}


def test_lua_apply_once_remembers_positions_per_stream_not_one_key_per_event(
    backend: Endpoints, redis_keys: Keys
) -> None:
    """Events are applied once by the position of the input they derive from and their id: a
    redelivered input's events sent again, and a batch that overlaps what was applied, change
    only what is new; one input's several events all count; the slot keeps two fields per
    stream and no key per event."""
    keys = redis_keys

    def inc(stream: str, offset: int, n: int = 0) -> Increment:
        return Increment(keys.tag("p1", "w1"), f"{stream}-{offset}-{n}", {"totals": {"items": 1, "sum": offset}},
                         at=Position(stream, offset))  # fmt: skip

    async def main() -> tuple[list[list[bool]], dict[str, int], dict[str, str], list[bytes]]:
        client = Redis.from_url(backend.redis_url)
        try:
            state = RedisState(client, keys, dedup_ttl_s=60)
            runs = [
                await state.apply([inc("s:0", o) for o in (3, 5, 8)] + [inc("s:1", 2)]),
                await state.apply([inc("s:0", o) for o in (3, 5, 8, 9)]),  # redelivered from 3, and 9 new
                await state.apply([inc("s:1", 1), inc("s:1", 4), inc("s:0", 9)]),  # below the mark, new, seen
                await state.apply([inc("s:0", 12), inc("s:0", 10)]),  # out of order in one call: both new
                await state.apply([inc("s:0", 12, 1), inc("s:0", 12, 2)]),  # more events of input 12
                await state.apply([inc("s:0", 12, 2), inc("s:0", 12), inc("s:0", 12, 3)]),  # again, and one more
            ]
            marks = await client.hgetall(keys.applied(keys.tag("p1", "w1")))
            names = [k async for k in client.scan_iter(match=f"{keys.prefix}:*")]
            applied = {k.decode(): v.decode() for k, v in marks.items()}
            return runs, await state.counters(keys.worker("p1", "w1")), applied, sorted(names)
        finally:
            await client.aclose()

    runs, totals, applied, names = asyncio.run(main())
    assert runs == [[True] * 4, [False, False, False, True], [False, True, False], [True, True], [True, True],
                    [False, False, True]]  # fmt: skip
    assert totals == {"items": 11, "sum": 3 + 5 + 8 + 2 + 9 + 4 + 10 + 12 * 4}
    assert applied == {"s:0": "12", "s:0@": "|s:0-12-0|s:0-12-1|s:0-12-2|s:0-12-3|", "s:1": "4", "s:1@": "|s:1-4-0|"}
    assert not [n for n in names if b":seen:" in n]
    assert len(names) == 2  # the totals and the applied positions


def test_time_buckets_keep_their_history_and_end_the_same_whatever_the_order(
    backend: Endpoints, redis_keys: Keys
) -> None:
    """A bucket hash keeps `keep` seconds behind its newest bucket: older buckets are deleted, and
    an increment arriving for one is dropped, so two orders of the same events leave the same
    buckets (what drives the deleting, '_lo', may differ)."""
    keys = redis_keys
    starts = [0, 100, 200, 300, 400, 500, 900, 200, 400, 1000, 100]

    def inc(tag: str, n: int, start: int, offset: int) -> Increment:
        return Increment(tag, f"e{n}", {"buckets": {f"{start}:n": 1, f"{start}:s": start}},
                         at=Position("s:0", offset), history={"buckets": (600, 100, ("n", "s"))})  # fmt: skip

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        client = Redis.from_url(backend.redis_url)
        try:
            state = RedisState(client, keys, dedup_ttl_s=60)
            forward, backward = keys.tag("p1", "fw"), keys.tag("p1", "bw")
            for n, start in enumerate(starts):  # one event per call: deleted as time goes on
                await state.apply([inc(forward, n, start, n)])
            order = [(i, n, start) for i, (n, start) in enumerate(list(enumerate(starts))[::-1])]
            await state.apply([inc(backward, n, start, i) for i, n, start in order[:4]])
            await state.apply([inc(backward, n, start, i) for i, n, start in order[4:]])
            return (
                await state.counters(keys.worker("p1", "fw", "buckets")),
                await state.counters(keys.worker("p1", "bw", "buckets")),
            )
        finally:
            await client.aclose()

    forward, backward = asyncio.run(main())
    kept = {k: v for k, v in forward.items() if not k.startswith("_")}
    assert kept == {"400:n": 2, "400:s": 800, "500:n": 1, "500:s": 500, "900:n": 1, "900:s": 900,
                    "1000:n": 1, "1000:s": 1000}  # fmt: skip
    assert {k: v for k, v in backward.items() if not k.startswith("_")} == kept
    assert forward["_hi"] == backward["_hi"] == 1000


def test_keys_of_one_worker_share_a_cluster_slot(keys: Keys) -> None:
    from redis.crc import key_slot

    names = [keys.applied(keys.tag("p", "w")), keys.worker("p", "w"), keys.worker("p", "w", "buckets")]
    assert len({key_slot(n.encode()) for n in names}) == 1
    project = [keys.applied(keys.tag("p")), keys.project("p"), keys.project("p", "label:car")]
    assert len({key_slot(n.encode()) for n in project}) == 1
    assert keys.tag("a:b", "c") != keys.tag("a", "b:c")


def test_redis_keeps_data_across_a_restart(services: Endpoints, ops_managed: bool, keys: Keys) -> None:
    if not ops_managed:
        pytest.skip("redis is not the one ops/dev manages; not restarting someone else's server")

    async def write() -> None:
        client = Redis.from_url(services.redis_url)
        await RedisState(client, keys).apply([Increment(keys.tag("p", "w"), "e1", {"totals": {"items": 3}})])
        await client.aclose()

    async def read() -> tuple[dict[str, float], list[bool]]:
        client = Redis.from_url(services.redis_url)
        state = RedisState(client, keys)
        try:
            again = await state.apply([Increment(keys.tag("p", "w"), "e1", {"totals": {"items": 3}})])
            return await state.counters(keys.worker("p", "w")), again
        finally:
            await client.delete(keys.worker("p", "w"), keys.seen(keys.tag("p", "w"), "e1"))
            await client.aclose()

    asyncio.run(write())
    subprocess.run([str(OPS), "restart", "redis"], check=True)
    totals, reapplied = asyncio.run(read())
    assert totals == {"items": 3}
    assert reapplied == [False]  # the dedup key survived too
