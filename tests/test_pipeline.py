"""The whole pipeline on the real Apache Kafka and redis-server: goldstream workers run as real
processes; events go in through Kafka and come out on the output topics and in Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream import schemas as s
from goldstream.commands import committed_to_end, group_members, rebuild_proficiency, report, set_criteria
from goldstream.services import Endpoints
from tests.conftest import drop_keys
from tests.pipeline import (
    Worker,
    live_snapshot,
    messages_of,
    replay_snapshot,
    send,
    supervised,
    unique_ids,
    wait_consumed,
    wait_for,
)
from tests.scenario import BAD, GOLD_CONTENT, GOOD, annotation, boxes, criteria, gold, review

pytestmark = pytest.mark.services


@pytest.fixture
def settings(services: Endpoints, run_id: str) -> Iterator[Settings]:
    st = Settings(
        kafka_bootstrap=services.bootstrap_servers,
        redis_url=services.redis_url,
        topic_prefix=f"pipe-{run_id}.",
        key_prefix=f"pipe-{run_id}",
        app_id=f"gs-{run_id}",
        partitions=4,
        consensus_check_s=2.0,
        health_port=0,
        stall_timeout_s=30.0,  # the watchdog, not the test, notices a stalled worker
    )
    asyncio.run(ensure_topics(services, Topics(st.topic_prefix), st.partitions))
    yield st
    asyncio.run(delete_topics(services, Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-replay", f"{st.key_prefix}-rebuilt"):
        asyncio.run(drop_keys(st.redis_url, prefix))


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(settings, tmp_path / "worker.log").start()
    yield w
    w.stop()


def _scenario() -> tuple[list[s.Message], dict]:
    """Gold items, a consensus item, a review with promotion; what each should produce."""
    c = criteria(consensus=s.ConsensusPolicy(overlap=3, timeout_s=1e9))
    good, bad = annotation(1, "g1", "w-good", GOOD), annotation(2, "g1", "w-bad", BAD)
    trio = [annotation(3, "free", "a", GOOD), annotation(4, "free", "b", GOLD_CONTENT), annotation(5, "free", "c", BAD)]
    reviewed = annotation(6, "i-rev", "w-rev", BAD)
    msgs: list[s.Message] = [
        gold("g1"),
        good,
        bad,
        *trio,
        reviewed,
        review(1, reviewed, s.Verdict.CORRECT, corrected=GOLD_CONTENT, promote=True),
    ]
    return [c, *msgs], {"scores": 2 + 3 + 1}


def test_stream_end_to_end(settings: Settings, worker: Worker, tmp_path: Path) -> None:
    msgs, expect = _scenario()
    asyncio.run(set_criteria(settings, msgs[0], wait_s=90))  # returns once a worker applied it
    bad_inputs = [
        ("annotations", b"\x00\xff not json"),
        ("annotations", b'{"event_id": "x1"}'),
        ("reviews", b'{"event_id": "r9", "verdict": "maybe"}'),
    ]
    t0 = time.monotonic()
    send(settings, msgs[1:], bad_inputs)
    wait_for(
        lambda: (
            len(unique_ids(settings, "scores", s.ScoreRecord)) >= expect["scores"]
            and len(unique_ids(settings, "deadletter", s.DeadLetter)) >= 3
        ),
        120,
        "scores and dead letters",
        [worker],
    )
    elapsed = time.monotonic() - t0

    scores = {(r.worker_id, r.kind.value): r for r in messages_of(settings, "scores", s.ScoreRecord)}
    assert scores[("w-good", "gold")].result.passed and not scores[("w-bad", "gold")].result.passed
    assert {w for w, k in scores if k == "consensus"} == {"a", "b", "c"}
    assert scores[("w-rev", "review")].reference_id == "rev-1"
    escalations = {(e.worker_id, tuple(e.reasons)) for e in messages_of(settings, "escalations", s.Escalation)}
    assert ("w-bad", (s.EscalationReason.GOLD_BELOW_THRESHOLD,)) in escalations
    assert ("c", (s.EscalationReason.CONSENSUS_BELOW_THRESHOLD,)) in escalations
    promoted = [g for g in messages_of(settings, "gold", s.GoldAnswer) if g.source == "review"]
    assert len(promoted) == 1 and promoted[0].item_id == "i-rev"
    dead = {d.raw: d for d in messages_of(settings, "deadletter", s.DeadLetter)}
    assert {dead[raw].reason for _, raw in bad_inputs} == {"undecodable", "schema"}
    assert all(
        d.source_topic == f"{settings.topic_prefix}{t}" and d.source_offset >= 0
        for (t, raw) in bad_inputs
        for d in [dead[raw]]
    )

    # Redis holds what a replay of the same events computes, and counts the dead letters
    wait_for(
        lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items") == expect["scores"],
        30,
        "proficiency",
        [worker],
    )
    live = live_snapshot(settings)
    assert live.pop("{deadletter}:counts") == {"schema": 2, "total": 3, "undecodable": 1}
    assert live == replay_snapshot(settings, msgs, f"{settings.key_prefix}-replay")
    print(f"\nend to end: {len(msgs) + 3} events in, {expect['scores']} scores out in {elapsed:.1f} s")

    # the scores topic rebuilds the same proficiency into an empty prefix
    applied, skipped = asyncio.run(rebuild_proficiency(settings, Keys(f"{settings.key_prefix}-rebuilt")))
    assert skipped == 0 and applied == expect["scores"]
    assert live_snapshot(settings, f"{settings.key_prefix}-rebuilt") == live

    data = asyncio.run(report(settings, "p1"))
    assert data["figures"]["items"] == expect["scores"] and data["workers"] == 6


def test_two_workers_in_one_group_share_the_partitions(settings: Settings, tmp_path: Path) -> None:
    asyncio.run(set_criteria(settings, criteria(), wait_s=0))
    workers = [Worker(settings, tmp_path / f"w{i}.log").start() for i in range(2)]
    topic = f"{settings.topic_prefix}annotations"
    try:
        wait_for(lambda: all(_assigned(w, topic) for w in workers), 120, "both workers in the group", workers)
        items = [f"g{i}" for i in range(24)]
        msgs: list[s.Message] = [gold(i) for i in items]
        msgs += [annotation(n, item, f"w{n % 5}", GOOD if n % 3 else BAD) for n, item in enumerate(items * 2)]
        t0 = time.monotonic()
        send(settings, msgs)

        def scored() -> int:
            return len(unique_ids(settings, "scores", s.ScoreRecord))

        # a stalled Faust worker (see the kill -9 test) is ended by its watchdog and restarted here
        restarts = supervised(
            lambda: scored() >= 48,
            300,
            "48 scores",
            workers,
            lambda i, n: Worker(settings, tmp_path / f"w{i}-{n}.log").start(),
        )
        took = time.monotonic() - t0
        assigned = [_assigned(w, topic) for w in workers]
        assert all(assigned), assigned  # each worker owns partitions of its own
        assert sorted(p for parts in assigned for p in parts) == list(range(settings.partitions)), assigned
        wait_for(lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items") == 48, 30, "counters", workers)
        print(f"\ntwo workers: {len(msgs)} events in, 48 scores out in {took:.1f} s ({restarts} restarts)")
    finally:
        for w in workers:
            w.stop()


def _assigned(worker: Worker, topic: str) -> list[int]:
    """The partitions of `topic` a worker's score step was last assigned, from its log."""
    parts: list[int] = []
    for line in worker.log.read_text(errors="replace").splitlines():
        found = re.search(r"assigned score (\S+): \[([\d, ]*)\]", line)
        if found and found.group(1) == topic:
            parts = [int(p) for p in found.group(2).split(",") if p.strip()]
    return parts


