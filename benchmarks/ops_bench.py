"""What operating goldstream costs: the worker's Prometheus metrics per annotation, and the
query API's answer times, on the QC benchmark's workload in the redis-server of `ops/dev`.

    python -m benchmarks.ops_bench [--quick] [--json benchmarks/results/ops.json]

- **Metrics**: a worker counts what it emitted and times each batch (`streams.metrics.Metrics`:
  `emitted` after Kafka acknowledged a batch's outputs, `batch_done` per batch). The same calls
  are made here on the outputs of a `goldstream replay` of the workload, in its batches of 500,
  and their time is set against the replay's own time per annotation in the same run (what the
  worker's engine and Redis cost per annotation), i.e. with and without metrics.
- **API**: the leaderboard, labels, report and one worker's page of the replayed project,
  answered by `goldstream serve`'s queries against that Redis: answer-time percentiles. They read;
  they add nothing per annotation (the only write-path addition is two counter fields per score,
  a worker's time on task, inside the score's existing Lua call).

Prints figures and ratios; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from goldstream.streams.engine import Record
from goldstream.streams.memory import tune_gc
from goldstream.streams.metrics import Metrics
from goldstream.streams.replay import BATCH, replay
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, connect

from benchmarks.qc_bench import independent_case
from benchmarks.replay_bench import _clear
from goldstream.simulator import key_of

RESULTS = Path(__file__).parent / "results"


async def run(settings: Settings, items: int, requests: int) -> dict[str, Any]:
    from goldstream.api import Api

    case = independent_case(1, items)
    records = [Record(t, m.to_bytes(), key_of(t, m).encode(), 0, i) for i, (t, m) in enumerate(case.events)]
    n_ann = sum(1 for r in records if r.topic == "annotations")
    project = next(m.project_id for t, m in case.events if t == "annotations")
    redis = connect(settings.redis_url, **settings.redis())
    prefix = f"bench-ops-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.perf_counter()
        result = await replay(records, redis, Keys(prefix), close_rounds=True, batch=BATCH)
        replay_s = time.perf_counter() - t0
        outputs = [m for msgs in result.outputs.values() for m in msgs]
        metrics = Metrics()
        stamps = [int(time.time() * 1000)] * len(records)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for start in range(0, len(records), BATCH):
                metrics.batch_done("score", stamps[start : start + BATCH])
            metrics.emitted(outputs)
            best = min(best, time.perf_counter() - t0)
        api = Api(Settings.load(redis_url=settings.redis_url, key_prefix=prefix), redis, {})
        workers = await api.leaderboard(project)
        worker = workers[len(workers) // 2]["worker_id"]
        from goldstream.commands import report, worker_report

        queries = {
            "leaderboard": lambda: api.leaderboard(project),
            "labels": lambda: api.labels(project),
            "report": lambda: report(api.settings, project),
            "worker": lambda: worker_report(api.settings, project, worker),
        }
        answers = {}
        for name, query in queries.items():
            await query()  # warm: criteria cache, connections
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                await query()
                times.append((time.perf_counter() - t0) * 1000)
            p = np.percentile(times, [50, 99])
            answers[name] = {"p50_ms": round(float(p[0]), 2), "p99_ms": round(float(p[1]), 2)}
            print(f"  API {name:<12} p50 {p[0]:7.2f} ms  p99 {p[1]:7.2f} ms", flush=True)
    finally:
        await _clear(redis, prefix)
        await redis.aclose()
    per_ann_us = replay_s / n_ann * 1e6
    metrics_us = best / n_ann * 1e6
    print(f"  replay {per_ann_us:.1f} us per annotation; metrics {metrics_us:.2f} us per annotation "
          f"({metrics_us / per_ann_us:.1%}); {len(outputs)} outputs", flush=True)  # fmt: skip
    return {
        "machine": platform.processor() or platform.machine(),
        "annotations": n_ann,
        "outputs": len(outputs),
        "workers": len(workers),
        "replay_us_per_annotation": round(per_ann_us, 1),
        "metrics_us_per_annotation": round(metrics_us, 2),
        "metrics_share": round(metrics_us / per_ann_us, 4),
        "api": answers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small workload (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "ops.json")
    args = ap.parse_args()
    tune_gc()
    settings = Settings.load()
    print(f"ops benchmark, Redis at {settings.redis_url}", flush=True)
    figures = asyncio.run(run(settings, 300 if args.quick else 1500, 20 if args.quick else 100))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
