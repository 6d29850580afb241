"""goldstream's one Redis module: key names, the Lua script that changes state, and the reads.

Every change of counters goes through one Lua script that applies it atomically and only once:
each event carries the position of the input it derives from (`Position`), and each slot keeps,
per input stream, the last offset it applied and the ids applied there, which turns Kafka's
at-least-once delivery into exactly-once effects with memory per stream and slot, not per event
(an event without a position, e.g. a score written by an older goldstream, falls back to a dedup
key with a TTL). All state is integer counters (HINCRBY), so it
is the same whatever order events arrive in; proficiency, windows and EWMA are derived from the
counters when read (scoring.policy).
Keys of one worker share a {hash tag}, as do a project's, so each script call touches one Redis
Cluster slot. Calls are pipelined: a few round trips per batch of events, not per event.

Redis outages are waited out, not crashed on: every call goes through a `RedisGuard`, which
retries connection errors with capped exponential backoff (the call is idempotent: reads, or the
apply-once script), logs once when Redis goes away and once when it is back, and meanwhile holds
the caller, so a worker takes no new work and commits nothing it has not applied. A Redis that
comes back without goldstream's state (a flush, a failover to an empty replica) is told apart by
the epoch key, written when the state was created and read in every read round trip: its absence
raises `StateLost` instead of counting from zero (the worker exits; on restart it rebuilds from
the topics, `goldstream.commands.ensure_state`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import orjson
from goldstream.schemas.base import SchemaError, decode
from goldstream.schemas.criteria import ProjectCriteria
from goldstream.schemas.messages import DeadLetter, Outcome, QualityAlert, ScoreKind, ScoreRecord
from goldstream.scoring import reliability
from goldstream.scoring.counters import Counters
from goldstream.scoring.policy import SCALE, Proficiency, proficiency
from goldstream.scoring.reliability import risk_bin, time_bin
from goldstream.streams.waiting import Rules, Waiting
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry

SEP = "|"  # never inside an Id (schemas.base), so joined ids cannot collide
log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the same idempotent call may simply be made again. LOADING: a restarted
# Redis reading its append-only file; NOSCRIPT: a restarted Redis lost its script cache.
RETRYABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.NoScriptError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    OSError,
)


SOCKET_TIMEOUT_S = 30.0
"""How long a Redis call may take before it counts as an outage."""


def connect(url: str, cluster: bool = False, **options: Any) -> Redis:
    """A client for goldstream's state: for one Redis, or (`cluster`) redis-py's Redis Cluster
    client, which routes each call by its key's slot (goldstream's hash tags keep each script
    call in one slot). redis-py's own retries are cut to one immediate retry (a stale pooled
    connection after a restart); outages are `RedisGuard`'s to wait out, with one log line each
    way instead of a stack of retries per call."""
    opts: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 1),
        "socket_connect_timeout": 5.0,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 15,
    }
    opts.update(options)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, **opts)  # type: ignore[return-value]  # the same commands
    return Redis.from_url(url, **opts)


class ItemConflict(RuntimeError):
    """An item's state changed under this worker: its partition has another owner now (this
    worker was cut off past the rebalance timeout). The batch must not be committed."""


class StateLost(RuntimeError):
    """Redis no longer holds the state this process was working on (its epoch key is gone or
    changed): counting on would start from zero. Rebuild from the topics instead."""


def refused(exc: BaseException) -> bool:
    """Redis answered, and said no: a refused login, or a TLS certificate not trusted. Waiting
    will not change it; the operator must (streams.security.explain says which setting)."""
    from redis.exceptions import AuthenticationError

    text = str(exc)
    return isinstance(exc, AuthenticationError) or "CERTIFICATE_VERIFY_FAILED" in text or "WRONGPASS" in text


@dataclass
class RedisGuard:
    """Runs Redis calls through outages: capped exponential backoff, forever (or `give_up_s`).

    Only idempotent calls go through it (reads and the apply-once script), so a call that may or
    may not have run before the connection broke is simply run again. `epoch`: the token this
    process expects under `Keys.epoch()`; checked after every outage and by the stores' reads."""

    client: Redis
    epoch_key: str | None = None
    epoch: bytes | None = None
    base_s: float = 0.05
    cap_s: float = 5.0
    give_up_s: float | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    flap_s: float = 10.0  # a failure this soon after recovery is the same outage (stale connections)
    # each call's deadline, for a client connected without a socket timeout (`connect(...,
    # socket_timeout=None)`): redis-py arms a timer per reply, a third of what a pipelined reply
    # costs; one per call keeps the outage detection at a fraction of the cost
    timeout_s: float | None = None
    down_since: float | None = field(default=None, init=False)
    outages: int = field(default=0, init=False)
    retries: int = field(default=0, init=False)
    last_outage_s: float = field(default=0.0, init=False)
    _back_at: float | None = field(default=None, init=False)
    scripts: list[AsyncScript] = field(default_factory=list, init=False)  # loaded again on NOSCRIPT
    _logged: bool = field(default=False, init=False)

    @property
    def down(self) -> bool:
        """True while Redis is unreachable (the watchdog does not count that as a stall)."""
        return self.down_since is not None

    async def run(self, call: Callable[[], Awaitable[T]], what: str = "redis") -> T:
        delay = self.base_s
        reloads = 0
        while True:
            try:
                if self.timeout_s is None:
                    result = await call()
                else:
                    async with asyncio.timeout(self.timeout_s):
                        result = await call()
            except redis_errors.NoScriptError:
                # a restarted Redis, a cluster node new to this client: load the scripts and run
                # the (idempotent) call again at once; not an outage
                reloads += 1
                if reloads > 3:
                    raise
                await self.run(self._load_scripts, "scripts")
                continue
            except RETRYABLE as exc:
                if refused(exc):
                    raise  # a wrong password or an untrusted certificate is not an outage: fail now
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    self.outages += 1
                elif self.give_up_s is not None and now - self.down_since > self.give_up_s:
                    raise
                # a failure just after recovery is a stale pooled connection, not news, unless
                # it lasts: log an outage once, when it starts or when a "flap" turns out long
                flap = self._back_at is not None and self.down_since - self._back_at < self.flap_s
                if not self._logged and (not flap or now - self.down_since >= 1.0):
                    self._logged = True
                    log.warning(
                        "Redis unreachable (%s: %s); holding work and retrying with backoff up to %.0f s",
                        what,
                        _brief(exc),
                        self.cap_s,
                    )
                self.retries += 1
                await self.sleep(delay)
                delay = min(delay * 2, self.cap_s)
                continue
            if self.down_since is not None:
                await self._recovered()
            return result

    async def _load_scripts(self) -> None:
        """Load goldstream's scripts into Redis (on a cluster, into every primary): pipelined
        script calls (`evalsha`) do not load a missing script by themselves."""
        for script in self.scripts:
            await self.client.script_load(script.script)

    async def _recovered(self) -> None:
        assert self.down_since is not None
        self._back_at = time.monotonic()
        self.last_outage_s = self._back_at - self.down_since
        self.down_since = None
        # pooled connections opened before the outage are dead: drop the idle ones now rather
        # than meet them one call at a time (a cluster client keeps a pool per node, and finds
        # its nodes again by itself)
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            await pool.disconnect(inuse_connections=False)
        if self._logged:
            self._logged = False
            log.warning("Redis is back after %.1f s (%d retries in all)", self.last_outage_s, self.retries)
        await self.verify()

    async def verify(self) -> None:
        """Raise `StateLost` unless Redis still holds this process's epoch."""
        if self.epoch_key is None:
            return
        self.check(await self.run(lambda: self.client.get(self.epoch_key), "epoch"))  # type: ignore[arg-type]

    def check(self, found: bytes | None) -> None:
        """Compare an epoch read along with other data (same round trip) with the expected one."""
        if self.epoch_key is None:
            return
        if self.epoch is None:
            self.epoch = found  # the first read adopts it (ensure_state wrote it before we started)
        if found is None or found != self.epoch:
            raise StateLost(
                f"Redis lost goldstream's state: the epoch key {self.epoch_key!r} is "
                f"{'gone' if found is None else 'changed'} (a flush, or a failover to an empty replica). "
                "Counting on would start from zero; restart the worker, which rebuilds the state from the "
                "topics, or run `goldstream rebuild-state`."
            )


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def evalsha(pipe: Any, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue a script call on a pipeline, plain or cluster: redis-py refuses `evalsha` on a
    cluster pipeline but routes the raw command by its first key. A missing script (NOSCRIPT) is
    `RedisGuard.run`'s to load; the scripts must be registered with the guard (`scripts`)."""
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def load_script(name: str) -> str:
    """The source of streams/lua/NAME.lua."""
    return resources.files("goldstream.streams").joinpath("lua", f"{name}.lua").read_text()


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

    def applied(self, tag: str) -> str:
        """A slot's applied positions: stream -> the last offset the apply-once script applied."""
        return self.key(tag, "applied")

    def worker(self, project_id: str, worker_id: str, suffix: str = "totals") -> str:
        return self.key(self.tag(project_id, worker_id), suffix)

    def project(self, project_id: str, suffix: str = "totals") -> str:
        return self.key(self.tag(project_id), suffix)

    def criteria(self, project_id: str) -> str:
        return f"{self.prefix}:criteria:{project_id}"

    def item(self, item_id: str) -> str:
        """An item's state (gold, rounds, ...) with the ids of its annotations, whose JSON is in
        `item_annotations` (a state written before that split holds them inline); its own slot."""
        return self.key("{item" + SEP + item_id + "}", "state")

    def is_item(self, key: str) -> bool:
        """Whether a key holds an item's state or its annotations."""
        return key.startswith(f"{self.prefix}:{{item{SEP}")

    def item_annotations(self, item_id: str) -> str:
        """An item's annotations: event id -> JSON, each written once (hash, the item's slot)."""
        return self.key("{item" + SEP + item_id + "}", "annotations")

    def expiry(self, partition: int) -> str:
        """Items of an input partition by when their state falls out of retention (event time)."""
        return self.key("{expiry}", str(partition))

    def waiting(self, partition: int) -> str:
        """The consensus timer's index as goldstream wrote it before the `watched` sets: every
        watched item of an input partition, by oldest waiting submission, read whole. Still read,
        and its entries removed as their items change, until it is empty."""
        return self.key("{waiting}", str(partition))

    def watched(self, partition: int, workers: int, project_id: str) -> str:
        """Items of an input partition whose waiting annotations come from `workers` workers of
        a project, by oldest waiting submission: the timer reads only the prefix a project's
        current rules make due (its timeout; none below its minimum annotators)."""
        return self.key("{waiting}", f"{partition}:{workers}:{project_id}")

    def watch_sets(self, partition: int) -> str:
        """The `watched` sets of a partition that may hold items, as '<workers>:<project>'."""
        return self.key("{waiting}", f"{partition}:sets")

    def inputs(self) -> str:
        """The score step's progress: '<topic>:<partition>' -> the last offset it handled there.
        Compared with the topics at start, it tells a topic recreated under kept state."""
        return f"{self.prefix}:inputs"

    def epoch(self) -> str:
        """Written once when the state is created (`ensure_state`): its absence means Redis lost it."""
        return f"{self.prefix}:epoch"


@dataclass(frozen=True, order=True)
class Position:
    """The position of the input an event derives from: a stream (a Kafka topic-partition, or a
    replay file's) and its offset there. The score step reads a stream in order, from a committed
    offset, and emits what each input makes in that order, so a slot that remembers, per stream,
    the last offset it applied and the ids applied at that offset knows every event it applied: a
    redelivered input's outputs come again with the same ids at the same positions."""

    stream: str
    offset: int

    @classmethod
    def of(
        cls, topic: str | None, partition: int | None, offset: int | None, lane: int | None = None
    ) -> Position | None:
        """A record's position; None for one that has none (offset -1, or not recorded). `lane`:
        the partition of the topic the event itself was read from, when events of one stream
        reach a slot through several (a project's scores come through every `scores` partition,
        each in order, but not in order with each other)."""
        if topic is None or partition is None or offset is None or offset < 0:
            return None
        return cls(f"{topic}:{partition}" + (f">{lane}" if lane is not None else ""), offset)


@dataclass(frozen=True)
class Increment:
    """State changes of one event in one slot: counters (hash suffix -> field -> integer amount)
    and sequence entries (sorted-set suffix -> (member, event time, how many latest to keep)).
    `at`: the event's position, by which it is applied once; None: by `event_id` (a dedup key)."""

    tag: str
    event_id: str
    changes: Mapping[str, Mapping[str, int]]
    entries: Mapping[str, tuple[str, float, int]] = field(default_factory=dict)
    at: Position | None = None
    # time-bucket hashes kept to a history: suffix -> (seconds kept, bucket size, field parts)
    history: Mapping[str, tuple[int, int, tuple[str, ...]]] = field(default_factory=dict)


class RedisState:
    """Applies increments exactly once, in pipelined batches."""

    def __init__(
        self,
        client: Redis,
        keys: Keys | None = None,
        dedup_ttl_s: int = 7 * 86_400,
        guard: RedisGuard | None = None,
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.dedup_ttl_s = dedup_ttl_s
        self.guard = guard or RedisGuard(client)
        self._apply_once: AsyncScript = client.register_script(load_script("apply_once"))
        self.guard.scripts.append(self._apply_once)

    def _call_args(self, group: Sequence[Increment]) -> tuple[list[str], list[str | int | bytes]]:
        """One script call for the increments of one slot: the slot's applied positions, the dedup
        keys of increments without a position, the keys they change (each once), and each one's
        guard and changes naming keys by their index."""
        keys = [self.keys.applied(group[0].tag)]
        guards: list[Any] = []
        for inc in group:
            if inc.at is not None:
                guards.append([inc.at.stream, inc.at.offset, inc.event_id])
            else:
                keys.append(self.keys.seen(inc.tag, inc.event_id))
                guards.append(len(keys))
        index: dict[str, int] = {}

        def at(tag: str, suffix: str) -> int:
            name = self.keys.key(tag, suffix)
            if name not in index:
                keys.append(name)
                index[name] = len(keys)
            return index[name]

        events = []
        history: dict[int, tuple[int, int, tuple[str, ...]]] = {}
        for inc, guard in zip(group, guards, strict=True):
            hincr = [(at(inc.tag, suffix), fields) for suffix, fields in inc.changes.items() if fields]
            entries = [(at(inc.tag, suffix), m, repr(float(s)), keep) for suffix, (m, s, keep) in inc.entries.items()]
            events.append((guard, hincr, entries))
            for suffix, kept in inc.history.items():
                if inc.changes.get(suffix):
                    history[at(inc.tag, suffix)] = kept
        prunes = [[k, keep, step, list(parts)] for k, (keep, step, parts) in sorted(history.items())]
        return keys, [self.dedup_ttl_s, orjson.dumps(events), orjson.dumps(prunes)]

    async def apply(self, batch: Sequence[Increment]) -> list[bool]:
        """Apply each increment once; True where applied, False where it was a re-delivery. One
        script call per slot (hash tag) for the whole batch: the changes of a batch's events are
        summed in the script and written once per field. Within a slot, increments go in the
        order of their positions (the changes are sums: their order changes nothing else)."""
        if not batch:
            return []
        groups: dict[str, list[int]] = {}
        for i, inc in enumerate(batch):
            groups.setdefault(inc.tag, []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: (batch[i].at is not None, batch[i].at or Position("", 0)))

        async def call() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for members in groups.values():
                keys, args = self._call_args([batch[i] for i in members])
                evalsha(pipe, self._apply_once, keys, args)
            return await pipe.execute()

        done = [False] * len(batch)
        for members, result in zip(groups.values(), await self.guard.run(call, "apply"), strict=True):
            for i, flag in zip(members, result, strict=True):
                done[i] = bool(flag)
        return done

    async def read(self, build: Callable[[Any], None], what: str = "read") -> list[Any]:
        """One pipelined round trip of reads, with the epoch read in it (checked before the
        results are used: a flushed Redis must not be read as zeros)."""

        async def call() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            if self.guard.epoch_key is not None:
                pipe.get(self.guard.epoch_key)
            build(pipe)
            return await pipe.execute()

        results = await self.guard.run(call, what)
        if self.guard.epoch_key is not None:
            self.guard.check(results[0])
            results = results[1:]
        return results

    async def counters(self, key: str) -> dict[str, int]:
        (raw,) = await self.read(lambda pipe: pipe.hgetall(key))
        return _ints(raw)


def _ints(raw: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    return {_text(k): int(v) for k, v in raw.items()}


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


def label_buckets(fields: Mapping[str, int]) -> dict[int, tuple[int, int, int]]:
    """A label hash's time buckets: start -> (tp, fp, fn) (fields '<start>:tp', ...)."""
    out: dict[int, list[int]] = {}
    for name, value in fields.items():
        start, _, part = name.partition(":")
        if part in ("tp", "fp", "fn") and start.lstrip("-").isdigit():
            out.setdefault(int(start), [0, 0, 0])[("tp", "fp", "fn").index(part)] += value
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def window_fields(
    as_of: int, window_s: int, bucket_s: int, parts: Sequence[str], first: int | None = None
) -> list[str]:
    """The field names of the buckets whose start lies in (as_of - window_s, as_of], and not
    before `first` (a hash's '_first': none starts earlier): starts are multiples of `bucket_s`
    (`record_increments`). After a change of a project's `bucket_s`, the buckets written at the
    old step are not named: its windows count the new step's buckets."""
    start = (as_of - window_s) // bucket_s * bucket_s + bucket_s
    if first is not None and first > start:
        start = -(-first // bucket_s) * bucket_s  # the first bucket start at or after it
    return [f"{b}:{part}" for b in range(start, as_of + 1, bucket_s) for part in parts]


class BucketMarks(NamedTuple):
    """What the apply-once script keeps of a bucket hash besides its buckets: the newest bucket
    start ever written ('_hi', how far event time has got there) and the start before which
    no bucket exists ('_first'; None on a hash written before it was kept)."""

    hi: int | None
    first: int | None


# ----------------------------------------------------------------------------- proficiency


KNOWN_KINDS = (ScoreKind.GOLD, ScoreKind.REVIEW)

STANDING_FIELDS = (
    "items", "gold_items", "scored", "score",
    "known_n", "known_s", "known_ss", "round_n", "round_s", "round_ss",
)  # fmt: skip
"""The fields of a worker's totals that its standing reads (`scoring.policy.proficiency` and
`level_of`): what the score step reads for every batch."""


def record_increments(
    record: ScoreRecord, criteria: ProjectCriteria, keys: Keys, lane: int | None = None
) -> list[Increment]:
    """What one score changes: its worker's counters, buckets, confusions and evidence sequence,
    and its project's (with the per-label buckets, the batch's counters and the sums the
    reliability model is fitted from). Two slots, two script calls. Every change is a sum or a
    sequence entry placed by event time, so the state does not depend on arrival order."""
    w, value = record.worker_id, record.result.score
    totals = {k: v for k, v in Counters().update(record.result).to_fields().items() if v}
    totals[f"{record.kind.value}_items"] = 1
    if record.time_on_task_s is not None and record.kind is not ScoreKind.REVIEW:
        totals["tot_n"], totals["tot_ms"] = 1, round(record.time_on_task_s * 1000)  # the worker's pace
    bucket_s = criteria.proficiency.bucket_s
    start = int(record.event_time.timestamp()) // bucket_s * bucket_s
    buckets: dict[str, int] = {}
    if value is not None:
        buckets = {f"{start}:n": 1, f"{start}:s": round(value * SCALE), f"{start}:p": int(bool(record.result.passed))}
    evidence = _evidence(record)
    levels: dict[str, int] = {}
    worker_entries: dict[str, tuple[str, float, int]] = {}
    if evidence is not None:
        kind, x = evidence
        for name, amount in {"n": 1, "s": round(x * SCALE), "ss": round(x * x * SCALE)}.items():
            totals[f"{kind}_{name}"] = amount
            levels[f"{w}{SEP}{kind}_{name}"] = amount
        member = f"{kind}:{round(x * 1_000_000)}:{record.event_id}"
        keep = criteria.proficiency.evidence_items
        worker_entries["evidence"] = (member, record.event_time.timestamp(), keep)
    worker: dict[str, Mapping[str, int]] = {
        "totals": totals,
        "buckets": buckets,
        "confusions": confusion_increments(record) if record.kind in KNOWN_KINDS else {},
    }
    project: dict[str, Mapping[str, int]] = {
        "totals": totals,
        "buckets": buckets,
        "workers": {w: 1},
        "levels": levels,
        "pace": _pace(record, criteria),
    }
    if record.kind is ScoreKind.CONSENSUS and record.risk is not None:
        project["risks"] = {str(risk_bin(record.risk)): 1, "n": 1, "e": int(record.escalated)}
    for label, c in record.result.labels.items():
        fields = {f"{start}:tp": c.tp, f"{start}:fp": c.fp, f"{start}:fn": c.fn}
        project[f"label:{label}"] = {k: v for k, v in fields.items() if v}
    if record.batch_id is not None:
        project[f"batch:{record.batch_id}"] = totals
    at = Position.of(record.source_topic, record.source_partition, record.source_offset, lane)
    kept = criteria.proficiency.history_s
    scores = (kept, bucket_s, ("n", "s", "p"))
    labels = (kept, bucket_s, ("tp", "fp", "fn"))
    project_history = {"buckets": scores} | {f"label:{x}": labels for x in record.result.labels}
    return [
        Increment(keys.tag(record.project_id, w), record.event_id, worker, worker_entries, at, {"buckets": scores}),
        Increment(keys.tag(record.project_id), record.event_id, project, at=at, history=project_history),
    ]


def _evidence(record: ScoreRecord) -> tuple[str, float] | None:
    """The record's item of evidence about its worker: ('known', score) against a known answer,
    ('round', estimate) from a consensus round; None when it says nothing."""
    if record.kind in KNOWN_KINDS and record.result.score is not None:
        return "known", record.result.score
    if record.kind is ScoreKind.CONSENSUS and record.estimate is not None:
        return "round", record.estimate
    return None


def _pace(record: ScoreRecord, criteria: ProjectCriteria) -> dict[str, int]:
    """Time-on-task histogram fields: 'a<bin>' for every annotation's first score, 'k<bin>' and
    'b<bin>' (bad) for those scored against gold, from which `scoring.reliability.pace` learns
    what a rushed annotation says about quality."""
    t = record.time_on_task_s
    if t is None or record.kind is ScoreKind.REVIEW:
        return {}
    b = time_bin(t)
    out = {f"a{b}": 1}
    if record.kind is ScoreKind.GOLD and record.result.score is not None:
        out[f"k{b}"] = 1
        if record.result.score < criteria.pass_threshold:
            out[f"b{b}"] = 1
    return out


def confusion_increments(record: ScoreRecord) -> dict[str, int]:
    """Per-worker label confusions against a known answer: '<true label>\t<given label>' (a
    match counts on the diagonal, a missed object as '<label>\t', an extra one as '\t<label>';
    a tab is never inside a label)."""
    out: dict[str, int] = {}
    for m in record.result.matches:
        if m.outcome is Outcome.MATCH:
            name = f"{m.reference_label}\t{m.reference_label}"
        elif m.outcome is Outcome.MISMATCH:
            name = f"{m.reference_label}\t{m.annotation_label}"
        elif m.outcome is Outcome.MISSED:
            name = f"{m.reference_label}\t"
        else:
            name = f"\t{m.annotation_label}"
        out[name] = out.get(name, 0) + 1
    return out


@dataclass(frozen=True)
class ProjectView:
    """What a project's workers' sums say, fitted once for many decisions (`ProficiencyStore.view`)."""

    model: reliability.Model
    pace: reliability.Pace
    risks: reliability.Risks
    count: int  # the project's applied scores when it was read


def level_of(model: reliability.Model, totals: Mapping[str, int]) -> reliability.Worker:
    """A worker's level from its totals hash (its 'known_*' and 'round_*' sums)."""
    return model.level(reliability.Sums.of_fields(totals, "known_"), reliability.Sums.of_fields(totals, "round_"))


def project_view(
    levels: Mapping[str, int], pace: Mapping[str, int], risks: Mapping[str, int], criteria: ProjectCriteria, count: int
) -> ProjectView:
    """Fit the reliability model and the pace norm from a project's hashes."""
    known: dict[str, dict[str, int]] = {}
    rounds: dict[str, dict[str, int]] = {}
    for name, amount in levels.items():
        worker, _, part = name.rpartition(SEP)
        kind, _, stat = part.partition("_")
        (known if kind == "known" else rounds).setdefault(worker, {})[stat] = amount
    model = reliability.fit(
        {w: reliability.Sums.of_fields(f, "") for w, f in known.items()},
        {w: reliability.Sums.of_fields(f, "") for w, f in rounds.items()},
        prior_weight=criteria.proficiency.prior_weight,
    )
    every = {int(k[1:]): v for k, v in pace.items() if k.startswith("a")}
    known_bins = {int(k[1:]): (v, pace.get(f"b{k[1:]}", 0)) for k, v in pace.items() if k.startswith("k")}
    return ProjectView(
        model,
        reliability.pace(every, known_bins, criteria.escalation.fast_share),
        reliability.Risks({int(k): v for k, v in risks.items() if k.isdigit()}, risks.get("n", 0), risks.get("e", 0)),
        count,
    )


class ProficiencyStore:
    """Per (project, worker) and per project standing, kept from ScoreRecords."""

    REFIT_SHARE = 0.02  # refit a project's model once its applied scores grew by this share

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.keys = state.keys
        self.client = state.client
        self._views: dict[str, ProjectView] = {}

    async def apply(
        self, records: Sequence[tuple[ScoreRecord, ProjectCriteria]], lanes: Sequence[int] | None = None
    ) -> list[bool]:
        """Apply each score once (both slots); True where this call applied it. `lanes`: the
        `scores` partition each was read from (`Position.of`); None: one lane (a replay)."""
        applied, _ = await self._apply(records, lanes)
        return applied

    async def _apply(
        self, records: Sequence[tuple[ScoreRecord, ProjectCriteria]], lanes: Sequence[int] | None = None
    ) -> tuple[list[bool], list[Mapping[str, int]]]:
        """Apply each score once; (applied, each score's change to its worker's totals)."""
        lane = lanes if lanes is not None else [0] * len(records)
        incs = [record_increments(r, c, self.keys, n) for (r, c), n in zip(records, lane, strict=True)]
        done = await self.state.apply([inc for pair in incs for inc in pair])
        return [done[2 * i] for i in range(len(records))], [pair[0].changes["totals"] for pair in incs]

    async def apply_standing(
        self,
        records: Sequence[tuple[ScoreRecord, ProjectCriteria]],
        pairs: Sequence[tuple[str, str, ProjectCriteria]],
        lanes: Sequence[int] | None = None,
    ) -> tuple[list[bool], list[Proficiency], list[Proficiency]]:
        """Apply each score once, with the standings of `pairs` (project, worker, criteria) before
        and after. After is before plus what this call applied, not a second read: a worker's
        hashes are written only by the consumer of its scores partition."""
        views, before = await self.views_and_totals({p: c for p, _, c in pairs}, [(p, w) for p, w, _ in pairs])
        applied, changes = await self._apply(records, lanes)
        after = {(p, w): dict(t) for (p, w, _), t in zip(pairs, before, strict=True)}
        for (rec, _), ok, change in zip(records, applied, changes, strict=True):
            totals = after.get((rec.project_id, rec.worker_id))
            if ok and totals is not None:
                for name, amount in change.items():
                    totals[name] = totals.get(name, 0) + amount

        def standing(t: Mapping[str, int], p: str, c: ProjectCriteria) -> Proficiency:
            return proficiency(t, c, level_of(views[p].model, t))

        return (
            applied,
            [standing(t, p, c) for t, (p, _, c) in zip(before, pairs, strict=True)],
            [standing(after[(p, w)], p, c) for p, w, c in pairs],
        )

    async def view(self, project_id: str, criteria: ProjectCriteria, fresh: bool = False) -> ProjectView:
        """The project's fitted model, pace and risk histogram. Refitted when its applied scores
        grew by `REFIT_SHARE` (plus a few) since the last fit, or when `fresh`: a count, not a
        clock, decides, so a replay refits at the same points every time."""
        if fresh:
            return await self._fit(project_id, criteria)
        views, _ = await self.views_and_totals({project_id: criteria}, [])
        return views[project_id]

    async def _fit(self, project_id: str, criteria: ProjectCriteria) -> ProjectView:
        p = self.keys.project

        def build(pipe: Any) -> None:
            pipe.hget(p(project_id), "items")
            for suffix in ("levels", "pace", "risks"):
                pipe.hgetall(p(project_id, suffix))

        count, levels, pace, risks = await self.state.read(build, "levels")
        view = project_view(_ints(levels), _ints(pace), _ints(risks), criteria, int(count or 0))
        self._views[project_id] = view
        return view

    async def views_and_totals(
        self,
        projects: Mapping[str, ProjectCriteria],
        pairs: Sequence[tuple[str, str]],
        fields: Sequence[str] | None = None,
    ) -> tuple[dict[str, ProjectView], list[dict[str, int]]]:
        """The projects' views and the (project, worker) pairs' totals in one round trip (and one
        more for a project whose model is due a refit): what a batch needs to judge its workers.
        `fields`: only these of each worker's totals (`STANDING_FIELDS`); a worker's hash also
        holds its per-label counters, and reading them all for every batch cost more than the
        rest of the read once batches were small."""
        order = sorted(projects)
        names = [self.keys.worker(p, w) for p, w in pairs]

        def build(pipe: Any) -> None:
            for p in order:
                pipe.hget(self.keys.project(p), "items")
            for name in names:
                if fields is None:
                    pipe.hgetall(name)
                else:
                    pipe.hmget(name, fields)

        found = await self.state.read(build, "standing") if order or names else []
        views = {}
        for p, count in zip(order, found[: len(order)], strict=True):
            cached = self._views.get(p)
            if cached is None or int(count or 0) >= cached.count * (1 + self.REFIT_SHARE) + 5:
                cached = await self._fit(p, projects[p])
            views[p] = cached
        rows = found[len(order) :]
        if fields is not None:
            return views, [{f: int(v) for f, v in zip(fields, row, strict=True) if v is not None} for row in rows]
        return views, [_ints(r) for r in rows]

    async def totals(self, pairs: Sequence[tuple[str, str | None]]) -> list[dict[str, int]]:
        """Totals of (project, worker) pairs; worker None: the project's. One round trip."""
        names = [self.keys.worker(p, w) if w else self.keys.project(p) for p, w in pairs]
        return await self.hashes(names)

    async def snapshots(self, pairs: Sequence[tuple[str, str, ProjectCriteria]]) -> list[Proficiency]:
        """Workers' standings: their own sums, now, through their project's model."""
        views, totals = await self.views_and_totals({p: c for p, _, c in pairs}, [(p, w) for p, w, _ in pairs])
        return [proficiency(t, c, level_of(views[p].model, t)) for t, (p, _, c) in zip(totals, pairs, strict=True)]

    async def bucket_marks(self, keys: Sequence[str]) -> list[BucketMarks]:
        """Each bucket hash's marks (`BucketMarks`), without reading its buckets."""

        def build(pipe: Any) -> None:
            for k in keys:
                pipe.hmget(k, ("_hi", "_first"))

        return [
            BucketMarks(*(None if v is None else int(v) for v in row))
            for row in await self.state.read(build, "bucket marks")
        ]

    async def windows(
        self, reads: Sequence[tuple[str, int, int, int, Sequence[str], int | None]]
    ) -> list[dict[str, int]]:
        """The buckets of each (key, as_of, window_s, bucket_s, parts, first) whose start lies in
        (as_of - window_s, as_of] and not before `first`, by name (`window_fields`), in one round
        trip. A bucket hash keeps `history_s` (7 days) and an alert window is a day: reading whole
        hashes, as every batch of the proficiency step did, read seven times the fields it needed
        (6,048 per hash at the default 5-minute buckets, against 864); and a young project's hash
        holds a few buckets of its window: naming all 864 cost a worker a tenth of its time at
        half load (packing the names), where `first` leaves the few."""
        names = [window_fields(as_of, w, b, parts, first) for _, as_of, w, b, parts, first in reads]

        asked = [(k, fields) for (k, *_), fields in zip(reads, names, strict=True) if fields]

        def build(pipe: Any) -> None:
            for k, fields in asked:  # HMGET takes one field at least; an empty window reads nothing
                pipe.hmget(k, fields)

        found = iter(await self.state.read(build, "windows") if asked else [])
        out = []
        for fields in names:
            values = next(found) if fields else []
            out.append({f: int(v) for f, v in zip(fields, values, strict=True) if v is not None})
        return out

    async def hashes(self, keys: Sequence[str]) -> list[dict[str, int]]:
        def build(pipe: Any) -> None:
            for k in keys:
                pipe.hgetall(k)

        return [_ints(r) for r in await self.state.read(build, "hashes")]

    async def evidence(self, pairs: Sequence[tuple[str, str]]) -> list[list[tuple[str, float]]]:
        """Each (project, worker)'s latest evidence in event-time order: (kind, value)."""

        def build(pipe: Any) -> None:
            for p, w in pairs:
                pipe.zrange(self.keys.worker(p, w, "evidence"), 0, -1)

        out = []
        for members in await self.state.read(build, "evidence"):
            seq = []
            for m in members:
                kind, value, _ = _text(m).split(":", 2)
                seq.append((kind, int(value) / 1_000_000))
            out.append(seq)
        return out

    async def confusions(self, project_id: str, worker_id: str) -> dict[tuple[str, str], int]:
        """(true label, given label) -> count, against known answers ('' for missed / extra)."""
        raw = await self.state.counters(self.keys.worker(project_id, worker_id, "confusions"))
        return {tuple(k.split("\t", 1)): v for k, v in raw.items()}  # type: ignore[misc]

    async def workers(self, project_id: str) -> dict[str, int]:
        """Workers of a project with their number of scored annotations."""
        return await self.state.counters(self.keys.project(project_id, "workers"))


Spans = Mapping[str, tuple[int, int]]
"""Where each annotation's JSON lies in an item state's JSON, in the state's order (`ItemState.encode`)."""

HEAD = b"@"  # starts a stored head: `@<annotation ids, JSON>\n<the state's JSON without annotations>`
_ANNOTATIONS = b'"annotations":['


class Stored(NamedTuple):
    """An item state as loaded: its JSON with the annotations in place (what the engine parses),
    the value its key held (what a write compares with), the annotations in its hash, and where
    each one's JSON lies in `full` (the hash's own bytes: a state parsed afresh splices them back
    when written, so what a worker stores stays what it loads)."""

    full: bytes
    raw: bytes
    ids: frozenset[str]
    spans: dict[str, tuple[int, int]]


def split_state(full: bytes, spans: Spans) -> tuple[bytes, dict[str, bytes]]:
    """A state's JSON as `ItemState.encode` makes it (annotations last) -> the head stored under
    `Keys.item` and each annotation's JSON, stored once in `Keys.item_annotations`. Why: a state
    holds every annotation of its item and is written after each input, so writing it whole grew
    with the square of an item's annotations (a crowd item answered by 20 workers wrote 20 states
    of up to 20 answers); a head and the new annotation grow with one."""
    key = min((start for start, _ in spans.values()), default=len(full) - 2) - len(_ANNOTATIONS)
    if full[key : key + len(_ANNOTATIONS)] != _ANNOTATIONS or not full.endswith(b"]}"):
        raise ValueError("not a state as ItemState.encode makes it: its annotations must come last")
    head = full[:key].removesuffix(b",") + b"}"
    return HEAD + orjson.dumps(list(spans)) + b"\n" + head, {e: full[a:b] for e, (a, b) in spans.items()}


def join_state(raw: bytes, annotations: Mapping[bytes, bytes]) -> Stored:
    """A stored value and its item's annotation hash (read together, atomically) -> the state as
    loaded, its JSON byte for byte what `ItemState.encode` made. A value without a head is a whole
    state written before the split: it is its own JSON. An annotation the head names and the hash
    lacks (a key evicted or deleted by hand) is left out, and logged: the state loses it, where
    refusing the item would stop its partition for good."""
    held = frozenset(k.decode() for k in annotations)
    if not raw.startswith(HEAD):
        return Stored(raw, raw, held, {})
    line = raw.index(b"\n")
    ids, head = orjson.loads(raw[1:line]), raw[line + 1 :]
    out = bytearray(head[:-1])
    out += b"," + _ANNOTATIONS if len(head) > 2 else _ANNOTATIONS
    spans: dict[str, tuple[int, int]] = {}
    for event_id in ids:
        part = annotations.get(event_id.encode())
        if part is None:
            log.error("an item state names annotation %r, which its hash lacks: left out", event_id)
            continue
        if spans:
            out += b","
        start = len(out)
        out += part
        spans[event_id] = (start, len(out))
    out += b"]}"
    return Stored(bytes(out), raw, held, spans)


class Candidate(NamedTuple):
    """A timer index entry read for a check: the item, its oldest waiting submission (epoch s),
    its input partition and the set it was found in (an earlier version's index, or a `watched`
    set that should hold it, or not: the timer moves entries whose state says otherwise)."""

    item_id: str
    since: float
    partition: int
    found_in: str


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _member(workers: int, project_id: str) -> str:
    """A `watched` set's name in its partition's list (`Keys.watch_sets`), parsed by `watched`."""
    return f"{workers}:{project_id}"


class ItemStore:
    """Item state in Redis, read for a batch in one round trip and written back in two (the
    states, then the index entries of those written).

    It replaced a Faust table: with it, the score step runs on a plain consumer group that
    commits only what it applied (faust-streaming committed offsets of events it never processed
    after a restart; docs/reliability.md). Writes replace the head and add the annotations the
    head names that the hash lacks, so a batch written again after a redelivery changes nothing."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.keys = state.keys
        self._swap: AsyncScript = state.client.register_script(self.SWAP)
        self._prune: AsyncScript = state.client.register_script(self.PRUNE)
        self._load: AsyncScript = state.client.register_script(self.LOAD)
        state.guard.scripts += [self._swap, self._prune, self._load]
        # partitions whose old timer index (`Keys.waiting`) the timer last found empty: changes
        # there no longer remove entries from it
        self.legacy_empty: set[int] = set()

    # an item's head and annotations, read together: a write between two reads could delete
    # annotations the head read first still names (retention, the per-item limit)
    LOAD = """
    return {redis.call('GET', KEYS[1]), redis.call('HGETALL', KEYS[2])}
    """

    async def load(self, item_ids: Sequence[str]) -> dict[str, bytes]:
        """The states of `item_ids` (those that have one), as JSON."""
        return {k: v.full for k, v in (await self.load_due(item_ids, {}))[0].items()}

    # write an item's head only over the value it was derived from (or its absence): a worker
    # that lost its partitions during a long Redis outage must not set an item back (an empty
    # new value deletes the item: retention). With the head, the annotations its hash lacks
    # (ARGV[3] pairs of id and JSON), and those it no longer names go (the rest of ARGV)
    SWAP = """
    local cur = redis.call('GET', KEYS[1])
    if cur == ARGV[1] or (cur == false and ARGV[1] == '') then
      if ARGV[2] == '' then redis.call('DEL', KEYS[1], KEYS[2]) return 1 end
      redis.call('SET', KEYS[1], ARGV[2])
      local n = tonumber(ARGV[3])
      if n > 0 then redis.call('HSET', KEYS[2], unpack(ARGV, 4, 3 + 2 * n)) end
      if #ARGV > 3 + 2 * n then redis.call('HDEL', KEYS[2], unpack(ARGV, 4 + 2 * n)) end
      return 1
    end
    if cur == ARGV[2] or (cur == false and ARGV[2] == '') then return 1 end
    return 0
    """

    # drop a partition's empty `watched` sets from its list: atomic, so an item added meanwhile
    # (ZADD, then SADD, in one pipeline) keeps its set listed
    PRUNE = """
    for i = 2, #KEYS do
      if redis.call('ZCARD', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i - 1]) end
    end
    return 1
    """

    async def store(
        self,
        changed: Mapping[str, tuple[bytes, Spans]],
        waiting: Mapping[str, tuple[int, Waiting | None, Waiting | None]],
        loaded: Mapping[str, Stored] | None = None,
        due: Mapping[str, tuple[int, float | None]] | None = None,
        progress: Mapping[str, int] | None = None,
    ) -> None:
        """Write changed item states (`ItemState.encode`'s JSON and spans; an empty JSON deletes
        the item: retention), each only over the state it was derived from (`loaded`, as
        `load_due` gave it; raises `ItemConflict` when another worker wrote
        it meanwhile; None: unconditionally, as a rebuild does), each item's place in its
        partition's timer index (`waiting[item] = (partition, its entry in the state it was
        derived from, its entry now)`, as `items.watched` gives them) and in its retention index
        (`due[item] = (partition, when it falls out of retention, or None)`), and the batch's
        `progress` ('<topic>:<partition>' -> last offset, `Keys.inputs`). A write seen again (a
        retry after a lost reply) succeeds."""
        due = due or {}
        if not changed and not waiting and not due and not progress:
            return
        names = list(changed)
        if loaded is None:  # a rebuild: the topics are the truth, written as they are

            async def rebuild() -> list[Any]:
                pipe = self.state.client.pipeline(transaction=False)
                for item_id in names:
                    full, spans = changed[item_id]
                    pipe.delete(self.keys.item(item_id), self.keys.item_annotations(item_id))
                    if full:
                        head, annotations = split_state(full, spans)
                        pipe.set(self.keys.item(item_id), head)
                        if annotations:
                            pipe.hset(self.keys.item_annotations(item_id), mapping=annotations)
                self._index_writes(pipe, waiting, due, progress, set())
                return await pipe.execute()

            await self.state.guard.run(rebuild, "items")
            return

        calls = [self._swap_args(item_id, changed[item_id], loaded.get(item_id)) for item_id in names]

        async def swap() -> list[Any]:
            pipe = self.state.client.pipeline(transaction=False)
            for keys, args in calls:
                evalsha(pipe, self._swap, keys, args)
            return await pipe.execute()

        # the states first, then the indexes of those written: an item's index entries move only
        # with the state they derive from, so a worker whose partitions moved on (its writes
        # refused) cannot take an entry out of the index, nor add one, under the new owner's state
        lost = [item for item, ok in zip(names, await self.state.guard.run(swap, "items"), strict=True) if not ok]
        if lost:
            await self.state.guard.verify()  # a flushed Redis loses the states too: StateLost first
        skip = set(lost)

        async def index() -> list[Any]:
            pipe = self.state.client.pipeline(transaction=False)
            self._index_writes(pipe, waiting, due, progress, skip)
            return await pipe.execute()

        await self.state.guard.run(index, "items")
        if lost:
            raise ItemConflict(f"{len(lost)} item state(s) changed by another worker meanwhile, e.g. {lost[0]!r}")

    def _swap_args(
        self, item_id: str, new: tuple[bytes, Spans], was: Stored | None
    ) -> tuple[list[str], list[bytes | str | int]]:
        """The SWAP script's keys and arguments for one item."""
        keys = [self.keys.item(item_id), self.keys.item_annotations(item_id)]
        expected = was.raw if was is not None else b""
        if not new[0]:
            return keys, [expected, b"", 0]
        head, annotations = split_state(*new)
        held = was.ids if was is not None else frozenset()
        added = [(e, j) for e, j in annotations.items() if e not in held]
        gone = [e for e in held if e not in annotations]
        return keys, [expected, head, len(added), *(x for pair in added for x in pair), *gone]

    def _watch(self, pipe: Any, item_id: str, partition: int, entry: Waiting) -> None:
        pipe.zadd(self.keys.watched(partition, entry.workers, entry.project_id), {item_id: entry.since.timestamp()})
        pipe.sadd(self.keys.watch_sets(partition), _member(entry.workers, entry.project_id))

    async def rewatch(self, moves: Sequence[tuple[str, int, str, Waiting | None]]) -> None:
        """Move timer entries found in the wrong set: (item, partition, the set it was found in,
        its entry as its state says, None: none). The caller holds the score step's lock and read
        the states under it, so they are the ones the entries must follow."""

        async def call() -> list[Any]:
            pipe = self.state.client.pipeline(transaction=False)
            for item_id, partition, found_in, entry in moves:
                pipe.zrem(found_in, item_id)
                if entry is not None:
                    self._watch(pipe, item_id, partition, entry)
            return await pipe.execute()

        if moves:
            await self.state.guard.run(call, "waiting")

    def _index_writes(
        self,
        pipe: Any,
        waiting: Mapping[str, tuple[int, Waiting | None, Waiting | None]],
        due: Mapping[str, tuple[int, float | None]],
        progress: Mapping[str, int] | None,
        skip: set[str],
    ) -> None:
        """The timer and retention index entries of `store`, but those of items in `skip`."""
        for item_id, (partition, was, now) in waiting.items():
            if item_id in skip:
                continue
            if partition not in self.legacy_empty:
                pipe.zrem(self.keys.waiting(partition), item_id)
            if was is not None and (now is None or (was.workers, was.project_id) != (now.workers, now.project_id)):
                pipe.zrem(self.keys.watched(partition, was.workers, was.project_id), item_id)
            if now is not None:  # written even when unchanged: it may be missing (an earlier version's
                # item, in the old index only; a worker that died between a batch's states and entries)
                self._watch(pipe, item_id, partition, now)
        for item_id, (partition, when) in due.items():
            if item_id in skip:
                continue
            if when is None:
                pipe.zrem(self.keys.expiry(partition), item_id)
            else:
                pipe.zadd(self.keys.expiry(partition), {item_id: when})
        if progress:
            pipe.hset(self.keys.inputs(), mapping=dict(progress))

    async def load_due(
        self, item_ids: Sequence[str], now: Mapping[int, float], limit: int = 500
    ) -> tuple[dict[str, Stored], list[tuple[str, int]]]:
        """The states of `item_ids` and (item, partition) of up to `limit` items per partition out
        of retention at its clock (`now[partition]`, event time), with their states too. One round
        trip (a batch's fixed cost is mostly round trips); the states of due items not asked for
        take a second one, which only a sweep pays."""
        partitions = sorted(now)

        # whether the old timer index still holds entries, until it is found empty: the store
        # then stops removing entries from it (the timer's read tells it if one appears again)
        legacy = [p for p in partitions if p not in self.legacy_empty]

        def build(pipe: Any) -> None:
            for item_id in item_ids:
                evalsha(pipe, self._load, [self.keys.item(item_id), self.keys.item_annotations(item_id)], [])
            for p in partitions:
                pipe.zrangebyscore(self.keys.expiry(p), "-inf", now[p], start=0, num=limit)
            for p in legacy:
                pipe.exists(self.keys.waiting(p))

        results = await self.state.read(build, "items")
        if legacy:
            self.legacy_empty |= {p for p, n in zip(legacy, results[-len(legacy) :], strict=True) if not n}
            results = results[: -len(legacy)]
        states: dict[str, Stored] = {}
        for item_id, (raw, flat) in zip(item_ids, results, strict=False):
            if raw is not None:
                states[item_id] = join_state(raw, dict(zip(flat[::2], flat[1::2], strict=True)))
        expiring: list[tuple[str, int]] = []
        for p, found in zip(partitions, results[len(item_ids) :], strict=True):
            expiring += [(_text(k), p) for k in found]
        asked = set(item_ids)
        more = sorted({i for i, _ in expiring if i not in asked})
        if more:
            states |= (await self.load_due(more, {}))[0]
        return states, expiring

    async def watched(
        self, partitions: Sequence[int], rules: Callable[[set[str]], Awaitable[Rules]], now: float, slack: float = 1.0
    ) -> list[Candidate]:
        """The entries of the items of these partitions whose round may be due at `now` (epoch s)
        under `rules` (project -> (timeout, minimum annotators), asked for the projects found),
        and every entry of the old whole-partition index, sorted. `slack`: also those due that
        many seconds later (the engine decides exactly). A few round trips however many items
        wait (the sets, the criteria, the due prefixes, and unlisting sets found empty): the timer
        loads only these items' states."""
        slack = max(slack, 0.0)

        def listed(pipe: Any) -> None:
            for p in partitions:
                pipe.smembers(self.keys.watch_sets(p))
                pipe.zrange(self.keys.waiting(p), 0, -1, withscores=True)

        found = await self.state.read(listed, "waiting")
        sets: list[tuple[int, int, str]] = []
        out: list[Candidate] = []
        for p, members, legacy in zip(partitions, found[::2], found[1::2], strict=True):
            for m in members:
                workers, _, project = _text(m).partition(":")
                sets.append((p, int(workers), project))
            if legacy:
                self.legacy_empty.discard(p)
            else:
                self.legacy_empty.add(p)
            out += [Candidate(_text(k), float(v), p, self.keys.waiting(p)) for k, v in legacy]
        if not sets:
            return sorted(out)
        known = await rules({project for _, _, project in sets})
        read = [(p, w, project, rule) for p, w, project in sets if (rule := known.get(project)) and w >= rule[1]]

        def ranges(pipe: Any) -> None:
            for p, w, project in sets:
                pipe.zcard(self.keys.watched(p, w, project))
            for p, w, project, (timeout, _) in read:
                pipe.zrangebyscore(self.keys.watched(p, w, project), "-inf", now - timeout + slack, withscores=True)

        results = await self.state.read(ranges, "waiting")
        for (p, w, project, _), entries in zip(read, results[len(sets) :], strict=True):
            out += [Candidate(_text(k), float(v), p, self.keys.watched(p, w, project)) for k, v in entries]
        empty = [entry for entry, n in zip(sets, results, strict=False) if n == 0]
        if empty:
            await self._prune_sets(empty)
        return sorted(out)

    async def _prune_sets(self, empty: Sequence[tuple[int, int, str]]) -> None:
        """Unlist sets found empty (each checked again inside the script)."""
        by_partition: dict[int, list[tuple[int, str]]] = {}
        for p, w, project in empty:
            by_partition.setdefault(p, []).append((w, project))

        async def call() -> list[Any]:
            pipe = self.state.client.pipeline(transaction=False)
            for p, entries in by_partition.items():
                keys = [self.keys.watch_sets(p)] + [self.keys.watched(p, w, project) for w, project in entries]
                evalsha(pipe, self._prune, keys, [_member(w, project) for w, project in entries])
            return await pipe.execute()

        await self.state.guard.run(call, "waiting")


class CriteriaStore:
    """Project criteria in Redis, shared by every worker; cached in-process for a few seconds."""

    def __init__(self, client: Redis, keys: Keys, ttl_s: float = 2.0, state: RedisState | None = None) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self.state = state or RedisState(client, keys)
        self._cache: dict[str, tuple[float, ProjectCriteria | None]] = {}

    async def get(self, project_id: str, now: float) -> ProjectCriteria | None:
        hit = self._cache.get(project_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        (raw,) = await self.state.read(lambda pipe: pipe.get(self.keys.criteria(project_id)), "criteria")
        criteria = None
        if raw is not None:
            try:
                criteria = decode(ProjectCriteria, raw)
            except SchemaError:
                criteria = None  # written by a newer goldstream: treat as unknown
        self._cache[project_id] = (now, criteria)
        return criteria

    def cached(self) -> list[ProjectCriteria | None]:
        """The criteria read so far (whatever their age)."""
        return [c for _, c in self._cache.values()]

    async def set(self, criteria: ProjectCriteria, now: float) -> None:
        key, raw = self.keys.criteria(criteria.project_id), criteria.to_bytes()
        await self.state.guard.run(lambda: self.client.set(key, raw), "criteria")
        self._cache[criteria.project_id] = (now, criteria)

    async def delete(self, project_id: str, now: float) -> None:
        await self.state.guard.run(lambda: self.client.delete(self.keys.criteria(project_id)), "criteria")
        self._cache[project_id] = (now, None)


class AlertFlags:
    """Firing / resolved state of each alert scope (hysteresis across batches and workers)."""

    SCRIPT = """
    local old = redis.call('HGET', KEYS[1], ARGV[1])
    if old == ARGV[2] then return 0 end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return 1
    """

    def __init__(self, client: Redis, keys: Keys, state: RedisState | None = None) -> None:
        self.client = client
        self.keys = keys
        self.state = state or RedisState(client, keys)
        self._set = client.register_script(self.SCRIPT)

    def key(self, project_id: str) -> str:
        return self.keys.project(project_id, "alerts")

    async def current(self, project_id: str) -> dict[str, str]:
        (raw,) = await self.state.read(lambda pipe: pipe.hgetall(self.key(project_id)), "alerts")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def change(self, project_id: str, field: str, state: str) -> bool:
        """Set a scope's state; True only for the caller that changed it (no double alerts)."""
        key = self.key(project_id)
        return bool(await self.state.guard.run(lambda: self._set(keys=[key], args=[field, state]), "alerts"))


def dead_letter_increment(letter: DeadLetter) -> Increment:
    """A dead letter's count by reason, once each: by its source position (stage, topic,
    partition, offset), from which its id derives too; a source without one (a replay's timer)
    by its id."""
    source = Position.of(f"{letter.stage}|{letter.source_topic}", letter.source_partition, letter.source_offset)
    return Increment("{deadletter}", letter.event_id, {"counts": {letter.reason: 1, "total": 1}}, at=source)


def alert_flag(alert: QualityAlert) -> tuple[str, str] | None:
    """The (field, state) of `AlertFlags` an alert left behind: the inverse of the engine's
    flag changes, so a rebuilt Redis holds the same alert states (qualification flags hold the
    qualification state the alert announced, see `scoring.policy.qualification_flag`)."""
    if alert.scope.value == "batch":
        return None  # batch verdicts are reports, not flags
    field_name = f"{alert.scope.value}:{alert.scope_id}:{alert.metric}"
    if alert.metric != "qualification" or alert.state == "resolved":
        return field_name, alert.state
    announced = (alert.detail or "").rpartition("-> ")[2].strip()
    return (field_name, announced) if announced in ("probation", "suspended") else None


def dump_state(fields: Mapping[str, Mapping[str, int]]) -> bytes:
    """Stable bytes of a set of hashes (snapshots and comparisons)."""
    return orjson.dumps({k: dict(sorted(v.items())) for k, v in sorted(fields.items())})
