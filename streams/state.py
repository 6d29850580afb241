"""goldstream's one Redis module: key names, the Lua script that changes state, and the reads.

Every change of counters goes through one Lua script that applies it atomically and only once per
event id (a dedup key with a TTL), which turns Kafka's at-least-once delivery into exactly-once
effects. All state is integer counters (HINCRBY), so it is the same whatever order events arrive
in; proficiency, windows and EWMA are derived from the counters when read (scoring.policy).
Keys of one worker share a {hash tag}, as do a project's, so each script call touches one Redis
Cluster slot. Calls are pipelined: a few round trips per batch of events, not per event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from schemas.base import SchemaError, decode
from schemas.criteria import ProjectCriteria
from schemas.messages import ScoreKind, ScoreRecord
from scoring.counters import Counters
from scoring.policy import SCALE, Proficiency, evidence_increments, proficiency

SEP = "|"  # never inside an Id (schemas.base), so joined ids cannot collide


def load_script(name: str) -> str:
    """The source of streams/lua/NAME.lua."""
    return resources.files("streams").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (one per deployment, or per test)."""

    prefix: str = "gs"

    def tag(self, project_id: str, worker_id: str | None = None) -> str:
        return "{" + project_id + (SEP + worker_id if worker_id is not None else "") + "}"

    def key(self, tag: str, suffix: str) -> str:
        return f"{self.prefix}:{tag}:{suffix}"

    def seen(self, tag: str, event_id: str) -> str:
        return self.key(tag, f"seen:{event_id}")

    def worker(self, project_id: str, worker_id: str, suffix: str = "totals") -> str:
        return self.key(self.tag(project_id, worker_id), suffix)

    def project(self, project_id: str, suffix: str = "totals") -> str:
        return self.key(self.tag(project_id), suffix)

    def criteria(self, project_id: str) -> str:
        return f"{self.prefix}:criteria:{project_id}"


@dataclass(frozen=True)
class Increment:
    """Counter changes of one event in one slot: hash suffix -> field -> integer amount."""

    tag: str
    event_id: str
    changes: Mapping[str, Mapping[str, int]]


class RedisState:
    """Applies increments exactly once, in pipelined batches."""

    def __init__(self, client: Redis, keys: Keys | None = None, dedup_ttl_s: int = 7 * 86_400) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.dedup_ttl_s = dedup_ttl_s
        self._apply_once: AsyncScript = client.register_script(load_script("apply_once"))

    def _call_args(self, inc: Increment) -> tuple[list[str], list[str | int]]:
        keys = [self.keys.seen(inc.tag, inc.event_id)]
        args: list[str | int] = [self.dedup_ttl_s]
        for suffix, fields in inc.changes.items():
            if not fields:
                continue
            keys.append(self.keys.key(inc.tag, suffix))
            for name, amount in fields.items():
                args += [len(keys), name, int(amount)]
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

    async def counters(self, key: str) -> dict[str, int]:
        return _ints(await self.client.hgetall(key))


