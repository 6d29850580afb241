"""`goldstream replay`: drive the engine from a file instead of Kafka (DESIGN §3b).

Input lines are envelopes `{"topic": "annotations", "key": "...", "value": {...}}` (value null: a
tombstone). Every event the engine emits that the stream would feed back (scores, promoted gold)
is processed at once, so a replay is deterministic: the same file gives the same outputs and the
same Redis state, which is how tests check the live pipeline, and how users try a policy offline.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from goldstream.schemas.messages import Message
from goldstream.streams.engine import Emit, Engine, ItemState, Record, Settings
from goldstream.streams.memory import PARSED_ITEMS
from goldstream.streams.state import AlertFlags, CriteriaStore, Keys, ProficiencyStore, RedisState
from redis.asyncio import Redis

OUTPUTS = ("scores", "escalations", "alerts", "deadletter", "gold")
BATCH = 500  # records per batch, as the worker reads them (`batch_max`)


def read_envelopes(path: Path) -> Iterator[Record]:
    """Records from a JSONL file of envelopes; a line that is not one becomes a dead letter."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                env = orjson.loads(line)
                topic = env["topic"]
                value = env.get("value")
                raw = None if value is None else (value.encode() if isinstance(value, str) else orjson.dumps(value))
                key = env.get("key")
                yield Record(topic, raw, key.encode() if isinstance(key, str) else None, 0, n)
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                yield Record("replay-input", line.rstrip(b"\r\n"), None, 0, n)


def envelope(topic: str, message: Message | None, key: str | None = None) -> bytes:
    """One replay-file line for a message (what the simulator and tests write)."""
    value = None if message is None else orjson.Fragment(message.to_bytes())
    return orjson.dumps({"topic": topic, "key": key, "value": value}) + b"\n"


class KeptItems(MutableMapping[str, ItemState]):
    """A replay's item states: the `size` most recently used parsed, the others as the JSON the
    worker would store in Redis. Why: a replay holds every item within retention, and a parsed
    state takes about ten times its JSON (16 KB a kept annotation on the QC workloads), so a
    month of a busy project's history did not fit in memory. Each state's retention deadline is
    kept beside it (`due_by`), so a retention sweep parses only the items it expires."""

    def __init__(self, due: Callable[[ItemState], float | None], size: int = PARSED_ITEMS) -> None:
        self.size = size
        self._due = due
        self._parsed: OrderedDict[str, ItemState] = OrderedDict()
        self._raw: dict[str, bytes] = {}
        self._deadline: dict[str, float | None] = {}

    def __getitem__(self, item_id: str) -> ItemState:
        st = self._parsed.get(item_id)
        if st is not None:
            self._parsed.move_to_end(item_id)
            return st
        raw = self._raw.pop(item_id)  # KeyError: no such item
        st = self._parsed[item_id] = ItemState.model_validate_json(raw)
        self._evict()
        return st

    def __setitem__(self, item_id: str, st: ItemState) -> None:
        self._raw.pop(item_id, None)
        self._parsed[item_id] = st
        self._parsed.move_to_end(item_id)
        self._deadline[item_id] = self._due(st)
        self._evict()

    def __delitem__(self, item_id: str) -> None:
        if self._parsed.pop(item_id, None) is None:
            del self._raw[item_id]
        del self._deadline[item_id]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._deadline

    def __len__(self) -> int:
        return len(self._deadline)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._deadline))

    def due_by(self, now: float) -> list[str]:
        """The items whose retention ends by `now` (event time, epoch s)."""
        return [k for k, d in self._deadline.items() if d is not None and d <= now]

    def _evict(self) -> None:
        while len(self._parsed) > self.size:
            item_id, st = self._parsed.popitem(last=False)
            self._raw[item_id] = st.encode()[0]


@dataclass
class ReplayResult:
    """What a replay made: its outputs by topic (or only their number, when a `sink` took them)."""

    outputs: dict[str, list[Message]] = field(default_factory=lambda: {t: [] for t in OUTPUTS})
    inputs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTPUTS, 0))
    sink: Callable[[str, Message], None] | None = None


