"""The rules that keep a worker either working or gone, and the Redis guard, one at a time.

The processes themselves (a stalled consumer ended by its watchdog, a crashed app that exits, an
outage waited out) are exercised on the real services in tests/test_faults.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest
from goldstream.streams.state import Keys, RedisGuard, RedisState, StateLost
from goldstream.streams.waiting import Waiting
from goldstream.streams.watchdog import (
    EXIT_CRASHED,
    EXIT_HUNG,
    EXIT_STATE_LOST,
    Health,
    HealthServer,
    Lifeline,
    Progress,
    total_lag,
)
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from goldstream.services import Endpoints
from tests.conftest import on_redis


def test_a_worker_with_lag_is_stalled_only_once_nothing_moved_for_the_whole_timeout() -> None:
    p = Progress(stall_timeout_s=60)
    assert p.observe(("a", 1), lag=5, now=0) is None
    assert p.observe(("a", 1), lag=5, now=59) is None
    assert p.observe(("a", 2), lag=5, now=100) is None  # progress restarts the clock
    assert p.observe(("a", 2), lag=5, now=159) is None
    reason = p.observe(("a", 2), lag=5, now=160)
    assert reason is not None and "5 record(s) of lag" in reason


def test_a_worker_without_lag_is_idle_not_stalled() -> None:
    p = Progress(stall_timeout_s=10)
    for t in range(0, 100, 5):
        assert p.observe(("same",), lag=0, now=t) is None


def test_a_reset_outage_or_rebalance_restarts_the_stall_clock() -> None:
    p = Progress(stall_timeout_s=10)
    p.observe(("x",), lag=3, now=0)
    p.reset(now=9)
    assert p.observe(("x",), lag=3, now=12) is None  # a new reading after the reset, not a stall


def test_lag_counts_records_past_the_committed_offset_and_all_of_a_partition_never_committed() -> None:
    assert total_lag({"a": 10, "b": -1}, {"a": 15, "b": 4}) == 5 + 4


def lifeline(crash: BaseException | None = None, **kw: float) -> Lifeline:
    return Lifeline(
        crashed=lambda: crash,
        health=Health(beat=kw.pop("beat", None)),
        shutdown_timeout_s=kw.pop("shutdown_timeout_s", 30.0),
        loop_block_s=kw.pop("loop_block_s", 120.0),
        crash_grace_s=kw.pop("crash_grace_s", 3.0),
    )


def test_a_crashed_app_is_given_a_short_grace_then_the_process_exits_non_zero() -> None:
    life = lifeline(RuntimeError("boom"))
    assert life.verdict(100.0) is None  # Faust may still stop and exit by itself
    code, why = life.verdict(103.0)  # type: ignore[misc]
    assert code == EXIT_CRASHED and "boom" in why


def test_a_redis_that_lost_the_state_exits_with_its_own_status() -> None:
    life = lifeline(StateLost("gone"), crash_grace_s=0.0)
    assert life.verdict(1.0) == (EXIT_STATE_LOST, "the app crashed (StateLost: gone)")


def test_a_stop_signal_not_obeyed_within_the_shutdown_timeout_ends_the_process() -> None:
    life = lifeline(shutdown_timeout_s=30.0)
    life.stop_requested = 1000.0
    assert life.verdict(1029.0) is None
    assert life.verdict(1031.0)[0] == EXIT_HUNG  # type: ignore[index]


def test_an_event_loop_that_stopped_turning_ends_the_process_but_not_before_it_ever_turned() -> None:
    assert lifeline(beat=None, loop_block_s=10).verdict(1e9) is None  # still starting
    life = lifeline(beat=100.0, loop_block_s=10)
    assert life.verdict(109.0) is None
    assert life.verdict(111.0)[0] == EXIT_CRASHED  # type: ignore[index]


def test_the_probes_say_alive_and_ready_from_a_thread_of_their_own() -> None:
    health = Health(beat=time.monotonic())
    server = HealthServer(health, 0, loop_block_s=60, host="127.0.0.1")
    server.start()

    def get(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw.startswith(b"{") else {}

    try:
        assert get("/healthz")[0] == 200
        status, body = get("/ready")
        assert status == 503 and body["reason"] == "starting"
        health.ready, health.reason, health.lag = True, "ok", 0
        assert get("/ready") == (200, {**body, "ready": True, "reason": "ok", "lag": 0})
        health.stalled = "no progress"
        assert get("/healthz")[0] == 503 and get("/ready")[0] == 503
        assert get("/nope")[0] == 404
    finally:
        server.server.shutdown()


class _Pool:
    async def disconnect(self, inuse_connections: bool = True) -> None:
        return None


class _Client:
    """What `RedisGuard` touches of a client on its own: the pool it empties after an outage."""

    connection_pool = _Pool()


def test_the_guard_waits_out_an_outage_with_capped_backoff_and_logs_it_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    failures = iter([redis_errors.ConnectionError("down")] * 9)

    async def call() -> str:
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return "ok"

    guard = RedisGuard(_Client(), base_s=0.1, cap_s=1.0, sleep=sleep)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="streams.state"):
        assert asyncio.run(guard.run(call, "test")) == "ok"
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "unreachable" in messages[0] and "back after" in messages[1]
    assert not guard.down and guard.outages == 1


def test_the_guard_times_out_a_call_that_never_answers_as_an_outage_and_runs_it_again() -> None:
    """The worker's client has no socket timeout (redis-py armed a timer per reply); its guard
    gives each call a deadline instead, so a Redis that stops answering is still an outage."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()  # never answers
        return "ok"

    async def sleep(s: float) -> None:
        return None

    guard = RedisGuard(_Client(), sleep=sleep, timeout_s=0.05)  # type: ignore[arg-type]
    assert asyncio.run(guard.run(call, "test")) == "ok"
    assert len(calls) == 2 and guard.outages == 1 and guard.retries == 1 and not guard.down


