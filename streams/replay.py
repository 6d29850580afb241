"""`goldstream replay`: drive the engine from a file instead of Kafka (DESIGN §3b).

Input lines are envelopes `{"topic": "annotations", "key": "...", "value": {...}}` (value null: a
tombstone). Every event the engine emits that the stream would feed back (scores, promoted gold)
is processed at once, so a replay is deterministic: the same file gives the same outputs and the
same Redis state, which is how tests check the live pipeline, and how users try a policy offline.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from redis.asyncio import Redis

from schemas.messages import Message
from streams.engine import Emit, Engine, Record, Settings
from streams.state import AlertFlags, CriteriaStore, Keys, ProficiencyStore, RedisState

OUTPUTS = ("scores", "escalations", "alerts", "deadletter", "gold")
FEEDBACK = {"scores", "gold"}  # topics the pipeline itself consumes again


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


@dataclass
class ReplayResult:
    outputs: dict[str, list[Message]] = field(default_factory=lambda: {t: [] for t in OUTPUTS})
    inputs: int = 0


async def replay(
    records: Iterable[Record],
    redis: Redis,
    keys: Keys,
    *,
    settings: Settings | None = None,
    close_rounds: bool = False,
    dedup_ttl_s: int = 7 * 86_400,
    timer_s: float | None = 60.0,
) -> ReplayResult:
    """Run records through a fresh engine whose proficiency lives under `keys` in `redis`.

    The consensus timer runs on event time: every `timer_s` of annotations' `submitted_at`, the
    rounds waiting past their project's `consensus.timeout_s` are closed, as the live worker's
    timer closes them on its clock (a replay of history has no other clock worth using; without
    it, a round short of its overlap waited for the end of the file). None: no timer.
    `close_rounds`: close every round still waiting at the end."""
    engine = Engine(
        items={},
        criteria=CriteriaStore(redis, keys, ttl_s=float("inf")),
        proficiency=ProficiencyStore(RedisState(redis, keys, dedup_ttl_s)),
        alerts=AlertFlags(redis, keys),
        settings=settings or Settings(stage="replay"),
        clock=lambda: 0.0,  # logical time: replays are byte-for-byte repeatable
    )
    result = ReplayResult()
    queue: deque[Record] = deque()
    clock: list[float] = []  # the timer's last tick, in event time (epoch seconds)

    async def tick(rec: Record) -> None:
        if timer_s is None or rec.topic != "annotations" or rec.value is None:
            return
        try:
            at = datetime.fromisoformat(orjson.loads(rec.value)["submitted_at"]).timestamp()
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # the engine dead-letters it
        if not clock:
            clock.append(at)
        elif at - clock[0] >= timer_s:
            clock[0] = at
            for req in await engine.timed_out(datetime.fromtimestamp(at, UTC)):
                queue.append(Record("control", req.to_bytes(), req.item_id.encode()))

    async def run(rec: Record) -> None:
        if rec.topic == "replay-input":  # a line that is not an envelope at all
            dead = engine.dead(rec, "undecodable", "not a replay envelope {topic, key, value}")
            await engine.count_dead([dead])
            _collect(result, dead, queue)
            return
        queue.append(rec)
        await tick(rec)
        while queue:
            emits = await engine.handle(queue.popleft())
            for e in emits:
                _collect(result, e, queue)

    for rec in records:
        result.inputs += 1
        await run(rec)
    if close_rounds:
        for e in await engine.close_waiting():
            _collect(result, e, queue)
        while queue:
            for e in await engine.handle(queue.popleft()):
                _collect(result, e, queue)
    return result


def _collect(result: ReplayResult, e: Emit, queue: deque[Record]) -> None:
    if e.value is not None and e.topic in result.outputs:
        result.outputs[e.topic].append(e.value)
    if e.topic in FEEDBACK:
        raw = None if e.value is None else e.value.to_bytes()
        queue.append(Record(e.topic, raw, e.key.encode() if e.key else None))


async def proficiency_snapshot(redis: Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """Every counter hash and evidence sequence under the prefix (key names without the prefix;
    a sequence as member -> event time in ms). Left out: dedup keys, criteria, alert flags, item
    states, and the risk histograms (`:risks`): a risk is judged with the model as it stood when
    the annotation was scored, which depends on how far the proficiency step had got, so a live
    run and a replay of its inputs differ there (a rebuild from the scores topic does not)."""
    out: dict[str, dict[str, int]] = {}
    async for raw_key in redis.scan_iter(match=f"{keys.prefix}:*", count=1000):
        key = raw_key.decode()
        if ":seen:" in key or key.startswith(f"{keys.prefix}:criteria:") or key.endswith((":alerts", ":risks")):
            continue
        kind = await redis.type(raw_key)
        if kind == b"hash":
            fields = await redis.hgetall(raw_key)
            out[key[len(keys.prefix) + 1 :]] = {k.decode(): int(v) for k, v in sorted(fields.items())}
        elif kind == b"zset" and key.endswith(":evidence"):
            entries = await redis.zrange(raw_key, 0, -1, withscores=True)
            out[key[len(keys.prefix) + 1 :]] = {m.decode(): round(score * 1000) for m, score in sorted(entries)}
    return dict(sorted(out.items()))


def write_outputs(result: ReplayResult, snapshot: dict, out_dir: Path) -> dict[str, int]:
    """scores.jsonl, escalations.jsonl, alerts.jsonl, deadletter.jsonl, gold.jsonl, proficiency.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for topic, messages in result.outputs.items():
        path = out_dir / f"{topic}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            for m in messages:
                fh.write(m.to_bytes() + b"\n")
        os.replace(tmp, path)
        counts[topic] = len(messages)
    (out_dir / "proficiency.json").write_bytes(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2) + b"\n")
    return counts