async def replay(
    records: Iterable[Record],
    redis: Redis,
    keys: Keys,
    *,
    settings: Settings | None = None,
    close_rounds: bool = False,
    dedup_ttl_s: int = 7 * 86_400,
    timer_s: float | None = 60.0,
    batch: int = BATCH,
    sink: Callable[[str, Message], None] | None = None,
    parsed_items: int = PARSED_ITEMS,
) -> ReplayResult:
    """Run records through a fresh engine whose proficiency lives under `keys` in `redis`, in
    batches of `batch` records, as the worker does: each batch's item records, then the scores
    they made (Redis, alerts), then the gold they promoted, before the next batch. The same
    file and batch size give the same outputs and Redis state, byte for byte.

    The consensus timer runs on event time: when an annotation's `submitted_at` is `timer_s`
    past the last tick, the batch so far is processed and the rounds waiting past their
    project's `consensus.timeout_s` are closed, as the live worker's timer closes them on its
    clock (a replay of history has no other clock worth using). None: no timer.
    `close_rounds`: close every round still waiting at the end. `sink(topic, message)`: takes
    each output as it is made instead of the result keeping them all (a replay of months of
    history makes millions; `OutputFiles` writes them out). `parsed_items`: how many item states
    stay parsed; the others are kept as JSON (`KeptItems`)."""
    engine = Engine(
        items={},  # replaced below, once the processor's retention rule exists
        criteria=CriteriaStore(redis, keys, ttl_s=float("inf")),
        proficiency=ProficiencyStore(RedisState(redis, keys, dedup_ttl_s)),
        alerts=AlertFlags(redis, keys),
        settings=settings or Settings(stage="replay"),
        clock=lambda: 0.0,  # logical time: replays are byte-for-byte repeatable
    )
    kept_items = engine.item_processor.items = KeptItems(engine.item_processor.due, parsed_items)
    result = ReplayResult(sink=sink)
    swept: list[float] = []  # event time of the last retention sweep
    pending: list[Record] = []
    submitted: list[float | None] = []  # each pending record's `_submitted_at`, read once
    ticks: list[tuple[int, datetime]] = []  # timer ticks inside the pending batch: (position, moment)
    tick: list[float] = []  # the timer's last tick, in event time (epoch seconds)
    earliest: list[float] = []  # the earliest submission among the pending records

    async def run(batch_: list[Record], ticks_: Sequence[tuple[int, datetime]] = ()) -> None:
        await expire()  # retention first, at the event time reached before the batch, as the worker
        while batch_ or ticks_:
            emits = await engine.process(batch_, ticks_)
            ticks_ = ()
            _collect(result, emits)
            scores = [(_fed_back(e, False), e.value) for e in emits if e.topic == "scores"]
            for start in range(0, len(scores), batch):
                _collect(result, await engine.proficiency_processor.apply(scores[start : start + batch]))  # type: ignore[arg-type]
            batch_ = [_fed_back(e) for e in emits if e.topic == "gold"]

    async def expire() -> None:
        """Item retention on event time, as the worker applies it per batch; a sweep of every
        item each time the clock moved a tenth of the retention (a replay holds all its items)."""
        processor, retention = engine.item_processor, engine.settings.item_retention_s
        clocks = processor.retention_clocks(processor.clocks)  # a file's records are all partition 0
        now = max(clocks.values(), default=None)
        if now is None or (swept and now - swept[0] < retention / 10):
            return
        swept[:] = [now]
        due = kept_items.due_by(now)
        expired = processor.expire(due, now)
        processor.removed.clear()
        await engine.count_dead(expired)
        _collect(result, expired)

    async def flush() -> None:
        if pending or ticks:
            await run(pending[:], ticks[:])
            pending.clear()
            submitted.clear()
            ticks.clear()
            earliest.clear()

    async def close(now: datetime | None) -> None:
        """Close the rounds waiting past their timeout at `now` (None: every waiting round)."""
        requests = await engine.timed_out(now)
        await run([engine.item_processor.timer_record(r) for r in requests])

    def shortest_timeout() -> float:
        """The shortest consensus timeout among the projects seen (a bound for rounds not yet
        indexed: those of the pending batch)."""
        return min((c.consensus.timeout_s for c in engine.ingress.criteria.cached() if c is not None), default=0.0)

    async def gold_may_race(at: float) -> bool:
        """Whether a pending review promotes gold for an item whose round the tick at `at` could
        close: that gold would stop the round from closing, had the batch ended at the tick.
        Only such a review needs the batch cut there (on a workforce with many reviews, cutting at
        every tick that had any review pending split a replay into hundreds of small batches)."""
        promoting = {r.key for r in pending if r.topic == "reviews" and _promotes(r)}
        if not promoting:
            return False
        shortest = shortest_timeout()
        closing = {
            r.key
            for r, t in zip(pending, submitted, strict=True)
            if r.topic == "annotations" and (t is None or t + shortest <= at)
        }
        closing |= {item.encode() for item in await engine.item_processor.closing_by(at)}
        return bool(promoting & closing)

    async def may_time_out(at: float) -> bool:
        """Whether a round could have timed out by `at`: else the tick needs no stop (the batch
        goes on filling), which gives the same rounds as stopping at every tick."""
        due = await engine.item_processor.next_due()
        if due is not None and due <= at:
            return True
        if not earliest:
            return False
        return earliest[0] + shortest_timeout() <= at

    for rec in records:
        result.inputs += 1
        if rec.topic == "replay-input":  # a line that is not an envelope at all
            dead = engine.dead(rec, "undecodable", "not a replay envelope {topic, key, value}")
            await engine.count_dead([dead])
            _collect(result, [dead])
            continue
        if rec.topic == "scores":
            await flush()
            _collect(result, await engine.apply_scores([rec]))
            continue
        at = _submitted_at(rec) if timer_s is not None else None
        if at is not None:
            if not tick:
                tick.append(at)
            elif at - tick[0] >= timer_s:  # type: ignore[operator]
                tick[0] = at  # the ticks fall where they would if each one stopped the batch
                if await may_time_out(at):
                    now = datetime.fromtimestamp(at, UTC)
                    if not pending or await gold_may_race(at):
                        # nothing pending (a replay one record at a time): the timer's requests go
                        # alone, so the next record sees the scores they make. A pending review may
                        # promote gold, which is fed back after its batch and before the timer's
                        # requests: the batch must end at the tick to keep that order
                        await flush()
                        await close(now)
                    else:
                        ticks.append((len(pending), now))  # closed in the batch, in record order
        if rec.topic == "projects":
            await flush()  # criteria apply from here on, not to the batch before them
            await run([rec])
            continue
        pending.append(rec)
        submitted.append(at)
        if at is not None:
            earliest[:] = [min(earliest[0], at)] if earliest else [at]
        if len(pending) >= batch:
            await flush()
    await flush()
    if close_rounds:
        await close(None)
    return result