@pytest.mark.services
def test_reads_refuse_a_redis_whose_epoch_is_gone_instead_of_reading_zeros(services: Endpoints, keys: Keys) -> None:
    async def main() -> None:
        client = Redis.from_url(services.redis_url)
        try:
            await client.set(keys.epoch(), "e1")
            state = RedisState(client, keys, guard=RedisGuard(client, epoch_key=keys.epoch()))
            assert await state.counters(keys.worker("p", "w")) == {}  # adopts e1
            await client.delete(keys.epoch())  # a flush, as far as this prefix is concerned
            with pytest.raises(StateLost, match="gone"):
                await state.counters(keys.worker("p", "w"))
            await client.set(keys.epoch(), "e2")  # someone else's new state
            with pytest.raises(StateLost, match="changed"):
                await state.counters(keys.worker("p", "w"))
        finally:
            await client.delete(keys.epoch())
            await client.aclose()

    asyncio.run(main())


@pytest.mark.services
def test_an_item_state_is_written_only_over_the_state_it_was_derived_from(services: Endpoints, keys: Keys) -> None:
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemConflict, ItemStore

    async def main(client: Redis) -> None:
        items = ItemStore(RedisState(client, keys))
        entry = Waiting(datetime.fromtimestamp(10.0, UTC), "p", 2)
        s1, s2, late = (ItemState(active_at=t).encode() for t in (1.0, 2.0, 3.0))
        await items.store({"i": s1}, {"i": (0, None, entry)}, {})  # a new item
        assert await items.load(["i", "j"]) == {"i": s1[0]}
        held, _ = await items.load_due(["i"], {})
        await items.store({"i": s2}, {"i": (0, entry, None)}, held)  # the owner moves on
        await items.store({"i": s2}, {}, held)  # the same write again (a retry) is fine
        with pytest.raises(ItemConflict):  # a worker still holding s1 must not set it back
            await items.store({"i": late}, {"i": (0, None, entry)}, held, {"i": (0, 99.0)})
        assert await items.load(["i"]) == {"i": s2[0]}
        # nor put it back in the timer's index, nor in retention's
        assert await items.watched([0], rules, 1e9) == []
        assert await client.zrange(keys.expiry(0), 0, -1) == []

    on_redis(services, keys, main)


