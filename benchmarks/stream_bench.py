"""End-to-end throughput and latency on a real Apache Kafka broker and redis-server.

    python -m benchmarks.stream_bench [--quick] [--json benchmarks/results/stream.json]

Throughput: a simulated workload (10 boxes per item, 10 % gold, overlap 3) is published as fast
as the producer goes to workers that already run and hold the gold; the clock runs from the
first annotation sent to the moment every ScoreRecord is on Kafka *and* the proficiency group has
committed past the last one (Redis updated, alerts raised). The baseline, in the same run and on
the same events, is a Faust agent that only consumes and forwards (`benchmarks.forward_app`).
The configurations run in rounds, each in turn; the best run of each is kept, and each round's
own ratios too (a drift of the machine's speed then falls on both sides of a ratio).

Latency: one worker, annotations offered at fixed rates (25 / 50 / 75 % of the measured
one-worker maximum), each stamped with `submitted_at` as it is sent. A gold score's latency runs
from its annotation's `submitted_at` to the ScoreRecord arriving at a consumer; a consensus
score's from the `submitted_at` of the annotation that completed its round (the scores cannot
exist before that), which is what a review queue waiting on them sees.

Prints figures and ratios; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from goldstream.streams.memory import tune_gc
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, connect
from goldstream.streams.topics import Topics

from benchmarks.forward_app import FORWARDED
from goldstream import schemas as s
from goldstream.commands import committed_to_end, create_topics, group_members, publish, set_criteria
from goldstream.proc import WorkerProcess
from goldstream.simulator import ProjectSpec, ReviewSpec, Simulation, WorkerSpec, WorkforceSpec, simulate

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- workload


def workload(project_id: str, items: int, seed: int) -> Simulation:
    """The issue's realistic mix: 10 boxes per item, a scene class, 10 % gold, overlap 3."""
    rng = np.random.default_rng(seed)
    workers = [
        WorkerSpec(
            worker_id=f"w{i:02d}",
            speed_s=float(rng.uniform(15, 45)),
            miss_rate=float(rng.uniform(0.02, 0.2)),
            fp_rate=float(rng.uniform(0.02, 0.15)),
            loc_noise=float(rng.uniform(1.5, 8.0)),
            label_confusion=float(rng.uniform(0.0, 0.1)),
        )
        for i in range(12)
    ]
    spec = WorkforceSpec(
        seed=seed,
        projects=[
            ProjectSpec(
                project_id=project_id,
                items=items,
                labels=["car", "bus", "person", "bike", "truck"],
                shapes={"bbox": 1.0},
                objects_per_item=(10, 10),
                classifications={"scene": ["street", "highway", "parking"]},
                gold_rate=0.1,
                overlap=3,
                review=ReviewSpec(rate=0.0),
                criteria={"pass_threshold": 0.7},
            )
        ],
        workers=workers,
    )
    return simulate(spec)


def split(sim: Simulation) -> tuple[s.ProjectCriteria, list[s.GoldAnswer], list[s.AnnotationSubmitted]]:
    crit = next(m for t, m in sim.events if t == "projects")
    gold = [m for t, m in sim.events if t == "gold"]
    anns = [m for t, m in sim.events if t == "annotations"]
    assert isinstance(crit, s.ProjectCriteria)
    return crit, gold, anns  # type: ignore[return-value]


# ----------------------------------------------------------------------------- Kafka helpers


def fresh_settings(base: Settings, name: str) -> Settings:
    run = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    return replace(base, topic_prefix=f"{run}.", key_prefix=run, app_id=run)


async def create_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    await admin.start()
    try:
        if name not in set(await admin.list_topics()):
            await admin.create_topics([NewTopic(name, num_partitions=settings.partitions, replication_factor=1)])
    finally:
        await admin.close()


async def aof_rewrites(settings: Settings) -> int | None:
    """Redis's count of append-only-file rewrites so far (None: no such count). Each one forks
    and writes the whole dataset out, a core's worth of work for a few tenths of a second on the
    machine the benchmark shares: a latency probe reports how many fell inside it."""
    redis = connect(settings.redis_url, **settings.redis())
    try:
        value = (await redis.info("persistence")).get("aof_rewrites")
    finally:
        await redis.aclose()
    return None if value is None else int(value)