def _promotes(rec: Record) -> bool:
    """Does a review record promote gold? (True when it cannot be read: the engine decides.)"""
    try:
        value = orjson.loads(rec.value or b"null")
    except orjson.JSONDecodeError:
        return True
    return not isinstance(value, dict) or value.get("promote_to_gold", False) is not False


def _submitted_at(rec: Record) -> float | None:
    if rec.topic != "annotations" or rec.value is None:
        return None
    try:
        return datetime.fromisoformat(orjson.loads(rec.value)["submitted_at"]).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # the engine dead-letters it


def _fed_back(e: Emit, encode: bool = True) -> Record:
    """An output the pipeline consumes again (a score, promoted gold), as its consumer reads it
    (`encode` False: without its bytes, for a step that is handed the message itself)."""
    value = e.value.to_bytes() if encode and e.value is not None else None
    return Record(e.topic, value, e.key.encode() if e.key else None)


def _collect(result: ReplayResult, emits: Iterable[Emit]) -> None:
    for e in emits:
        if e.value is not None and e.topic in result.counts:
            result.counts[e.topic] += 1
            if result.sink is None:
                result.outputs[e.topic].append(e.value)
            else:
                result.sink(e.topic, e.value)


async def proficiency_snapshot(redis: Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """Every counter hash and evidence sequence under the prefix (key names without the prefix;
    a sequence as member -> event time in ms). Left out: applied positions, the score step's
    progress and dedup keys (a live run's positions are Kafka offsets, a replay's its file's
    lines), criteria, alert flags, item states, and the risk histograms (`:risks`): a risk is
    judged with the model as it stood when the annotation was scored, which depends on how far
    the proficiency step had got, so a live run and a replay of its inputs differ there (a
    rebuild from the scores topic does not)."""
    out: dict[str, dict[str, int]] = {}
    async for raw_key in redis.scan_iter(match=f"{keys.prefix}:*", count=1000):
        key = raw_key.decode()
        if (
            ":seen:" in key
            or key.startswith(f"{keys.prefix}:criteria:")
            or keys.is_item(key)
            or key.endswith((":alerts", ":risks", ":applied"))
            or key == keys.inputs()
        ):
            continue
        kind = await redis.type(raw_key)
        if kind == b"hash":  # without a bucket hash's marks ('_hi', '_lo', '_first')
            fields = await redis.hgetall(raw_key)
            out[key[len(keys.prefix) + 1 :]] = {k.decode(): int(v) for k, v in sorted(fields.items()) if k[:1] != b"_"}
        elif kind == b"zset" and key.endswith(":evidence"):
            entries = await redis.zrange(raw_key, 0, -1, withscores=True)
            out[key[len(keys.prefix) + 1 :]] = {m.decode(): round(score * 1000) for m, score in sorted(entries)}
    return dict(sorted(out.items()))


class OutputFiles:
    """scores.jsonl, escalations.jsonl, alerts.jsonl, deadletter.jsonl, gold.jsonl and
    proficiency.json in a directory, written as a replay makes them (`write` is a replay's
    `sink`), so its memory does not grow with its outputs. Each file appears whole, or not at
    all: written under a temporary name and renamed by `finish`."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self._files = {t: open(out_dir / f"{t}.tmp", "wb") for t in OUTPUTS}

    def write(self, topic: str, message: Message) -> None:
        self._files[topic].write(message.to_bytes() + b"\n")

    def finish(self, snapshot: dict) -> None:
        """Close the files under their names and write the proficiency snapshot."""
        for topic, fh in self._files.items():
            fh.close()
            os.replace(self.out_dir / f"{topic}.tmp", self.out_dir / f"{topic}.jsonl")
        (self.out_dir / "proficiency.json").write_bytes(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2) + b"\n")

    def discard(self) -> None:
        """Close and remove the unfinished files (a replay that failed)."""
        for topic, fh in self._files.items():
            fh.close()
            (self.out_dir / f"{topic}.tmp").unlink(missing_ok=True)