@pytest.mark.services
def test_an_item_state_is_stored_as_a_head_and_each_annotation_once(services: Endpoints, keys: Keys) -> None:
    """A state holds every annotation of its item and is written after each of its inputs: each
    write carries the head and only the annotations the hash lacks, and removes those the state
    no longer has. A whole state written before the split loads as it is and is split when next
    written."""
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemStore

    from tests.scenario import GOOD, annotation

    a1, a2, a3 = (annotation(n, "i", f"w{n}", GOOD) for n in (1, 2, 3))
    first = ItemState(annotations=[a1, a2], waiting=[a1.event_id, a2.event_id], active_at=1.0)
    second = first.with_annotation(a3)
    third = second.model_copy(update={"annotations": [a2, a3], "waiting": []})  # a1 left the item
    old = ItemState(annotations=[a1], active_at=5.0)

    async def main(client: Redis) -> list[Any]:
        hash_ = keys.item_annotations("i")
        items = ItemStore(RedisState(client, keys))
        seen: list[Any] = []
        await items.store({"i": first.encode()}, {}, {})
        seen += [await client.hlen(hash_), (await client.get(keys.item("i")))[:1], await items.load(["i"])]
        await client.hset(hash_, a1.event_id, b"untouched")  # a write that carried a1 again would reset it
        held, _ = await items.load_due(["i"], {})
        await items.store({"i": second.encode()}, {}, held)
        seen += [sorted(await client.hkeys(hash_)), await client.hget(hash_, a1.event_id)]
        await client.hset(hash_, a1.event_id, a1.model_dump_json())
        held, _ = await items.load_due(["i"], {})
        seen.append(held["i"].full == second.encode()[0])
        await items.store({"i": third.encode()}, {}, held)
        seen += [sorted(await client.hkeys(hash_)), await items.load(["i"])]
        await client.delete(hash_)  # an item written before the split: one whole JSON
        await client.set(keys.item("i"), old.model_dump_json())
        held, _ = await items.load_due(["i"], {})
        seen.append(ItemState.model_validate_json(held["i"].full) == old)
        await items.store({"i": first.encode()}, {}, held)
        seen += [sorted(await client.hkeys(hash_)), await items.load(["i"])]
        held, _ = await items.load_due(["i"], {})
        await items.store({"i": (b"", {})}, {}, held)  # retention deletes the item
        seen.append(await client.exists(keys.item("i"), hash_))
        return seen

    seen = on_redis(services, keys, main)
    ids = [a.event_id.encode() for a in (a1, a2, a3)]
    assert seen[:3] == [2, b"@", {"i": first.encode()[0]}]  # a head; loads byte for byte as encoded
    assert seen[3:6] == [sorted(ids), b"untouched", True]  # a3 added, a1 not written again
    assert seen[6:8] == [sorted(ids[1:]), {"i": third.encode()[0]}]  # a1 removed with the state's
    assert seen[8] is True  # the whole state loads as it is
    assert seen[9:11] == [sorted(ids[:2]), {"i": first.encode()[0]}]  # and is split when written
    assert seen[11] == 0


