"""Soak: a million annotations through a real worker, with Redis memory, the worker's memory and
its restart recovery time sampled as the history grows (the scale issue's proof of boundedness).

    python -m benchmarks.soak [--annotations 1000000] [--checkpoints 10] [--days 60]
        [--retention-days 2] [--json benchmarks/results/soak.json] [--png benchmarks/results/soak.png]

The workload is generated here, fast and not by goldstream's simulator: 60 workers (15 % careless),
items of four boxes, three annotators each, 10 % of the items gold, 1 % of the annotations reviewed
(a fifth of those after the items' retention, which must dead-letter them as item_expired). Event
time runs over `--days`, ending before now (retention never looks past the wall clock).

The worker runs on the real Kafka of `ops/dev` and on a redis-server of its own (so that Redis'
memory is goldstream's alone). After each chunk has been applied (both consumer groups committed to
the end), the run samples Redis' `used_memory` and what its keys take by kind (`MEMORY USAGE`), the
worker's resident memory, and then its recovery: the worker is stopped, a new one started, and the
time until it has scored a probe annotation is measured. In the same run, the dedup keys the old
scheme wrote (two per score) are written for a sample of scores into a scratch database, to say what
they would have cost. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from goldstream.schemas import ConsensusPolicy, EscalationPolicy, LabelSpec, ProjectCriteria
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics
from redis import Redis

from goldstream.commands import committed_to_end, create_topics, endpoints, set_criteria
from goldstream.proc import WorkerProcess
from goldstream.services import die_with_parent

RESULTS = Path(__file__).parent / "results"
LABELS = ("car", "bus", "person", "bike")
PROJECT = "soak"


# ----------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Annotations (and the gold and reviews around them) in publishing order, as raw JSON."""

    annotations: int
    days: float
    retention_s: float
    seed: int = 7
    overlap: int = 3
    workers: int = 60
    t0: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.start = self.t0 - timedelta(days=self.days + 1)
        self.careless = self.rng.random(self.workers) < 0.15
        self.items = self.annotations // self.overlap
        self.late: list[tuple[float, bytes, bytes]] = []  # (event time, key, review) reviews held back
        self.reviews = {"sent": 0, "sent after retention": 0}

    def chunk(self, first_item: int, last_item: int) -> Iterator[tuple[str, bytes, bytes]]:
        """(topic, key, value) for items [first_item, last_item), reviews due by then included."""
        span = self.days * 86_400.0
        for k in range(first_item, last_item):
            at = self.start + timedelta(seconds=span * k / self.items)
            item = f"i{k}"
            truth = self._truth()
            if self.rng.random() < 0.1:
                yield "gold", item.encode(), orjson.dumps(self._gold(item, truth, at))
            who = self.rng.choice(self.workers, size=self.overlap, replace=False)
            for j, w in enumerate(who):
                when = at + timedelta(minutes=2 * j + 1)
                ann = self._annotation(item, f"a{k}-{j}", int(w), truth, when)
                yield "annotations", item.encode(), orjson.dumps(ann)
                if self.rng.random() < 0.01:
                    late = self.rng.random() < 0.2
                    delay = self.retention_s + 86_400 if late else 3600.0 * self.rng.random() * 2
                    review = self._review(ann, when + timedelta(seconds=delay))
                    review["late"] = late
                    self.late.append((when.timestamp() + delay, item.encode(), review))
            now = at.timestamp()
            due = [x for x in self.late if x[0] <= now]
            if due:
                self.late = [x for x in self.late if x[0] > now]
                for _, key, review in due:
                    self.reviews["sent"] += 1
                    self.reviews["sent after retention"] += int(review.pop("late"))
                    yield "reviews", key, orjson.dumps(review)

    def _truth(self) -> np.ndarray:
        xy = self.rng.uniform(0, [560, 400], size=(4, 2))
        wh = self.rng.uniform(30, 80, size=(4, 2))
        labels = self.rng.integers(0, len(LABELS), size=(4, 1))
        return np.hstack([xy, wh, labels])

    def _objects(self, boxes: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"id": f"o{n}", "label": LABELS[int(b[4])], "shape": {"type": "bbox", "x": round(float(b[0]), 1),
             "y": round(float(b[1]), 1), "w": round(float(b[2]), 1), "h": round(float(b[3]), 1)}}
            for n, b in enumerate(boxes)
        ]  # fmt: skip

    def _gold(self, item: str, truth: np.ndarray, at: datetime) -> dict[str, Any]:
        return {"event_id": f"g-{item}", "project_id": PROJECT, "item_id": item,
                "content": {"objects": self._objects(truth)}, "created_at": at.isoformat()}  # fmt: skip

    def _annotation(self, item: str, event_id: str, w: int, truth: np.ndarray, at: datetime) -> dict[str, Any]:
        noise, miss = (9.0, 0.25) if self.careless[w] else (2.0, 0.03)
        boxes = truth.copy()
        boxes[:, :4] += self.rng.normal(0, noise, size=(len(boxes), 4)) * [1, 1, 0.5, 0.5]
        boxes[:, 2:4] = np.maximum(boxes[:, 2:4], 5)
        boxes = boxes[self.rng.random(len(boxes)) >= miss]
        return {"event_id": event_id, "project_id": PROJECT, "item_id": item, "worker_id": f"w{w:02d}",
                "content": {"objects": self._objects(boxes)}, "submitted_at": at.isoformat(),
                "started_at": (at - timedelta(seconds=30 + 60 * self.rng.random())).isoformat()}  # fmt: skip

    def _review(self, ann: dict[str, Any], at: datetime) -> dict[str, Any]:
        return {"event_id": f"r-{ann['event_id']}", "project_id": PROJECT, "item_id": ann["item_id"],
                "annotation_event_id": ann["event_id"], "worker_id": ann["worker_id"], "reviewer_id": "expert",
                "verdict": "approve", "reviewed_at": at.isoformat()}  # fmt: skip


