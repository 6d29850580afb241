"""goldstream's one Redis module: key names and the Lua scripts that change state.

Every change of counters goes through a Lua script that applies it atomically and only once per
event id (a dedup key with a TTL), which turns Kafka's at-least-once delivery into exactly-once
effects. Keys of one worker share a {hash tag}, so each script touches one Redis Cluster slot.
Calls are pipelined: one round trip per batch of events, not per event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SEP = "|"  # never inside an Id (schemas.base), so joined ids cannot collide


def load_script(name: str) -> str:
    """The source of streams/lua/NAME.lua."""
    return resources.files("streams").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (one per deployment, or per test)."""

    prefix: str = "gs"

    def tag(self, project_id: str, worker_id: str) -> str:
        return "{" + project_id + SEP + worker_id + "}"

    def seen(self, project_id: str, worker_id: str, event_id: str) -> str:
        return f"{self.prefix}:{self.tag(project_id, worker_id)}:seen:{event_id}"

    def worker(self, project_id: str, worker_id: str, suffix: str = "totals") -> str:
        return f"{self.prefix}:{self.tag(project_id, worker_id)}:{suffix}"


@dataclass(frozen=True)
class Increment:
    """Counter changes of one event for one worker: hash suffix -> field -> amount."""

    project_id: str
    worker_id: str
    event_id: str
    changes: Mapping[str, Mapping[str, float]]


class RedisState:
    """Applies increments exactly once, in pipelined batches."""

    def __init__(self, client: Redis, keys: Keys | None = None, dedup_ttl_s: int = 7 * 86_400) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.dedup_ttl_s = dedup_ttl_s
        self._apply_once: AsyncScript = client.register_script(load_script("apply_once"))

    def _call_args(self, inc: Increment) -> tuple[list[str], list[str | int | float]]:
        keys = [self.keys.seen(inc.project_id, inc.worker_id, inc.event_id)]
        args: list[str | int | float] = [self.dedup_ttl_s]
        for suffix, fields in inc.changes.items():
            keys.append(self.keys.worker(inc.project_id, inc.worker_id, suffix))
            for name, amount in fields.items():
                args += [len(keys), name, repr(float(amount))]
        return keys, args

    async def apply(self, batch: Sequence[Increment]) -> list[bool]:
        """Apply each increment once; True where applied, False where it was a re-delivery."""
        if not batch:
            return []
        pipe = self.client.pipeline(transaction=False)
        for inc in batch:
            keys, args = self._call_args(inc)
            await self._apply_once(keys=keys, args=args, client=pipe)
        return [bool(r) for r in await pipe.execute()]

    async def counters(self, project_id: str, worker_id: str, suffix: str = "totals") -> dict[str, float]:
        raw = await self.client.hgetall(self.keys.worker(project_id, worker_id, suffix))
        return {k.decode(): float(v) for k, v in raw.items()}