def _ints(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def buckets_of(fields: Mapping[str, int], what: str = "s", count: str = "n") -> dict[int, tuple[int, int]]:
    """Bucket hash fields '<start>:<count>' and '<start>:<what>' as {start: (count, value)}."""
    out: dict[int, tuple[int, int]] = {}
    for name, value in fields.items():
        start, _, part = name.partition(":")
        if part == count:
            out[int(start)] = (value, out.get(int(start), (0, 0))[1])
        elif part == what:
            out[int(start)] = (out.get(int(start), (0, 0))[0], value)
    return out


def high_water(fields: Mapping[str, int]) -> int | None:
    """The latest bucket start in a bucket hash: how far event time has got."""
    starts = [int(name.partition(":")[0]) for name in fields if name.endswith(":n")]
    return max(starts) if starts else None


# ----------------------------------------------------------------------------- proficiency


def record_increments(record: ScoreRecord, criteria: ProjectCriteria, keys: Keys) -> list[Increment]:
    """What one score changes: its worker's counters and buckets, and its project's (with the
    project's per-label buckets and the batch's counters). Two slots, two script calls."""
    totals = Counters().update(record.result).to_fields()
    totals = {k: v for k, v in totals.items() if v}
    totals.update(evidence_increments(record.result, record.kind.value, record.confidence))
    bucket_s = criteria.proficiency.bucket_s
    start = int(record.event_time.timestamp()) // bucket_s * bucket_s
    buckets: dict[str, int] = {}
    if record.result.score is not None:
        buckets = {
            f"{start}:n": 1,
            f"{start}:s": round(record.result.score * SCALE),
            f"{start}:p": int(bool(record.result.passed)),
        }
        if record.kind in (ScoreKind.GOLD, ScoreKind.REVIEW):  # against a known answer: accuracy
            buckets.update({f"{start}:rn": 1, f"{start}:rs": round(record.result.score * SCALE)})
    worker = {"totals": totals, "buckets": buckets}
    project: dict[str, Mapping[str, int]] = {"totals": totals, "buckets": buckets, "workers": {record.worker_id: 1}}
    for label, c in record.result.labels.items():
        fields = {f"{start}:tp": c.tp, f"{start}:fp": c.fp, f"{start}:fn": c.fn}
        project[f"label:{label}"] = {k: v for k, v in fields.items() if v}
    if record.batch_id is not None:
        project[f"batch:{record.batch_id}"] = totals
    return [
        Increment(keys.tag(record.project_id, record.worker_id), record.event_id, worker),
        Increment(keys.tag(record.project_id), record.event_id, project),
    ]


class ProficiencyStore:
    """Per (project, worker) and per project proficiency, kept from ScoreRecords."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.keys = state.keys
        self.client = state.client

    async def apply(self, records: Sequence[tuple[ScoreRecord, ProjectCriteria]]) -> list[bool]:
        """Apply each score once (both slots); True where this call applied it."""
        incs = [inc for rec, crit in records for inc in record_increments(rec, crit, self.keys)]
        done = await self.state.apply(incs)
        return [done[2 * i] for i in range(len(records))]

    async def totals(self, pairs: Sequence[tuple[str, str | None]]) -> list[dict[str, int]]:
        """Totals of (project, worker) pairs; worker None: the project's. One round trip."""
        pipe = self.client.pipeline(transaction=False)
        for project, worker in pairs:
            pipe.hgetall(self.keys.worker(project, worker) if worker else self.keys.project(project))
        return [_ints(r) for r in await pipe.execute()]

    async def snapshots(self, pairs: Sequence[tuple[str, str, ProjectCriteria]]) -> list[Proficiency]:
        totals = await self.totals([(p, w) for p, w, _ in pairs])
        return [proficiency(t, c) for t, (_, _, c) in zip(totals, pairs, strict=True)]

    async def hashes(self, keys: Sequence[str]) -> list[dict[str, int]]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        return [_ints(r) for r in await pipe.execute()]

    async def workers(self, project_id: str) -> dict[str, int]:
        """Workers of a project with their number of scored annotations."""
        return _ints(await self.client.hgetall(self.keys.project(project_id, "workers")))


class CriteriaStore:
    """Project criteria in Redis, shared by every worker; cached in-process for a few seconds."""

    def __init__(self, client: Redis, keys: Keys, ttl_s: float = 2.0) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ProjectCriteria | None]] = {}

    async def get(self, project_id: str, now: float) -> ProjectCriteria | None:
        hit = self._cache.get(project_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        raw = await self.client.get(self.keys.criteria(project_id))
        criteria = None
        if raw is not None:
            try:
                criteria = decode(ProjectCriteria, raw)
            except SchemaError:
                criteria = None  # written by a newer goldstream: treat as unknown
        self._cache[project_id] = (now, criteria)
        return criteria

    async def set(self, criteria: ProjectCriteria, now: float) -> None:
        await self.client.set(self.keys.criteria(criteria.project_id), criteria.to_bytes())
        self._cache[criteria.project_id] = (now, criteria)

    async def delete(self, project_id: str, now: float) -> None:
        await self.client.delete(self.keys.criteria(project_id))
        self._cache[project_id] = (now, None)


class AlertFlags:
    """Firing / resolved state of each alert scope (hysteresis across batches and workers)."""

    SCRIPT = """
    local old = redis.call('HGET', KEYS[1], ARGV[1])
    if old == ARGV[2] then return 0 end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return 1
    """

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._set = client.register_script(self.SCRIPT)

    def key(self, project_id: str) -> str:
        return self.keys.project(project_id, "alerts")

    async def current(self, project_id: str) -> dict[str, str]:
        raw = await self.client.hgetall(self.key(project_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def change(self, project_id: str, field: str, state: str) -> bool:
        """Set a scope's state; True only for the caller that changed it (no double alerts)."""
        return bool(await self._set(keys=[self.key(project_id)], args=[field, state]))


def dump_state(fields: Mapping[str, Mapping[str, int]]) -> bytes:
    """Stable bytes of a set of hashes (snapshots and comparisons)."""
    return orjson.dumps({k: dict(sorted(v.items())) for k, v in sorted(fields.items())})