def criteria() -> ProjectCriteria:
    return ProjectCriteria(
        project_id=PROJECT,
        labels=[LabelSpec(name=x) for x in LABELS],
        consensus=ConsensusPolicy(overlap=3, timeout_s=10 * 365 * 86_400.0),
        escalation=EscalationPolicy(audit_rate_max=0.0, audit_rate_min=0.0),
    )


# ----------------------------------------------------------------------------- services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of the soak's own: its memory is goldstream's alone."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gs-soak-redis-"))
        self.port = free_port()
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(),
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except Exception:
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- sampling


def key_kind(name: str) -> str:
    """What a key of goldstream's holds, by its name (streams.state.Keys)."""
    if "{item|" in name:
        return "item states"
    if name.endswith((":applied",)):
        return "applied positions"
    if ":seen:" in name:
        return "dedup keys"
    if "{expiry}" in name or "{waiting}" in name:
        return "item indexes"
    return "counters"


def redis_sample(client: Redis) -> dict[str, Any]:
    info = client.info("memory")
    by_kind: dict[str, list[int]] = {}
    names = [k.decode() for k in client.scan_iter(count=5000)]
    for start in range(0, len(names), 5000):
        pipe = client.pipeline(transaction=False)
        chunk = names[start : start + 5000]
        for name in chunk:
            pipe.memory_usage(name, samples=0)
        for name, used in zip(chunk, pipe.execute(), strict=True):
            entry = by_kind.setdefault(key_kind(name), [0, 0])
            entry[0] += 1
            entry[1] += int(used or 0)
    return {
        "used_memory": int(info["used_memory"]),
        "keys": len(names),
        "by_kind": {k: {"keys": v[0], "bytes": v[1]} for k, v in sorted(by_kind.items())},
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def dedup_key_cost(url: str, scores: int = 20_000) -> float:
    """Bytes per score of the dedup keys the apply-once script wrote before this round (two per
    score, `<prefix>:{p|w}:seen:<id>` and `<prefix>:{p}:seen:<id>`, with a TTL), measured."""
    client = Redis.from_url(url.rsplit("/", 1)[0] + "/1")
    client.flushdb()
    before = int(client.info("memory")["used_memory"])
    pipe = client.pipeline(transaction=False)
    for n in range(scores):
        sid = uuid.uuid4().hex
        pipe.set(f"gs:{{soak|w{n % 60:02d}}}:seen:{sid}", "1", ex=7 * 86_400)
        pipe.set(f"gs:{{soak}}:seen:{sid}", "1", ex=7 * 86_400)
    pipe.execute()
    cost = (int(client.info("memory")["used_memory"]) - before) / scores
    client.flushdb()
    client.close()
    return cost


# ----------------------------------------------------------------------------- run


async def publish(settings: Settings, records: Iterator[tuple[str, bytes, bytes]]) -> int:
    topics = Topics(settings.topic_prefix)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, max_batch_size=262_144)
    await producer.start()
    n = 0
    try:
        pending = []
        for topic, key, value in records:
            pending.append(await producer.send(topics.name(topic), value, key=key))
            n += topic == "annotations"
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