@pytest.mark.services
def test_a_state_parsed_afresh_is_stored_again_as_it_loads_whatever_bytes_its_annotations_came_in(
    services: Endpoints, keys: Keys
) -> None:
    """An annotation's JSON is stored as it arrived (spliced, not dumped again), which need not be
    how pydantic dumps it. A worker that parses the state afresh (a restart, a rebalance, a state
    fallen out of its cache) splices the hash's own bytes back when it writes: else every load
    would differ from what the worker kept, and it would parse and dump the whole state each time."""
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemStore
    from goldstream.streams.worker import ParsedItems

    from tests.scenario import GOOD, annotation

    a1, a2 = annotation(1, "i", "w1", GOOD), annotation(2, "i", "w2", GOOD)
    arrived = json.dumps(json.loads(a1.model_dump_json()), sort_keys=True, indent=1).encode()  # not pydantic's
    first = ItemState().with_annotation(a1)

    async def main(client: Redis) -> list[bool]:
        items = ItemStore(RedisState(client, keys))
        await items.store({"i": first.encode(ParsedItems().known(["i"], [(a1, arrived)]))}, {}, {})
        held, _ = await items.load_due(["i"], {})
        cold = ParsedItems()  # another worker: nothing kept
        parsed = cold.parse({"i": held["i"].full})
        second = {"i": parsed["i"].with_annotation(a2)}
        encoded = second["i"].encode(cold.known(["i"], [], second, held))
        await items.store({"i": encoded}, {}, held)
        again, _ = await items.load_due(["i"], {})
        return [arrived in held["i"].full, again["i"].full == encoded[0]]

    assert on_redis(services, keys, main) == [True, True]


