"""What storing item states costs Redis, by how many annotations an item gets.

    python -m benchmarks.state_bench [--per-item 3 10 20 50] [--json benchmarks/results/state.json]

Each item gets its annotations one at a time (a classification with three labels, as a crowd
answers it, or ten boxes), and its state is stored after each one, as the score step stores it
(`ItemStore.store`: the head, and the annotations the item's hash lacks). The baseline, in the
same run and on the same states, is how goldstream stored them before: the whole state after each
annotation, through the same compare-and-set (the state it was derived from sent along). Figures
are Redis's own counters: bytes it took in (`total_net_input_bytes`) and its append-only file's
growth (rewrites held off during the runs), per annotation.

Prints figures and ratios; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from goldstream.streams.items import ItemState
from goldstream.streams.settings import Settings
from goldstream.streams.state import ItemStore, Keys, RedisState, connect
from redis.asyncio import Redis

from benchmarks.replay_bench import _clear
from goldstream import schemas as s

RESULTS = Path(__file__).parent / "results"

# the previous version's write: the whole state, over the state it was derived from
WHOLE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or (cur == false and ARGV[1] == '') then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""


def _content(kind: str, n: int) -> s.Content:
    if kind == "boxes":
        objects = [
            s.AnnotatedObject(id=f"o{i}", label="car", shape=s.BBox(x=10 + i + n, y=10, w=50, h=40)) for i in range(10)
        ]
        return s.Content(objects=objects)
    return s.Content(classifications={"sentiment": [("positive", "neutral", "negative")[n % 3]]})


def _states(kind: str, items: int, per_item: int) -> list[list[ItemState]]:
    """Each item's states, one after each of its annotations."""
    at = datetime(2026, 12, 1, tzinfo=UTC)
    out = []
    for i in range(items):
        st, seq = ItemState(), []
        for n in range(per_item):
            a = s.AnnotationSubmitted(event_id=f"a{i}-{n}", project_id="p", item_id=f"i{i}", worker_id=f"w{n}",
                                      content=_content(kind, n), submitted_at=at)  # fmt: skip
            st = st.with_annotation(a).model_copy(update={"waiting": [*st.waiting, a.event_id]})
            seq.append(st)
        out.append(seq)
    return out


async def _counters(redis: Redis) -> tuple[int, int]:
    info = await redis.info("all")
    return int(info["total_net_input_bytes"]), int(info.get("aof_current_size", 0))


async def _split(redis: Redis, keys: Keys, seqs: list[list[ItemState]]) -> None:
    store = ItemStore(RedisState(redis, keys))
    for step in range(len(seqs[0])):
        names = [f"i{i}" for i in range(len(seqs))]
        held, _ = await store.load_due(names, {})
        await store.store({k: seq[step].encode() for k, seq in zip(names, seqs, strict=True)}, {}, held)


async def _whole(redis: Redis, keys: Keys, seqs: list[list[ItemState]]) -> None:
    script = redis.register_script(WHOLE)
    before = [b""] * len(seqs)
    for step in range(len(seqs[0])):
        pipe = redis.pipeline(transaction=False)
        now = [seq[step].encode()[0] for seq in seqs]
        for i, (old, new) in enumerate(zip(before, now, strict=True)):
            await script(keys=[keys.item(f"i{i}")], args=[old, new], client=pipe)
        await pipe.execute()
        before = now


async def measure(redis: Redis, kind: str, items: int, per_item: int) -> dict[str, Any]:
    seqs = _states(kind, items, per_item)
    row: dict[str, Any] = {"content": kind, "items": items, "annotations_per_item": per_item}
    for name, write in (("whole_state", _whole), ("head_and_annotations", _split)):
        prefix = f"bench-state-{uuid.uuid4().hex[:8]}"
        n0, a0 = await _counters(redis)
        await write(redis, Keys(prefix), seqs)
        n1, a1 = await _counters(redis)
        await _clear(redis, prefix)
        annotations = items * per_item
        row[name] = {"input_bytes": round((n1 - n0) / annotations), "aof_bytes": round((a1 - a0) / annotations)}
    row["input_ratio"] = round(row["whole_state"]["input_bytes"] / row["head_and_annotations"]["input_bytes"], 2)
    return row


async def run(settings: Settings, per_item: list[int], items: int) -> list[dict[str, Any]]:
    redis = connect(settings.redis_url, **settings.redis())
    rewrite = (await redis.config_get("auto-aof-rewrite-percentage"))["auto-aof-rewrite-percentage"]
    await redis.config_set("auto-aof-rewrite-percentage", 0)  # a rewrite would shrink the file mid-run
    rows = []
    try:
        for kind in ("classification", "boxes"):
            for k in per_item:
                row = await measure(redis, kind, items, k)
                w, h = row["whole_state"], row["head_and_annotations"]
                print(
                    f"  {kind:<15}{k:4d} per item: whole state {w['input_bytes']:7d} B in, {w['aof_bytes']:7d} B AOF; "
                    f"head and annotations {h['input_bytes']:6d} B in, {h['aof_bytes']:6d} B AOF "
                    f"(per annotation; {row['input_ratio']:.1f}x less in)",
                    flush=True,
                )
                rows.append(row)
    finally:
        await redis.config_set("auto-aof-rewrite-percentage", rewrite)
        await redis.aclose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-item", type=int, nargs="+", default=[3, 10, 20, 50])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="3 and 10 per item, 20 items")
    ap.add_argument("--json", type=Path, default=RESULTS / "state.json")
    args = ap.parse_args()
    settings = Settings.load()
    print(f"item state benchmark, Redis at {settings.redis_url}")
    per_item, items = ([3, 10], 20) if args.quick else (args.per_item, args.items)
    rows = asyncio.run(run(settings, per_item, items))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