async def drained(settings: Settings) -> bool:
    steps = [(settings.app_id, t) for t in ("annotations", "gold", "reviews")]
    steps.append((f"{settings.app_id}-proficiency", "scores"))
    for group, topic in steps:
        if not await committed_to_end(settings, group, topic):
            return False
    return True


def wait_drained(settings: Settings, worker: WorkerProcess, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"the worker exited: see {worker.log}")
        if asyncio.run(drained(settings)):
            return
        time.sleep(0.5)
    raise TimeoutError("the worker did not drain the chunk")


def recovery(settings: Settings, log: Path, redis: Redis, probe: int, at: datetime) -> tuple[WorkerProcess, float]:
    """Start a worker and time it until it has scored a probe annotation on a gold item, stamped
    with the event time the stream has reached (a probe from the future would move its
    partition's retention clock, and expire that partition's items early)."""
    started = time.monotonic()
    worker = WorkerProcess(settings, log).start()
    item = f"probe-{probe}"
    gold = {"event_id": f"g-{item}", "project_id": PROJECT, "item_id": item, "created_at": at.isoformat(),
            "content": {"objects": [{"id": "o0", "label": "car", "shape": {"type": "bbox", "x": 10, "y": 10,
                                                                         "w": 50, "h": 40}}]}}  # fmt: skip
    ann = {**gold, "event_id": f"a-{item}", "worker_id": f"probe-{probe}", "submitted_at": at.isoformat(),
           "started_at": (at - timedelta(seconds=30)).isoformat()}  # fmt: skip
    del ann["created_at"]
    asyncio.run(publish(settings, iter([("gold", item.encode(), orjson.dumps(gold)),
                                        ("annotations", item.encode(), orjson.dumps(ann))])))  # fmt: skip
    key = f"{settings.key_prefix}:{{{PROJECT}|probe-{probe}}}:totals"
    while not redis.hget(key, "items"):
        if not worker.alive():
            raise RuntimeError(f"the worker exited: see {log}")
        time.sleep(0.05)
    return worker, time.monotonic() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    own = OwnRedis()
    run_id = uuid.uuid4().hex[:8]
    settings = Settings.load(
        topic_prefix=f"soak-{run_id}.",
        key_prefix="gs",
        app_id=f"soak-{run_id}",
        redis_url=own.url,
        item_retention_s=args.retention_days * 86_400.0,
        health_port=0,
        stall_timeout_s=0.0,
    )
    workload = Workload(args.annotations, args.days, settings.item_retention_s)
    redis = Redis.from_url(own.url)
    logs = Path(tempfile.mkdtemp(prefix="gs-soak-logs-"))
    samples: list[dict[str, Any]] = []
    worker: WorkerProcess | None = None
    try:
        asyncio.run(create_topics(settings))
        asyncio.run(set_criteria(settings, criteria(), wait_s=0))
        worker = WorkerProcess(settings, logs / "worker-0.log").start()
        per_chunk = workload.items // args.checkpoints
        done, t_start = 0, time.monotonic()
        for n in range(args.checkpoints):
            first, last = n * per_chunk, (n + 1) * per_chunk if n < args.checkpoints - 1 else workload.items
            t0 = time.monotonic()
            sent = asyncio.run(publish(settings, workload.chunk(first, last)))
            done += sent
            wait_drained(settings, worker)
            took = time.monotonic() - t0
            assert worker.proc is not None
            sample = {
                "annotations": done,
                "chunk_s": round(took, 1),
                "chunk_rate": round(sent / took),
                "redis": redis_sample(redis),
                "worker_rss": rss_bytes(worker.proc.pid),
            }
            worker.stop()
            reached = workload.start + timedelta(days=workload.days * last / workload.items)
            worker, sample["recovery_s"] = recovery(settings, logs / f"worker-{n + 1}.log", redis, n, reached)
            samples.append(sample)
            r = sample["redis"]
            states = r["by_kind"].get("item states", {}).get("keys", 0)
            print(
                f"{done:>9,} annotations  {sample['chunk_rate']:>5}/s  redis {r['used_memory'] / 2**20:7.1f} MiB "
                f"({r['keys']:,} keys; item states {states:,})  worker {sample['worker_rss'] / 2**20:6.1f} MiB  "
                f"recovery {sample['recovery_s']:.2f} s",
                flush=True,
            )
        letters = redis.hgetall(f"{settings.key_prefix}:{{deadletter}}:counts")
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs",
            "annotations": done,
            "days": args.days,
            "retention_days": args.retention_days,
            "wall_s": round(time.monotonic() - t_start, 1),
            "samples": samples,
            "dead_letters": {k.decode(): int(v) for k, v in letters.items()},
            "reviews": {**workload.reviews, "scored": _review_scores(redis, settings)},
            "old_dedup_bytes_per_score": round(dedup_key_cost(own.url), 1),
            "scores_per_annotation": _scores_per_annotation(redis, settings),
        }
        return result
    finally:
        if worker is not None:
            worker.stop()
        redis.close()
        asyncio.run(delete_topics(endpoints(settings), Topics(settings.topic_prefix)))
        own.stop()