@pytest.mark.services
def test_an_annotation_missing_from_its_hash_is_left_out_of_the_state_not_fatal(
    services: Endpoints, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemStore

    from tests.scenario import GOOD, annotation

    a1, a2 = annotation(1, "i", "w1", GOOD), annotation(2, "i", "w2", GOOD)
    both = ItemState(annotations=[a1, a2])

    async def main(client: Redis) -> bytes:
        items = ItemStore(RedisState(client, keys))
        await items.store({"i": both.encode()}, {}, {})
        await client.hdel(keys.item_annotations("i"), a1.event_id)  # evicted, or deleted by hand
        return (await items.load(["i"]))["i"]

    with caplog.at_level(logging.ERROR):
        loaded = on_redis(services, keys, main)
    assert ItemState.model_validate_json(loaded).annotations == [a2]
    assert a1.event_id in caplog.text


@pytest.mark.services
def test_the_timer_moves_entries_its_states_do_not_name_and_drains_the_old_index(
    services: Endpoints, keys: Keys
) -> None:
    """Entries can be left behind (an earlier version's index; a worker that died between a
    batch's states and its entries): the timer moves each to where the item's state puts it."""
    from goldstream.streams.items import ItemState
    from goldstream.streams.settings import Settings
    from goldstream.streams.worker import Worker

    from tests.scenario import GOOD, annotation

    pair = [annotation(1, "x", "w1", GOOD), annotation(2, "x", "w2", GOOD)]
    x = ItemState(annotations=pair, waiting=[a.event_id for a in pair])
    solo = ItemState(annotations=[annotation(3, "solo", "w1", GOOD)], waiting=["ann-3"])
    since = pair[0].submitted_at.timestamp()

    async def rules_p1(projects: set[str]) -> dict[str, tuple[float, int] | None]:
        return {p: (60.0, 2) for p in projects}

    async def main(client: Redis) -> list[Any]:
        worker = Worker(Settings.load(redis_url=services.redis_url, key_prefix=keys.prefix))
        try:
            await client.set(keys.epoch(), "e1")
            await worker.items.store({"x": x.encode(), "solo": solo.encode()}, {}, {})  # no entries written
            await client.zadd(keys.waiting(0), {"x": since, "solo": since, "gone": since})  # the old index
            await client.zadd(keys.watched(0, 3, "p1"), {"x": since})  # a set left behind
            await client.sadd(keys.watch_sets(0), "3:p1")
            found = await worker.items.watched([0], rules_p1, since + 1e6)
            states = worker.parsed.parse(await worker.items.load(["x", "solo"]))
            misplaced = [c for c in found if worker._misplaced(c, states.get(c.item_id))]
            await worker.rewatch(misplaced)
            after = await worker.items.watched([0], rules_p1, since + 1e6)
            return [len(found), len(misplaced), [(c.item_id, c.found_in) for c in after]]
        finally:
            await worker.redis.aclose()

    seen = on_redis(services, keys, main)
    # all four entries were misplaced; x now waits in its two-worker set alone; solo (one worker)
    # and gone (no state) are not watched
    assert seen[:2] == [4, 4]
    assert seen[2] == [("x", keys.watched(0, 2, "p1"))]


@pytest.mark.services
def test_an_entry_the_state_keeps_is_written_again_with_it(services: Endpoints, keys: Keys) -> None:
    """An item whose entry did not change (the same worker answered again, a review came) may
    have none in the sets: an earlier version's item, indexed in the old set only, which the
    write drains. Its entry is written with its state whatever it was."""
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemStore

    entry = Waiting(datetime.fromtimestamp(100.0, UTC), "p", 2)

    async def main(client: Redis) -> list[Any]:
        items = ItemStore(RedisState(client, keys))
        await client.zadd(keys.waiting(0), {"i": 100.0})  # indexed by an earlier version
        await items.store({"i": ItemState(active_at=2.0).encode()}, {"i": (0, entry, entry)}, {})
        found = await items.watched([0], rules, 1000.0)
        return [(c.item_id, c.found_in) for c in found]

    assert on_redis(services, keys, main) == [("i", keys.watched(0, 2, "p"))]


async def rules(projects: set[str]) -> dict[str, tuple[float, int] | None]:
    """Round rules as `ItemProcessor.round_rules` gives them: p times out after 60 s with two
    workers, q needs three, r never closes (no criteria)."""
    known = {"p": (60.0, 2), "q": (60.0, 3), "r": None}
    return {k: known[k] for k in projects}


@pytest.mark.services
def test_the_timer_reads_only_items_whose_round_can_be_due_and_the_old_index_whole(
    services: Endpoints, keys: Keys
) -> None:
    from goldstream.streams.items import ItemState
    from goldstream.streams.state import ItemStore

    def at(t: float, project: str = "p", workers: int = 2) -> Waiting:
        return Waiting(datetime.fromtimestamp(t, UTC), project, workers)

    async def main(client: Redis) -> list[Any]:
        items = ItemStore(RedisState(client, keys))
        await client.zadd(keys.waiting(0), {"old": 5.0})  # written by an earlier version
        await items.store(
            {k: ItemState().encode() for k in "abcde"},
            {"a": (0, None, at(100)), "b": (0, None, at(950)), "c": (0, None, at(100, "q", 2)),
             "d": (0, None, at(100, "r", 5)), "e": (1, None, at(100))},
            {},
        )  # fmt: skip
        brief = lambda found: [(c.item_id, c.since) for c in found]  # noqa: E731
        seen = [brief(await items.watched([0], rules, 1000.0))]
        # c's third worker makes its round closable; a's round closed; the old entry's item moved on
        later = ItemState(active_at=1.0).encode()
        await items.store({"c": later, "a": later, "old": later},
                          {"c": (0, at(100, "q", 2), at(100, "q", 3)), "a": (0, at(100), None),
                           "old": (0, None, None)},
                          (await items.load_due(["a", "c"], {}))[0])  # fmt: skip
        seen += [brief(await items.watched([0], rules, 1000.0)), brief(await items.watched([0, 1], rules, 2000.0))]
        seen.append(sorted(m.decode() for m in await client.smembers(keys.watch_sets(0))))
        seen.append(sorted(items.legacy_empty))
        return seen

    seen = on_redis(services, keys, main)
    # at 1000: a is due (and b's since is not old enough; c and d cannot close), with the old entry;
    # then c is due, a and the old entry are gone; at 2000 b is due too, and e in partition 1
    assert seen[0] == [("a", 100.0), ("old", 5.0)]
    assert seen[1] == [("c", 100.0)]
    assert seen[2] == [("b", 950.0), ("c", 100.0), ("e", 100.0)]
    # c's old set was unlisted once found empty; d's stays listed (r's rounds never close: unread)
    assert seen[3] == ["2:p", "3:q", "5:r"]
    assert seen[4] == [0, 1]