@pytest.mark.timeout(900)
def test_kill9_midstream_then_restart_equals_replay(settings: Settings, tmp_path: Path) -> None:
    """A worker killed mid-stream (SIGKILL: no clean shutdown, offsets not committed) and
    restarted leaves Redis exactly as a replay of the same events, and every score emitted."""
    c = criteria(consensus=s.ConsensusPolicy(overlap=2, timeout_s=1e9))
    msgs: list[s.Message] = [gold(f"g{i}") for i in range(40)]
    n = 0
    for rnd in range(12):
        for i in range(40):
            n += 1
            content = GOOD if (n * 7) % 10 > 2 else BAD
            msgs.append(annotation(n, f"g{i}", f"w{(i + rnd) % 8}", content, minutes=n))
    for i in range(30):  # consensus items
        for k in range(2):
            n += 1
            msgs.append(annotation(n, f"free{i}", f"w{(i + k) % 8}", GOOD if k or i % 4 else BAD, minutes=n))
    expected = 40 * 12 + 60
    first = Worker(settings, tmp_path / "first.log").start()
    asyncio.run(set_criteria(settings, c, wait_s=90))  # returns once the worker runs with them
    golds = [m for m in msgs if isinstance(m, s.GoldAnswer)]
    send(settings, golds)
    wait_consumed(settings, "gold")  # gold before annotations, as the replay has it
    annotations = [m for m in msgs if not isinstance(m, s.GoldAnswer)]
    # The kill lands mid-stream by construction, whatever the machine's speed: the first part of
    # the input goes in, the kill follows observed progress on it, and the rest is sent only
    # after the kill (it once finished all its work before a kill timed by a guess).
    head, tail = annotations[:160], annotations[160:]
    send(settings, head)
    wait_for(lambda: len(unique_ids(settings, "scores", s.ScoreRecord)) >= 40, 120, "the first scores", [first])
    first.kill9()
    killed_at = len(unique_ids(settings, "scores", s.ScoreRecord))
    assert killed_at <= len(head) < expected
    send(settings, tail)
    # as a supervisor with a back-off would: restart once the dead member's session has expired
    # (a worker joining while the group still waits for the dead one is where Faust stalled most)
    wait_for(lambda: asyncio.run(group_members(settings, settings.app_id))[1] == 0, 60, "the dead member to expire")
    # faust-streaming 0.15.3 sometimes stalls after such a restart (the worker says Ready and
    # consumes nothing): its watchdog ends it (EXIT_STALLED) and this test restarts it, as a
    # supervisor would, counting the restarts; the state must still equal the replay.
    t0 = time.monotonic()
    workers = [Worker(settings, tmp_path / "restart0.log").start()]
    try:
        restarts = supervised(
            lambda: len(unique_ids(settings, "scores", s.ScoreRecord)) >= expected,
            420,
            "every score",
            workers,
            lambda _, n: Worker(settings, tmp_path / f"restart{n}.log").start(),
        )
        wait_for(
            lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items") == expected,
            60,
            "proficiency of every score",
            workers,
        )
        took = time.monotonic() - t0
    finally:
        workers[0].stop()
    scores = messages_of(settings, "scores", s.ScoreRecord)
    assert len({r.event_id for r in scores}) == expected
    by_id: dict[str, s.ScoreRecord] = {}
    for r in scores:  # a re-delivered input re-emits the same record, never a different one
        assert by_id.setdefault(r.event_id, r) == r
    live = live_snapshot(settings)
    live.pop("{deadletter}:counts", None)
    assert live == replay_snapshot(settings, [c, *msgs], f"{settings.key_prefix}-replay")
    print(
        f"\nkill -9 after {killed_at} of {expected} scores ({restarts} watchdog restart(s)); the "
        f"restarted worker recovered its table and "
        f"finished in {took:.1f} s, {len(scores) - expected} scores re-emitted with identical ids"
    )


