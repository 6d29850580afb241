"""The live consensus timer's check, with many rounds in flight and none of them due yet.

    python -m benchmarks.timer_bench [--items 1000 10000] [--json benchmarks/results/timer.json]

Writes `items` item states to the redis-server of `ops/dev`, each with two workers' annotations
(four boxes each) waiting for a round of a project whose timeout is an hour, with their entries in
the timer's index as the score step writes them (`ItemStore.store`). Then times one check as the
worker's timer makes it (`ItemStore.watched`, then load and parse what it names) two ways, in the
same run: with the same entries also in the whole-partition index that earlier versions wrote
and still read until it empties (the baseline: every entry read, every state loaded and parsed),
and with the per-project sets alone.

Prints figures and the ratio; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from goldstream.streams.items import ItemState, watched
from goldstream.streams.settings import Settings
from goldstream.streams.state import ItemStore, Keys, RedisState, connect
from goldstream.streams.worker import ParsedItems

from benchmarks.replay_bench import _clear
from goldstream import schemas as s

RESULTS = Path(__file__).parent / "results"


def _state(n: int, at: datetime) -> ItemState:
    content = s.Content(
        objects=[s.AnnotatedObject(id=f"o{i}", label="car", shape=s.BBox(x=10 + i, y=10, w=50, h=40)) for i in range(4)]
    )
    answers = [
        s.AnnotationSubmitted(
            event_id=f"a{n}-{w}", project_id="p", item_id=f"i{n}", worker_id=w, content=content, submitted_at=at
        )
        for w in ("w1", "w2")
    ]
    return ItemState(annotations=answers, waiting=[a.event_id for a in answers])


async def _check(store: ItemStore, parsed: ParsedItems) -> tuple[float, float, int, int]:
    """One timer check: wall and CPU seconds, items loaded, bytes loaded."""

    async def rules(projects: set[str]) -> dict[str, tuple[float, int] | None]:
        return {p: (3600.0, 2) for p in projects}

    t0, c0 = time.perf_counter(), time.process_time()
    found = await store.watched([0], rules, time.time())
    loaded = await store.load(sorted({c.item_id for c in found}))
    states = parsed.parse(loaded)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del states
    return wall, cpu, len(loaded), sum(map(len, loaded.values()))


async def run(settings: Settings, items: int) -> dict[str, Any]:
    redis = connect(settings.redis_url, **settings.redis())
    keys = Keys(f"bench-timer-{uuid.uuid4().hex[:8]}")
    try:
        store = ItemStore(RedisState(redis, keys))
        now = datetime.now(UTC)
        for start in range(0, items, 1000):
            states = {f"i{n}": _state(n, now) for n in range(start, min(items, start + 1000))}
            raw = {k: st.encode() for k, st in states.items()}
            await store.store(raw, {k: (0, None, watched(st)) for k, st in states.items()}, {})
            await redis.zadd(keys.waiting(0), {k: now.timestamp() for k in states})  # as earlier versions
        whole = await _check(store, ParsedItems())
        await redis.delete(keys.waiting(0))
        sets = await _check(store, ParsedItems())
        row = {
            "items": items,
            "whole_index": {"wall_s": whole[0], "cpu_s": whole[1], "loaded": whole[2], "bytes": whole[3]},
            "per_project_sets": {"wall_s": sets[0], "cpu_s": sets[1], "loaded": sets[2], "bytes": sets[3]},
            "ratio": whole[0] / sets[0],
        }
        print(
            f"  {items:6d} rounds in flight, none due: whole index {whole[0] * 1e3:8.1f} ms "
            f"({whole[2]} states, {whole[3] / 1e6:.1f} MB), per-project sets {sets[0] * 1e3:6.1f} ms "
            f"({sets[2]} states): {row['ratio']:.0f}x",
            flush=True,
        )
        return row
    finally:
        await _clear(redis, keys.prefix)
        await redis.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--quick", action="store_true", help="1,000 items only")
    ap.add_argument("--json", type=Path, default=RESULTS / "timer.json")
    args = ap.parse_args()
    settings = Settings.load()
    print(f"consensus timer benchmark, Redis at {settings.redis_url}")
    rows = [asyncio.run(run(settings, n)) for n in ([1000] if args.quick else args.items)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