def _review_scores(redis: Redis, settings: Settings) -> int:
    return int(redis.hget(f"{settings.key_prefix}:{{{PROJECT}}}:totals", "review_items") or 0)


def _scores_per_annotation(redis: Redis, settings: Settings) -> float:
    totals = redis.hgetall(f"{settings.key_prefix}:{{{PROJECT}}}:totals")
    items = int(totals.get(b"items", 0))
    return round(items / max(int(totals.get(b"tot_n", 1)), 1), 3)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Slopes after warm-up (the first two checkpoints): per million annotations."""
    s = result["samples"]
    warm = s[2:] if len(s) > 3 else s
    x = np.array([p["annotations"] for p in warm]) / 1e6
    out = {}
    for name, values in (
        ("redis_used_memory_mib", [p["redis"]["used_memory"] / 2**20 for p in warm]),
        ("redis_beyond_counters_mib", [(p["redis"]["used_memory"] - _counters(p)) / 2**20 for p in warm]),
        ("worker_rss_mib", [p["worker_rss"] / 2**20 for p in warm]),
        ("recovery_s", [p["recovery_s"] for p in warm]),
    ):
        slope = float(np.polyfit(x, values, 1)[0]) if len(x) > 1 else 0.0
        out[name] = {"first": round(values[0], 2), "last": round(values[-1], 2), "slope_per_million": round(slope, 2)}
    old = result["old_dedup_bytes_per_score"] * result["scores_per_annotation"] * 1e6 / 2**20
    out["old_dedup_keys_mib_per_million"] = round(old, 1)
    return out


def _counters(sample: dict[str, Any]) -> int:
    return int(sample["redis"]["by_kind"].get("counters", {}).get("bytes", 0))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    x = [p["annotations"] / 1e6 for p in s]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    kinds = sorted({k for p in s for k in p["redis"]["by_kind"]})
    axes[0].plot(x, [p["redis"]["used_memory"] / 2**20 for p in s], "k-o", label="used_memory")
    for kind in kinds:
        axes[0].plot(x, [p["redis"]["by_kind"].get(kind, {}).get("bytes", 0) / 2**20 for p in s], "--", label=kind)
    old = result["old_dedup_bytes_per_score"] * result["scores_per_annotation"] / 2**20
    axes[0].plot(x, [p["annotations"] * old for p in s], ":", color="red", label="dedup keys of the old scheme")
    axes[0].set(title="Redis memory", xlabel="annotations (millions)", ylabel="MiB")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [p["worker_rss"] / 2**20 for p in s], "b-o")
    axes[1].set(title="worker resident memory", xlabel="annotations (millions)", ylabel="MiB", ylim=(0, None))
    axes[2].plot(x, [p["recovery_s"] for p in s], "g-o")
    axes[2].set(title="restart to first score", xlabel="annotations (millions)", ylabel="seconds", ylim=(0, None))
    fig.suptitle(f"goldstream soak: {result['annotations']:,} annotations over {result['days']:g} days of event time, "
                 f"item retention {result['retention_days']:g} days")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotations", type=int, default=1_000_000)
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--days", type=float, default=60.0, help="event time the annotations span")
    ap.add_argument("--retention-days", type=float, default=2.0, help="item_retention_s, in days")
    ap.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "soak.png")
    args = ap.parse_args(argv)
    result = run(args)
    result["summary"] = summarize(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.png)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