def test_consensus_timeout_closes_rounds_in_the_stream(settings: Settings, worker: Worker) -> None:
    c = criteria(consensus=s.ConsensusPolicy(overlap=5, min_annotators=2, timeout_s=1.0))
    asyncio.run(set_criteria(settings, c, wait_s=90))
    patient = criteria("p2", consensus=s.ConsensusPolicy(overlap=5, min_annotators=2, timeout_s=1e9))
    asyncio.run(set_criteria(settings, patient, wait_s=90))
    old = annotation(1, "slow", "a", GOOD, minutes=-600)  # submitted long ago: past the timeout
    send(settings, [old, annotation(2, "slow", "b", boxes(("car", 12, 10, 50, 40)), minutes=-600)])
    send(settings, [annotation(n, "kept", w, GOOD, project="p2", minutes=-600) for n, w in ((3, "a"), (4, "b"))])
    wait_for(lambda: len(unique_ids(settings, "scores", s.ScoreRecord)) >= 2, 120, "scores after the timeout", [worker])
    kinds = {r.kind for r in messages_of(settings, "scores", s.ScoreRecord)}
    assert kinds == {s.ScoreKind.CONSENSUS}
    # the closed round's item left the timer's index; p2's item waits in its two-worker set
    wait_for(lambda: _watched(settings) == {"2:p2": 1}, 60, "the timer index of the waiting item alone", [worker])


