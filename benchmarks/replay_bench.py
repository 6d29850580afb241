"""Replay throughput: annotations per second of `goldstream replay` (the engine over a history, in
the worker's batches) on the QC benchmark's workforces, into the redis-server of `ops/dev`.

    python -m benchmarks.replay_bench [--quick] [--json benchmarks/results/replay.json]

The baseline, in the same run and on the same records, is the same engine one record at a time
(`--batch 1`, how replays ran before the engine took batches, and still how the QC benchmark
replays to judge every decision against the scores before it). The process's collector is set
as `goldstream replay` sets it (`streams.memory.tune_gc`). The clock covers the replay call:
records are built from the simulated events first, as the command reads its file first.

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

from goldstream.streams.engine import Record
from goldstream.streams.memory import tune_gc
from goldstream.streams.replay import BATCH, replay
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, connect
from redis.asyncio import Redis

from benchmarks.qc_bench import independent_case, own_case
from goldstream.simulator import key_of

RESULTS = Path(__file__).parent / "results"
TARGET = 3000.0  # annotations/s, issue #11


async def _clear(redis: Redis, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        await redis.delete(key)


async def rate(redis: Redis, records: list[Record], batch: int, repeats: int) -> tuple[float, int]:
    """Best annotations/s over `repeats` replays into a fresh prefix each; and the scores made."""
    n_ann = sum(1 for r in records if r.topic == "annotations")
    best, scores = float("inf"), 0
    # the harness holds the simulated workforce and its records; `goldstream replay` streams its
    # file and holds neither: frozen, they stay out of the collector's walks, as the stream
    # benchmark's harness does before each timed part
    tune_gc()
    for _ in range(repeats):
        prefix = f"bench-replay-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        result = await replay(records, redis, Keys(prefix), close_rounds=True, batch=batch)
        best = min(best, time.perf_counter() - t0)
        scores = len(result.outputs["scores"])
        await _clear(redis, prefix)
    return n_ann / best, scores


async def run(settings: Settings, items: int, repeats: int) -> dict[str, Any]:
    redis = connect(settings.redis_url, **settings.redis())
    rows = []
    try:
        for family, make in (
            ("independent", lambda: independent_case(1, items)),
            ("independent-matched", lambda: independent_case(1, items, matched=True)),
            ("own", lambda: own_case(11, items)),
        ):
            case = make()
            records = [Record(t, m.to_bytes(), key_of(t, m).encode(), 0, i) for i, (t, m) in enumerate(case.events)]
            n_ann = sum(1 for r in records if r.topic == "annotations")
            batched, scores = await rate(redis, records, BATCH, repeats)
            single, scores_1 = await rate(redis, records, 1, repeats)
            row = {
                "workforce": family,
                "annotations": n_ann,
                "records": len(records),
                "scores": scores,
                "scores_batch_1": scores_1,
                "batch": BATCH,
                "annotations_per_s": round(batched, 1),
                "batch_1_annotations_per_s": round(single, 1),
                "ratio_vs_batch_1": round(batched / single, 2),
                "target_per_s": TARGET,
            }
            rows.append(row)
            print(
                f"  {family:<20} {n_ann:>6} annotations: batches of {BATCH} {batched:8.0f}/s, "
                f"one at a time {single:7.0f}/s ({batched / single:.1f}x); scores {scores} / {scores_1}",
                flush=True,
            )
    finally:
        await redis.aclose()
    return {"machine": platform.processor() or platform.machine(), "repeats": repeats, "replay": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small workforces, one repeat (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "replay.json")
    args = ap.parse_args()
    tune_gc()
    settings = Settings.load()
    items, repeats = (300, 1) if args.quick else (1500, 2)
    print(f"replay benchmark, Redis at {settings.redis_url}", flush=True)
    figures = asyncio.run(run(settings, items, repeats))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
