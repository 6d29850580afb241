"""Faults on the real services: Redis restarted, Redis emptied, the broker restarted, a stalled
consumer, a crashed app, a stop signal during an outage. Each test runs workers as real processes
against a Kafka and a redis-server of this module's own (ops/dev with another state directory and
ports), so that restarting them disturbs no other test, and ends by comparing Redis with a replay
of the same events: nothing lost, nothing counted twice.

Every wait is on observed progress (scores on the topic, a line in the worker's log, a process
that exited), never on a guess of how fast the machine is; the input that must arrive during a
fault is held back and sent only once the fault is observed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics
from goldstream.streams.watchdog import EXIT_CRASHED, EXIT_STATE_LOST
from redis import Redis

from goldstream import schemas as s
from goldstream.commands import set_criteria
from goldstream.services import Endpoints
from tests.conftest import OPS, drop_keys
from tests.pipeline import (
    Worker,
    WorkerExited,
    live_snapshot,
    replay_snapshot,
    send,
    supervised,
    unique_ids,
    wait_consumed,
    wait_for,
)
from tests.scenario import BAD, GOOD, annotation, criteria, gold

pytestmark = pytest.mark.services

KAFKA_PORT = int(os.environ.get("GOLDSTREAM_FAULTS_KAFKA_PORT", "29292"))
REDIS_PORT = int(os.environ.get("GOLDSTREAM_FAULTS_REDIS_PORT", "26579"))


@dataclasses.dataclass
class Private:
    """A Kafka and a redis-server for this module only, managed by ops/dev."""

    env: dict[str, str]
    endpoints: Endpoints

    def dev(self, *args: str) -> None:
        subprocess.run([str(OPS), *args], env=self.env, check=True, capture_output=True, timeout=300)

    def redis(self) -> Redis:
        return Redis.from_url(self.endpoints.redis_url)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    state = tmp_path_factory.mktemp("faults-ops")
    env = {
        **os.environ,
        "GOLDSTREAM_OPS_DIR": str(state),
        "GOLDSTREAM_KAFKA_PORT": str(KAFKA_PORT),
        "GOLDSTREAM_REDIS_PORT": str(REDIS_PORT),
        "GOLDSTREAM_KAFKA_HEAP": "384m",
    }
    ep = Endpoints(f"127.0.0.1:{KAFKA_PORT}", f"redis://127.0.0.1:{REDIS_PORT}/0", "external")
    p = Private(env, ep)
    p.dev("down", "redis")  # a redis-server an interrupted run left on this port would be taken for ours
    p.dev("up")
    yield p
    p.dev("down")


@pytest.fixture
def settings(private: Private, run_id: str) -> Iterator[Settings]:
    st = Settings(
        kafka_bootstrap=private.endpoints.bootstrap_servers,
        redis_url=private.endpoints.redis_url,
        topic_prefix=f"fault-{run_id}.",
        key_prefix=f"fault-{run_id}",
        app_id=f"gs-{run_id}",
        partitions=4,
        consensus_check_s=2.0,
        health_port=0,
        stall_timeout_s=20.0,
        watch_every_s=1.0,
    )
    asyncio.run(ensure_topics(private.endpoints, Topics(st.topic_prefix), st.partitions))
    yield st
    private.dev("up")  # whatever a test did to them
    asyncio.run(delete_topics(private.endpoints, Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-replay"):
        asyncio.run(drop_keys(st.redis_url, prefix))


CRITERIA = criteria(consensus=s.ConsensusPolicy(overlap=2, timeout_s=1e9))


def workload() -> tuple[list[s.GoldAnswer], list[s.AnnotationSubmitted], int]:
    """Gold items with several rounds of annotations, then consensus items (overlap 2); the
    number of scores they make. The consensus items score only with the project's criteria
    (the defaults ask for three annotators), so they also prove the criteria were kept."""
    golds = [gold(f"g{i}") for i in range(20)]
    anns: list[s.AnnotationSubmitted] = []
    n = 0
    for rnd in range(8):
        for i in range(20):
            n += 1
            content = GOOD if (n * 7) % 10 > 2 else BAD
            anns.append(annotation(n, f"g{i}", f"w{(i + rnd) % 6}", content, minutes=n))
    for i in range(20):
        for k in range(2):
            n += 1
            anns.append(annotation(n, f"free{i}", f"w{(i + k) % 6}", GOOD if k or i % 4 else BAD, minutes=n))
    return golds, anns, 8 * 20 + 20 * 2


def start(settings: Settings, log: Path) -> Worker:
    return Worker(settings, log).start()


def begin(settings: Settings, worker: Worker, head: int = 60) -> tuple[list[s.Message], list[s.Message], int]:
    """Criteria and gold in, then the first `head` annotations, until some are scored. Returns
    (every message sent or to send, the held-back rest, the number of scores expected)."""
    golds, anns, expected = workload()
    asyncio.run(set_criteria(settings, CRITERIA, wait_s=90))
    send(settings, golds)
    wait_consumed(settings, "gold")
    send(settings, anns[:head])
    wait_for(lambda: scored(settings) >= 20, 120, "the first scores", [worker])
    return [CRITERIA, *golds, *anns], list(anns[head:]), expected


def scored(settings: Settings) -> int:
    return len(unique_ids(settings, "scores", s.ScoreRecord))


def finish(settings: Settings, workers: list[Worker], everything: list[s.Message], expected: int) -> None:
    """Every score out, every score applied, and Redis equal to a replay of the same events.
    A worker restarted right after another left without leaving its group sometimes stalls
    (faust-streaming, docs/pipeline.md): its watchdog ends it, and it is restarted here."""
    n = len(workers)
    supervised(
        lambda: scored(settings) >= expected,
        300,
        "every score",
        workers,
        lambda i, k: Worker(settings, workers[i].log.with_name(f"{workers[i].log.stem}-r{n + k}.log")).start(),
    )
    wait_for(
        lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items") == expected,
        120,
        "every score applied",
        workers,
    )
    live = live_snapshot(settings)
    live.pop("{deadletter}:counts", None)
    assert live == replay_snapshot(settings, everything, f"{settings.key_prefix}-replay")


def log_lines(worker: Worker | Path, pattern: str) -> list[str]:
    path = worker if isinstance(worker, Path) else worker.log
    return [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def log_time(line: str) -> float:
    """The wall-clock time of a Faust log line ('[2026-11-30 17:30:10,394] ...')."""
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
    assert stamp, line
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(600)
def test_a_redis_restart_mid_stream_is_waited_out_and_redis_equals_a_replay(
    private: Private, settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    settings = dataclasses.replace(settings, health_port=port)
    worker = start(settings, tmp_path / "worker.log")
    try:
        everything, rest, expected = begin(settings, worker)
        wait_for(lambda: probe(port, "/ready") == 200, 60, "the worker ready", [worker])
        assert probe(port, "/healthz") == 200
        private.dev("down", "redis")
        send(settings, rest)  # held back until Redis is gone: this work meets the outage
        wait_for(lambda: log_lines(worker, "Redis unreachable"), 120, "the worker to see the outage", [worker])
        wait_for(lambda: probe(port, "/ready") == 503, 60, "/ready to report the outage", [worker])
        assert probe(port, "/healthz") == 200  # waiting out an outage is alive, not ready
        at_outage = scored(settings)
        time.sleep(10)  # the fault's length (not a guess of speed): several capped backoffs
        private.dev("up", "redis")
        finish(settings, [worker], everything, expected)
        assert worker.alive()
        down, back = log_lines(worker, "Redis unreachable"), log_lines(worker, "Redis is back")
        assert len(down) == 1 and len(back) == 1, (down, back)  # once each way, not per retry
        took = log_time(back[0]) - log_time(down[0])
        print(f"\nredis restart: {at_outage}/{expected} scores out when it went; waited out {took:.1f} s")
        proc = worker.proc
        assert proc is not None
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # a plain stop: the batch in hand, a commit, leave the group
        assert proc.wait(settings.shutdown_timeout_s + 5) == 0
        print(f"SIGTERM: stopped cleanly in {time.monotonic() - t0:.1f} s")
    finally:
        worker.stop()


@pytest.mark.timeout(600)
def test_a_redis_emptied_mid_stream_is_never_counted_from_zero_but_rebuilt_from_the_topics(
    private: Private, settings: Settings, tmp_path: Path
) -> None:
    workers = [start(settings, tmp_path / "first.log")]
    try:
        everything, rest, expected = begin(settings, workers[0])
        wait_for(lambda: live_snapshot(settings).get("{p1}:totals", {}).get("items", 0) >= 20, 60, "counters")
        with private.redis() as r:
            r.flushall()  # a failover to an empty replica, or an operator's mistake
        send(settings, rest)
        with pytest.raises(WorkerExited) as exited:
            wait_for(lambda: False, 120, "the worker to notice", workers)
        assert exited.value.returncode == EXIT_STATE_LOST
        assert log_lines(workers[0], "Redis lost goldstream's state")
        t0 = time.monotonic()
        workers[0] = start(settings, tmp_path / "second.log")
        finish(settings, workers, everything, expected)
        rebuilt = log_lines(workers[0], "Redis state rebuilt")
        assert rebuilt, workers[0].tail()
        took = time.monotonic() - t0
        print(f"\nredis emptied: exit {EXIT_STATE_LOST}; {rebuilt[0].split(': ', 1)[-1]}; done in {took:.1f} s")
    finally:
        workers[0].stop()


@pytest.mark.timeout(600)
def test_a_broker_restart_mid_stream_loses_nothing(private: Private, settings: Settings, tmp_path: Path) -> None:
    workers = [start(settings, tmp_path / "w0.log")]
    try:
        everything, rest, expected = begin(settings, workers[0])
        t0 = time.monotonic()
        private.dev("restart", "kafka")
        send(settings, rest)  # after the broker is back: the worker must resume by itself
        restarts = supervised(
            lambda: scored(settings) >= expected,
            300,
            "every score after the broker restart",
            workers,
            lambda _, n: start(settings, tmp_path / f"w{n}.log"),
        )
        finish(settings, workers, everything, expected)
        print(f"\nbroker restart: recovered in {time.monotonic() - t0:.1f} s, {restarts} watchdog restart(s)")
    finally:
        workers[0].stop()


@pytest.mark.timeout(600)
def test_a_stalled_consumer_is_ended_by_the_watchdog_and_its_restart_finishes_the_work(
    private: Private, settings: Settings, tmp_path: Path
) -> None:
    faulty = dataclasses.replace(settings, fault="stall:80")  # pauses its consumer after 80 events
    workers = [start(faulty, tmp_path / "stalls.log")]
    try:
        everything, rest, expected = begin(settings, workers[0], head=160)
        send(settings, rest)
        restarts = supervised(
            lambda: scored(settings) >= expected,
            300,
            "every score",
            workers,
            lambda _, n: start(settings, tmp_path / f"restart{n}.log"),
        )
        assert restarts == 1
        stalled = log_lines(tmp_path / "stalls.log", "fault injection|stalled:")
        assert len(stalled) == 2, stalled
        detected = log_time(stalled[1]) - log_time(stalled[0])
        assert detected >= settings.stall_timeout_s - 2 * settings.watch_every_s  # not on a mere pause
        finish(settings, workers, everything, expected)
        print(f"\nstall: ended by the watchdog {detected:.1f} s after it began (stall_timeout_s 20)")
    finally:
        workers[0].stop()


@pytest.mark.timeout(300)
def test_a_crashed_app_exits_non_zero_within_ten_seconds(settings: Settings, tmp_path: Path) -> None:
    worker = start(dataclasses.replace(settings, fault="crash:30"), tmp_path / "crash.log")
    try:
        golds, anns, _ = workload()
        asyncio.run(set_criteria(settings, CRITERIA, wait_s=90))
        send(settings, [*golds, *anns])
        with pytest.raises(WorkerExited) as exited:
            wait_for(lambda: False, 120, "the crash", [worker])
        seen = time.time()
        assert exited.value.returncode == EXIT_CRASHED
        (crash,) = log_lines(worker, "fault injection")
        assert log_lines(worker, "the score step raised RuntimeError: injected crash")
        assert seen - log_time(crash) <= 10.0 + 1.0  # the bound, plus this test's 1 s poll
        print(f"\ncrash: exited {exited.value.returncode} {seen - log_time(crash):.1f} s after the crash")
    finally:
        worker.stop()


@pytest.mark.timeout(600)
def test_a_stop_signal_during_a_redis_outage_ends_the_worker_and_a_restart_loses_nothing(
    private: Private, settings: Settings, tmp_path: Path
) -> None:
    workers = [start(settings, tmp_path / "first.log")]
    try:
        everything, rest, expected = begin(settings, workers[0])
        private.dev("down", "redis")
        send(settings, rest)
        wait_for(lambda: log_lines(workers[0], "Redis unreachable"), 120, "the outage seen", workers)
        proc = workers[0].proc
        assert proc is not None
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(settings.shutdown_timeout_s + 10)
        stopped = time.monotonic() - t0
        private.dev("up", "redis")
        workers[0] = start(settings, tmp_path / "second.log")
        finish(settings, workers, everything, expected)
        print(f"\nSIGTERM during a Redis outage: exited {proc.returncode} in {stopped:.1f} s")
    finally:
        workers[0].stop()