def _watched(settings: Settings) -> dict[str, int]:
    """Entries of the consensus timer's sets (`Keys.watched`), by '<workers>:<project>'."""
    from redis import Redis

    client = Redis.from_url(settings.redis_url)
    out: dict[str, int] = {}
    try:
        for key in client.scan_iter(match=f"{settings.key_prefix}:{{waiting}}:*:*:*"):
            workers_project = key.decode().split("}:", 1)[1].split(":", 1)[1]
            if n := client.zcard(key):
                out[workers_project] = out.get(workers_project, 0) + n
        return out
    finally:
        client.close()


def test_items_past_their_retention_leave_redis_and_a_late_review_of_one_is_dead_lettered(
    settings: Settings, tmp_path: Path
) -> None:
    """Item retention in the stream, on event time: a day's items are kept while they are within
    `item_retention_s` of the latest submission, then a marker, then nothing; a review of an
    expired item's annotation is dead-lettered as item_expired, one parked for an annotation that
    never came as review_unmatched. The counters keep every score."""
    from datetime import timedelta

    from redis import Redis

    kept = dataclasses.replace(settings, item_retention_s=86_400.0)
    c = criteria(consensus=s.ConsensusPolicy(overlap=2, timeout_s=1e9))
    asyncio.run(set_criteria(kept, c, wait_s=0))
    day = 1440  # minutes; day 0 is nine days ago (retention never looks past the wall clock)
    first = [annotation(n, f"d0-{n // 2}", f"w{n % 2}", GOOD, minutes=-9 * day + n) for n in range(8)]  # 4 rounds
    orphan = review(9, annotation(99, "d0-lost", "w9", GOOD, minutes=-9 * day), s.Verdict.APPROVE)  # never comes
    # retention's clock is per input partition: three days on, a round in every partition
    later = [annotation(100 + n, item, f"w{n % 2}", GOOD, minutes=-6 * day + n)
             for item in _one_item_per_partition("d3", kept.partitions) for n in range(2)]  # fmt: skip
    late_review = review(10, first[0], s.Verdict.APPROVE).model_copy(
        update={"reviewed_at": first[0].submitted_at + timedelta(days=3)}
    )
    ticks = _one_item_per_partition("d6", kept.partitions)
    final = [annotation(200 + n, item, f"w{n % 2}", GOOD, minutes=-3 * day + n) for n in range(2) for item in ticks]
    w = Worker(kept, tmp_path / "worker.log").start()
    r = Redis.from_url(kept.redis_url)

    def items() -> set[str]:
        return {k.decode().split("|", 1)[1].split("}")[0] for k in r.scan_iter(match=f"{kept.key_prefix}:{{item|*")}

    def markers() -> set[str]:
        found = set()
        for name in items():
            state = r.get(f"{kept.key_prefix}:{{item|{name}}}:state")
            if state is not None and b'"expired_at":null' not in state:
                found.add(name)
        return found

    try:
        send(kept, [*first, orphan])
        wait_for(lambda: len(unique_ids(kept, "scores", s.ScoreRecord)) >= 8, 120, "day 0's scores", [w])
        assert items() == {f"d0-{i}" for i in range(4)} | {"d0-lost"}
        send(kept, later)  # three days on: day 0's items fall out of retention when their partition moves
        wait_for(lambda: len(unique_ids(kept, "scores", s.ScoreRecord)) >= 16, 120, "day 3's scores", [w])
        send(kept, [late_review])
        letters = lambda: {d.reason for d in messages_of(kept, "deadletter", s.DeadLetter)}  # noqa: E731
        wait_for(lambda: {"item_expired", "review_unmatched"} <= letters(), 120, "the dead letters", [w])
        assert markers() >= {"d0-0"}  # the reviewed item's marker said why
        # six days on: the markers go too, swept at the event time a partition reached before a
        # batch (so the second annotations' batches sweep at the first ones' time)
        send(kept, final[: len(ticks)])
        stored = lambda: all(r.exists(f"{kept.key_prefix}:{{item|{i}}}:state") for i in ticks)  # noqa: E731
        wait_for(stored, 60, "day 6's first annotations stored", [w])
        send(kept, final[len(ticks) :])
        wait_for(lambda: len(unique_ids(kept, "scores", s.ScoreRecord)) >= 24, 120, "day 6's scores", [w])
        wait_for(lambda: not {i for i in items() if i.startswith("d0-")}, 60, "day 0's markers gone", [w])
        assert {i for i in items() if i.startswith("d3-")}  # still within the retention
        # the proficiency step applies scores after they are on the topic: wait for its commits
        wait_for(lambda: asyncio.run(committed_to_end(kept, f"{kept.app_id}-proficiency", "scores")), 60,
                 "the proficiency step to apply every score", [w])  # fmt: skip
        assert live_snapshot(kept)["{p1}:totals"]["items"] == 24  # every score counted, none twice
        (letter,) = [d for d in messages_of(kept, "deadletter", s.DeadLetter) if d.reason == "item_expired"]
        assert "item_retention_s" in letter.error and letter.source_offset >= 0
    finally:
        w.stop()
        r.close()