async def cleanup(settings: Settings) -> None:
    """Drop the run's topics (its own and Faust's changelogs) and its Redis keys."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith((settings.topic_prefix, settings.app_id))]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
    redis = connect(settings.redis_url, **settings.redis())
    try:
        async for key in redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()


async def wait_until(check: Any, timeout: float, what: str, workers: Sequence[WorkerProcess] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"a worker stopped while waiting for {what}:\n{w.tail()}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


async def wait_stable(
    settings: Settings, groups: Sequence[str], members: int, workers: Sequence[WorkerProcess]
) -> None:
    """Every group Stable with all its members: no rebalance left to happen inside the clock."""

    async def check() -> bool:
        for g in groups:
            state, n = await group_members(settings, g)
            if state != "Stable" or n != members:
                return False
        return True

    await wait_until(check, 120, f"{members} member(s) in {', '.join(groups)}", workers)


class Follower:
    """Reads an output topic from its start and notes when each record arrived."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        # (time.time() on arrival, the record's CreateTime in s (when the worker produced it), value)
        self.arrivals: list[tuple[float, float, bytes]] = []
        self._task: asyncio.Task | None = None
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            **self.settings.kafka(),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=10,
        )
        await consumer.start()
        parts = [TopicPartition(self.topic, p) for p in range(self.settings.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        self._task = asyncio.create_task(self._run(consumer))

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                self.arrivals.extend((now, r.timestamp / 1000, r.value) for r in records if r.value is not None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.consumer is not None:
            await self.consumer.stop()


# ----------------------------------------------------------------------------- CPU


def _jiffies(sessions: set[int], pids: set[int]) -> dict[int, int]:
    """CPU jiffies (user + system, every thread) of live processes: summed by session id for
    `sessions`, by pid for `pids`. A worker runs in its own session (`WorkerProcess`), so this
    counts any child it starts too; a process that exited is no longer counted, so read a worker
    before stopping it."""
    out = dict.fromkeys(sessions | pids, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone between the listing and the read
            continue
        # after "pid (comm)": state, ppid, pgrp, session, ..., utime, stime, and the children's it
        # reaped (cutime, cstime: Redis's AOF rewrites, which it forks, are its own work)
        spent = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        if int(fields[3]) in sessions:
            out[int(fields[3])] += spent
        if int(entry.name) in pids:
            out[int(entry.name)] += spent
    return out


def _machine_busy_jiffies() -> int:
    """Busy jiffies of every CPU since boot, from /proc/stat's first line: user, nice, system,
    irq and softirq; not idle or iowait, nor steal (the hypervisor's time for others); guest
    time is inside user already."""
    with open("/proc/stat", "rb") as fh:
        values = [int(v) for v in fh.readline().split()[1:]] + [0] * 10
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return user + nice + system + irq + softirq


def listener_pid(port: int) -> int | None:
    """The local process listening on TCP `port` (None: none this user can see): how the
    benchmark finds the broker and Redis it runs against, however they were started."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for entry in os.scandir("/proc") if inodes else ():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in inodes:
                    return int(entry.name)
            except OSError:  # that descriptor closed since the listing
                continue
    return None


def service_pids(settings: Settings) -> dict[str, int]:
    """The local Kafka broker and redis-server by name, where they listen on this machine."""
    from urllib.parse import urlsplit

    ports: dict[str, int] = {}
    with contextlib.suppress(ValueError, IndexError):  # not host:port: not attributed, not fatal
        ports["kafka"] = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    with contextlib.suppress(ValueError):
        ports["redis"] = urlsplit(settings.redis_url).port or 6379  # a unix socket: no listener found
    return {name: pid for name, port in ports.items() if (pid := listener_pid(port)) is not None}


class CpuMeter:
    """Where a timed part's CPU went: the workers' sessions, this harness, named services (the
    broker, Redis) and the rest of the machine (the OS, anything else). Why: a second worker can
    only add what the machine has spare, so the cores one worker's run keeps busy bound what two
    workers can reach on the same machine (`scaling_bound`), whatever either costs."""

    def __init__(self, sessions: Sequence[int], services: Mapping[str, int] | None = None) -> None:
        self.sessions = set(sessions)
        self.services = dict(services or {})
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1  # the machine's, as the busy time is the machine's
        self._start = self._sample()

    def _sample(self) -> tuple[float, int, dict[int, int], int]:
        busy = _machine_busy_jiffies()
        own = os.times()
        per = _jiffies(self.sessions, set(self.services.values()))
        return time.monotonic(), busy, per, round((own.user + own.system) * self.hz)

    def read(self, events: int) -> dict[str, float]:
        """Cores kept busy since the meter started (machine, workers, harness, each service, the
        rest), CPU ms per event, and the bound on scaling: all cores over those this part kept
        busy."""
        t1, busy1, per1, harness1 = self._sample()
        t0, busy0, per0, harness0 = self._start
        seconds = max(t1 - t0, 1e-9)

        def cores(jiffies: float) -> float:
            return jiffies / self.hz / seconds

        machine = cores(busy1 - busy0)
        workers = cores(sum(per1[k] - per0[k] for k in self.sessions))
        harness = cores(harness1 - harness0)
        services = {f"{name}_cores": cores(per1[pid] - per0[pid]) for name, pid in self.services.items()}
        rest = machine - workers - harness - sum(services.values())
        return {
            "seconds": round(seconds, 3),
            "machine_cores": round(machine, 3),
            "worker_cores": round(workers, 3),
            "harness_cores": round(harness, 3),
            **{k: round(v, 3) for k, v in services.items()},
            "rest_cores": round(max(rest, 0.0), 3),
            "cpu_ms_per_event": round(1000 * machine * seconds / events, 3) if events else math.nan,
            "worker_cpu_ms_per_event": round(1000 * workers * seconds / events, 3) if events else math.nan,
            "scaling_bound": round(self.cores / machine, 3) if machine > 0 else math.nan,
        }


# ----------------------------------------------------------------------------- throughput


@dataclass
class Run:
    name: str
    processes: int
    events: int
    seconds: float
    outputs: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.nan

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "processes": self.processes,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.rate, 1),
            **self.outputs,
        }


def envelopes_of(messages: Sequence[s.Message]) -> list[tuple[str, str, bytes]]:
    return [(m.topic, m.item_id, m.to_bytes()) for m in messages]  # type: ignore[attr-defined]


async def throughput(base: Settings, sim: Simulation, kind: str, processes: int, logs: Path) -> Run:
    """`kind`: 'goldstream' (workers) or 'forward' (the baseline), with `processes` processes."""
    settings = fresh_settings(base, f"{kind}{processes}")
    topics = Topics(settings.topic_prefix)
    crit, gold, anns = split(sim)
    await create_topics(settings)
    argv = None
    if kind == "forward":
        out_topic = settings.topic_prefix + FORWARDED
        await create_topic(settings, out_topic)
        argv = [sys.executable, "-m", "benchmarks.forward_app"]
    else:
        out_topic = topics.name("scores")
    workers = []
    for i in range(processes):
        w = WorkerProcess(settings, logs / f"{settings.app_id}-{i}.log")
        if argv:
            w.argv = argv
        workers.append(w.start())
    follower = Follower(settings, out_topic)
    try:
        groups = [settings.app_id] + ([f"{settings.app_id}-proficiency"] if kind == "goldstream" else [])
        if kind == "goldstream":
            await set_criteria(settings, crit, wait_s=120)
        await wait_stable(settings, groups, processes, workers)
        await publish(settings, envelopes_of(gold))
        await wait_until(lambda: committed_to_end(settings, settings.app_id, "gold"), 120, "gold consumed", workers)
        expected = len(anns) + (len(gold) if kind == "forward" else 0)
        await follower.start()
        items = envelopes_of(anns)
        quiet_harness()
        meter = CpuMeter([w.proc.pid for w in workers if w.proc is not None], service_pids(settings))
        t0 = time.time()
        await publish(settings, items)
        sent = time.time() - t0

        async def outputs_done() -> bool:
            if kind == "forward":
                return len(follower.arrivals) >= expected
            ids = {orjson.loads(v)["event_id"] for _, _, v in follower.arrivals}
            return len(ids) >= expected

        if kind == "goldstream":  # the moment Redis counted every score, to the poll's 5 ms
            t_redis = await applied_at(settings, crit.project_id, expected, 600, workers)
        await wait_until(outputs_done, 600, f"{expected} outputs on {out_topic}", workers)
        cpu = meter.read(len(anns))  # to the moment the harness saw the last output
        t_out = max(t for t, _, _ in follower.arrivals)
        t_end = t_out
        if kind == "goldstream":
            # and the proficiency group committed past them (not timed: each check opens clients)
            await wait_until(
                lambda: committed_to_end(settings, f"{settings.app_id}-proficiency", "scores"), 600, "Redis", workers
            )
            t_end = max(t_out, t_redis)
        extra: dict[str, Any] = {"publish_seconds": round(sent, 3), "cpu": cpu}
        if kind == "goldstream":
            esc = await _count(settings, topics.name("escalations"))
            extra.update({"scores": len(follower.arrivals), "escalations": esc})
        return Run(kind, processes, len(anns), t_end - t0, extra)  # type: ignore[arg-type]
    finally:
        await follower.stop()
        for w in workers:
            w.stop()
        await cleanup(settings)


WARMUP_S = 5.0
"""Seconds of a latency probe sent at its rate before the measured part (`latency`)."""


def quiet_harness() -> None:
    """Keep this process's own collector out of what it times: it holds every simulated
    workforce, and a full collection of that heap took 0.65-0.94 s here. One fell right after a
    latency probe's last send and stalled its producer and its follower, so the probe's last
    scores read about 1 s late. Everything held now is frozen (as a worker freezes its start-up
    objects) and the thresholds are a worker's."""
    tune_gc()


async def applied_at(
    settings: Settings, project_id: str, scores: int, timeout: float, workers: Sequence[WorkerProcess]
) -> float:
    """When the project's counters in Redis first held `scores` scores (polled every 5 ms).

    Why not the time `committed_to_end` answers: each of its checks opens a Kafka consumer and
    admin client and the checks are 0.2 s apart, so it observes the end up to a few hundred ms
    late, while the forwarder's end is its last event's exact arrival; that bias fell on
    goldstream alone, in runs of about 3 s."""
    redis = connect(settings.redis_url, **settings.redis())
    key = Keys(settings.key_prefix).project(project_id)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if int(await redis.hget(key, "items") or 0) >= scores:
                return time.time()
            if any(not w.alive() for w in workers):
                raise RuntimeError("a worker stopped while waiting for Redis")
            await asyncio.sleep(0.005)
    finally:
        await redis.aclose()
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {scores} scores in Redis")


async def _count(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka())
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.partitions)]
        begin, end = await consumer.beginning_offsets(parts), await consumer.end_offsets(parts)
        return sum(end[tp] - begin[tp] for tp in parts)
    finally:
        await consumer.stop()


# ----------------------------------------------------------------------------- latency


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50 / p95 / p99 in milliseconds (None when there is nothing to measure)."""
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "n": len(values),
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "max_ms": round(float(a.max()), 1),
    }


def latencies(
    stamps: dict[str, tuple[str, float]],
    arrivals: Sequence[tuple[float, float, bytes]],
    overlap: int,
    project: str,
    window: tuple[float, float] = (-math.inf, math.inf),
) -> dict[str, list[float]]:
    """Seconds from the submission a score waited for to its arrival, by score kind, and for
    both kinds split in two at the moment the worker produced the score (the record's
    CreateTime): `worker` (submission to produced: the annotation's trip to the broker, the
    worker's fetch and its batch) and `delivery` (produced to arrived: the acknowledgement, the
    follower's fetch).

    `stamps`: annotation event_id -> (item_id, submitted_at as epoch seconds). A consensus score
    waits for the annotation that completes its round (the `overlap`-th on the item); a round
    closed by timeout is left out, since its delay is the configured timeout, not the system's.
    `window` (epoch seconds, end excluded): only the scores whose wait started in it (a probe's
    warm-up and its measured part are read apart).
    """
    per_item: dict[str, list[float]] = {}
    for item, t in stamps.values():
        per_item.setdefault(item, []).append(t)
    for ts in per_item.values():
        ts.sort()
    out: dict[str, list[float]] = {"gold": [], "consensus": [], "timeout_closed": [], "worker": [], "delivery": []}
    seen: set[str] = set()
    for arrived, produced, value in arrivals:
        rec = orjson.loads(value)
        if rec["project_id"] != project or rec["event_id"] in seen or rec["annotation_event_id"] not in stamps:
            continue
        seen.add(rec["event_id"])
        item, submitted = stamps[rec["annotation_event_id"]]
        if rec["kind"] == "gold":
            start = submitted
            if not window[0] <= start < window[1]:
                continue
            out["gold"].append(arrived - start)
        elif rec["kind"] == "consensus":
            ts = per_item[item]
            if len(ts) < overlap:
                out["timeout_closed"].append(arrived - submitted)
                continue
            start = ts[overlap - 1]
            if not window[0] <= start < window[1]:
                continue
            out["consensus"].append(arrived - start)
        else:
            continue
        out["worker"].append(produced - start)
        out["delivery"].append(arrived - produced)
    return out


async def offer(settings: Settings, anns: Sequence[s.AnnotationSubmitted], rate: float) -> dict[str, tuple[str, float]]:
    """Send annotations at `rate` per second, each stamped with submitted_at = the moment it is sent."""
    topic = Topics(settings.topic_prefix).name("annotations")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka(), linger_ms=5)
    await producer.start()
    stamps: dict[str, tuple[str, float]] = {}
    pending = []
    start = time.monotonic()
    try:
        for n, a in enumerate(anns):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = datetime.now(UTC)
            took = a.submitted_at - a.started_at if a.started_at else timedelta(0)
            stamped = a.model_copy(update={"submitted_at": now, "started_at": now - took})
            stamps[a.event_id] = (a.item_id, now.timestamp())
            pending.append(await producer.send(topic, stamped.to_bytes(), key=a.item_id.encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return stamps


async def latency(
    base: Settings,
    max_rate: float,
    fractions: Sequence[float],
    seconds: float,
    logs: Path,
    split_steps: bool = False,
    warmup_s: float = WARMUP_S,
) -> list:
    """One worker; for each offered rate a workload of its own (own project), gold loaded first,
    then `warmup_s` of annotations at the rate before the `seconds` that are measured (as the
    OpenMessaging Benchmark runs a warm-up before its test phase): a project's first moments
    (its first standings, its model's first fits, the first sends on a new producer) are a
    transient of their own, reported apart as `warmup`.
    `split_steps`: the worker's two steps in two processes (`--steps score`, `--steps proficiency`)."""
    settings = fresh_settings(base, "latency-split" if split_steps else "latency")
    topics = Topics(settings.topic_prefix)
    await create_topics(settings)
    steps = ("score", "proficiency") if split_steps else ("score,proficiency",)
    workers = [
        WorkerProcess(replace(settings, steps=step), logs / f"{settings.app_id}-{step}.log").start() for step in steps
    ]
    follower = Follower(settings, topics.name("scores"))
    rows = []
    try:
        await follower.start()
        for k, f in enumerate(fractions):
            rate = max_rate * f
            n = max(int(rate * (warmup_s + seconds)), 60)
            sim = workload(f"lat{int(f * 100)}", max(math.ceil(n / 3.1), 20), seed=100 + k)
            crit, gold, anns = split(sim)
            # an item's annotators work on it at about the same time (a labeling tool hands it to
            # all of them at once), so rounds complete as steadily as annotations arrive; in the
            # simulator's order they would all complete near the end of a short run
            first: dict[str, datetime] = {}
            for a in anns:
                first.setdefault(a.item_id, a.submitted_at)
            anns = sorted(anns, key=lambda a: (first[a.item_id], a.submitted_at))[:n]
            await set_criteria(settings, crit, wait_s=120)
            if k == 0:
                await wait_stable(settings, [settings.app_id, f"{settings.app_id}-proficiency"], 1, workers)
            await publish(settings, envelopes_of(gold))
            await wait_until(lambda: committed_to_end(settings, settings.app_id, "gold"), 120, "gold", workers)
            quiet_harness()
            rewrites = await aof_rewrites(settings)
            t0 = time.monotonic()
            stamps = await offer(settings, anns, rate)
            offered_s = time.monotonic() - t0
            # wait for the scores of every completed round (rounds short of `overlap` wait for a timeout)
            per_item: dict[str, int] = {}
            for item, _ in stamps.values():
                per_item[item] = per_item.get(item, 0) + 1
            gold_items = {g.item_id for g in gold}
            expected = sum(c for item, c in per_item.items() if item in gold_items or c >= crit.consensus.overlap)

            async def done(stamps: dict = stamps, expected: int = expected, project: str = crit.project_id) -> bool:
                got = {
                    r["annotation_event_id"]
                    for _, _, v in follower.arrivals
                    if (r := orjson.loads(v))["project_id"] == project
                }
                return len(got & set(stamps)) >= expected

            await wait_until(done, 300, f"{expected} scores at {f:.0%}", workers)
            rewrites_after = await aof_rewrites(settings)
            measured_from = min(t for _, t in stamps.values()) + warmup_s
            overlap, project = crit.consensus.overlap, crit.project_id
            lat = latencies(stamps, follower.arrivals, overlap, project, (measured_from, math.inf))
            warm = latencies(stamps, follower.arrivals, overlap, project, (-math.inf, measured_from))
            rows.append(
                {
                    "fraction_of_max": f,
                    "offered_per_s": round(rate, 1),
                    "achieved_offer_per_s": round(len(anns) / offered_s, 1),
                    "annotations": len(anns),
                    "all": percentiles(lat["gold"] + lat["consensus"]),
                    "gold": percentiles(lat["gold"]),
                    "consensus": percentiles(lat["consensus"]),
                    "worker": percentiles(lat["worker"]),
                    "delivery": percentiles(lat["delivery"]),
                    "warmup_s": warmup_s,
                    "warmup": percentiles(warm["gold"] + warm["consensus"]),
                    # Redis's AOF rewrites from the first send to the last score (warm-up included)
                    "redis_aof_rewrites": None if None in (rewrites, rewrites_after) else rewrites_after - rewrites,
                }
            )
    finally:
        await follower.stop()
        for worker in workers:
            worker.stop()
        await cleanup(settings)
    return rows


# ----------------------------------------------------------------------------- main


async def run(base: Settings, quick: bool, logs: Path, repeat: int) -> dict[str, Any]:
    items = 300 if quick else 2000
    sim = workload("tp", items, seed=2026)
    runs: list[Run] = []
    configs = (("forward", 1), ("goldstream", 1), ("forward", 2), ("goldstream", 2))
    tries: dict[tuple[str, int], list[Run]] = {c: [] for c in configs}
    # rounds of every configuration in turn, not one configuration's runs in a row: this machine's
    # speed drifts by a third within an hour (docs/benchmarks.md), so a slow spell falls on both
    # sides of a ratio alike; each round's own ratios are kept beside the best runs'
    for _ in range(repeat):  # best of `repeat`: a shared 2-core machine only ever slows a run down
        for kind, procs in configs:
            r = await throughput(base, sim, kind, procs, logs)
            c = r.outputs["cpu"]
            print(
                f"  {kind:<11}{procs} process(es): {r.events} annotations in {r.seconds:6.2f} s = {r.rate:7.1f}/s; "
                f"cores busy {c['machine_cores']:.2f} (workers {c['worker_cores']:.2f}, Kafka "
                f"{c.get('kafka_cores', math.nan):.2f}, Redis {c.get('redis_cores', math.nan):.2f}, harness "
                f"{c['harness_cores']:.2f}, the rest {c['rest_cores']:.2f}), {c['cpu_ms_per_event']:.3f} CPU ms each"
            )
            tries[(kind, procs)].append(r)
    for config in configs:
        best = max(tries[config], key=lambda r: r.rate)
        best.outputs["tries_per_s"] = [round(r.rate, 1) for r in tries[config]]  # type: ignore[assignment]
        runs.append(best)
    by = {(r.name, r.processes): r for r in runs}
    rounds = [{c: tries[c][i].rate for c in configs} for i in range(repeat)]
    paired = {
        "goldstream_vs_forward_1": [r[("goldstream", 1)] / r[("forward", 1)] for r in rounds],
        "goldstream_vs_forward_2": [r[("goldstream", 2)] / r[("forward", 2)] for r in rounds],
        "goldstream_2_vs_1_workers": [r[("goldstream", 2)] / r[("goldstream", 1)] for r in rounds],
    }
    print("  each round's ratios: " + "; ".join(f"{k} {' '.join(f'{v:.2f}' for v in vs)}" for k, vs in paired.items()))
    one = by[("goldstream", 1)].rate
    seconds, warmup = (6.0, 2.0) if quick else (25.0, WARMUP_S)
    lat = await latency(base, one, (0.25, 0.5, 0.75), seconds, logs, warmup_s=warmup)
    # the same rates with the worker's two steps in two processes (`goldstream worker --steps`)
    lat_split = await latency(base, one, (0.25, 0.5, 0.75), seconds, logs, split_steps=True, warmup_s=warmup)
    for label, row in [("", r) for r in lat] + [(" split", r) for r in lat_split]:
        a = row["all"]
        print(
            f"  latency{label} at {row['fraction_of_max']:.0%} ({row['offered_per_s']}/s): "
            f"p50 {a['p50_ms']} ms, p95 {a['p95_ms']} ms, p99 {a['p99_ms']} ms (n={a['n']}); "
            f"until produced p50 {row['worker']['p50_ms']} / p99 {row['worker']['p99_ms']} ms, "
            f"then delivered p50 {row['delivery']['p50_ms']} / p99 {row['delivery']['p99_ms']} ms; "
            f"the {row['warmup_s']:.0f} s warm-up before: p99 {row['warmup']['p99_ms']} ms; "
            f"Redis AOF rewrites meanwhile: {row['redis_aof_rewrites']}"
        )
    return {
        "workload": {
            "items": items,
            "boxes_per_item": 10,
            "gold_rate": 0.1,
            "overlap": 3,
            "annotations": runs[0].events,
        },
        "throughput": [r.row() for r in runs],
        "ratios": {
            "goldstream_vs_forward_1": round(one / by[("forward", 1)].rate, 3),
            "goldstream_vs_forward_2": round(by[("goldstream", 2)].rate / by[("forward", 2)].rate, 3),
            "goldstream_2_vs_1_workers": round(by[("goldstream", 2)].rate / one, 3),
            "forward_2_vs_1": round(by[("forward", 2)].rate / by[("forward", 1)].rate, 3),
            # what two workers could reach at most: the cores there are over those one worker's run kept busy
            "goldstream_scaling_bound": by[("goldstream", 1)].outputs["cpu"]["scaling_bound"],
            "forward_scaling_bound": by[("forward", 1)].outputs["cpu"]["scaling_bound"],
        },
        # the same ratios within each round (runs minutes apart), and their median
        "ratios_by_round": {k: [round(v, 3) for v in vs] for k, vs in paired.items()},
        "ratios_median_of_rounds": {k: round(statistics.median(vs), 3) for k, vs in paired.items()},
        "latency": lat,
        "latency_split_steps": lat_split,
        "partitions": base.partitions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small workload (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "stream.json")
    ap.add_argument("--repeat", type=int, default=0, help="rounds of throughput runs, best kept (default 3)")
    args = ap.parse_args()
    base = Settings.load(partitions=4, log_level="warning")
    logs = Path(tempfile.mkdtemp(prefix="goldstream-bench-"))
    print(f"stream benchmark on {base.kafka_bootstrap} and {base.redis_url} (worker logs: {logs})")
    figures = asyncio.run(run(base, args.quick, logs, args.repeat or (1 if args.quick else 3)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures["ratios"]))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