def _one_item_per_partition(stem: str, partitions: int) -> list[str]:
    """Item ids whose records land one in each partition (Kafka's default partitioner)."""
    from aiokafka.partitioner import murmur2

    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        item = f"{stem}-{n}"
        found.setdefault((murmur2(item.encode()) & 0x7FFFFFFF) % partitions, item)
        n += 1
    return [found[p] for p in range(partitions)]


def test_the_score_and_proficiency_steps_run_in_separate_processes(settings: Settings, tmp_path: Path) -> None:
    """`goldstream worker --steps score` and `--steps proficiency` together do what one worker
    does (a busy proficiency step then cannot hold the score step's event loop): every
    annotation scored, Redis equal to a replay."""
    from dataclasses import replace

    c = criteria()
    score = Worker(replace(settings, steps="score"), tmp_path / "score.log").start()
    prof = Worker(replace(settings, steps="proficiency"), tmp_path / "proficiency.log").start()
    try:
        # returns once the score step applied the criteria: an annotation read before them would
        # be scored with the defaults, and the replay applies them first
        asyncio.run(set_criteria(settings, c, wait_s=90))
        items = [f"g{i}" for i in range(6)]
        # each item's gold scores its annotations whichever topic the worker reads first
        msgs: list[s.Message] = [gold(i) for i in items]
        msgs += [annotation(n, item, f"w{n % 3}", GOOD if n % 3 else BAD) for n, item in enumerate(items * 2)]
        send(settings, msgs)
        wait_for(
            lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items") == 12, 120, "12 scores", [score, prof]
        )
        assert "steps score" in score.log.read_text() and "steps proficiency" in prof.log.read_text()
        assert "assigned proficiency" not in score.log.read_text()
        assert "assigned score" not in prof.log.read_text()
        assert live_snapshot(settings) == replay_snapshot(settings, [c, *msgs], f"{settings.key_prefix}-replay")
    finally:
        score.stop()
        prof.stop()


def test_a_worker_refuses_steps_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="steps must name some of proficiency, score"):
        Settings.load(environ={"GOLDSTREAM_STEPS": "score,proficency"})
