"""One ingress for both processors: records in, typed messages or dead letters out.

Decoding, dead-lettering and resolving a project's criteria are the same for every input topic,
so they live here once (they were repeated in five handlers). A processor asks the ingress for
a whole batch: criteria are read once per project and batch, dead letters counted in one write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from goldstream.schemas.base import SchemaError, decode, is_id
from goldstream.schemas.criteria import ProjectCriteria
from goldstream.schemas.messages import DeadLetter, Message
from goldstream.streams.state import CriteriaStore, RedisState, dead_letter_increment
from shapely.errors import GEOSException

# What a defect triggered by one input raises (not Redis, Kafka or OS errors, which are the
# infrastructure's and must reach the worker): the input becomes a dead letter, the worker lives.
INPUT_DEFECTS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ArithmeticError,
    AssertionError,
    RecursionError,
    MemoryError,
    GEOSException,
)


@dataclass(frozen=True)
class Record:
    """One input: a Kafka message, or one line of a replay file."""

    topic: str  # logical topic: annotations, gold, reviews, projects, scores
    value: bytes | None
    key: bytes | None = None
    partition: int = -1
    offset: int = -1
    source: str | None = None  # the physical topic (or file) it came from, for dead letters


@dataclass(frozen=True)
class Emit:
    """One output: a message for a logical topic (value None: a tombstone)."""

    topic: str
    key: str | None
    value: Message | None


@dataclass
class Settings:
    """Engine behaviour that is not a project's criteria."""

    unknown_projects: str = "default"  # or "deadletter"
    stage: str = "score"
    # how long an item is kept after its latest input, in event time (0: for ever): then what is
    # left is a marker, so that a review of one of its annotations is dead-lettered as such
    item_retention_s: float = 0.0


@dataclass
class Ingress:
    """Decode, dead-letter and resolve criteria, for whichever processor reads the batch."""

    criteria: CriteriaStore
    state: RedisState
    settings: Settings = field(default_factory=Settings)
    clock: Callable[[], float] = time.time  # wall clock, only for caches and received_at stamps

    def now(self) -> float:
        return self.clock()

    def dead(self, rec: Record, reason: str, error: str, errors: Iterable | None = None) -> Emit:
        letter = DeadLetter.of(
            rec.value or b"",
            topic=rec.source or rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            reason=reason,
            error=error,
            key=rec.key,
            stage=self.settings.stage,
            received_at=datetime.fromtimestamp(self.now(), UTC),
            errors=[{"loc": e.loc, "msg": e.msg, "type": e.type} for e in (errors or [])],
        )
        return Emit("deadletter", None, letter)

    def decode(self, rec: Record, model: type[Message]) -> Message | Emit:
        """The message, or the dead letter that says why the bytes are not one."""
        if rec.value is None:
            return self.dead(rec, "empty", "message has no value")
        try:
            return decode(model, rec.value)
        except SchemaError as exc:
            reason = "undecodable" if exc.reason == "json_invalid" else "schema"
            if exc.reason == "too_large":
                reason = "too_large"
            return self.dead(rec, reason, str(exc), exc.errors)

    def tombstone_key(self, rec: Record) -> str | Emit:
        """The id a tombstone (null value) retracts, or its dead letter: without a key, or with one
        that is not an id, it can retract nothing."""
        if not rec.key:
            return self.dead(rec, "empty", "a tombstone (null value) without a key retracts nothing")
        try:
            key = rec.key.decode()
        except UnicodeDecodeError:
            return self.dead(rec, "bad_key", "a tombstone's key is not UTF-8")
        if not is_id(key):
            return self.dead(rec, "bad_key", f"a tombstone's key {key[:200]!r} is not an id")
        return key

    async def project(self, project_id: str) -> ProjectCriteria | None:
        """A project's criteria; the defaults for an unknown project unless told to refuse it."""
        found = await self.criteria.get(project_id, self.now())
        if found is None and self.settings.unknown_projects == "default":
            return ProjectCriteria(project_id=project_id)
        return found

    async def projects(self, project_ids: Iterable[str]) -> dict[str, ProjectCriteria | None]:
        """Criteria of every project a batch names, each read once."""
        return {p: await self.project(p) for p in sorted(set(project_ids))}

    async def on_criteria(self, rec: Record) -> list[Emit]:
        """A record of the `projects` topic: criteria set, or retracted by a tombstone."""
        if rec.value is None:  # tombstone: the project falls back to defaults (or is unknown)
            project = self.tombstone_key(rec)
            if isinstance(project, Emit):
                return [project]
            await self.criteria.delete(project, self.now())
            return []
        c = self.decode(rec, ProjectCriteria)
        if isinstance(c, Emit):
            return [c]
        assert isinstance(c, ProjectCriteria)
        await self.criteria.set(c, self.now())
        return []

    def unknown(self, rec: Record, project_id: str) -> Emit:
        return self.dead(rec, "unknown_project", f"project {project_id!r} has no criteria")

    async def count_dead(self, emits: Sequence[Emit]) -> None:
        """Count dead letters by reason in Redis, once each (by their source position; their ids
        derive from it, so two letters with one id are one)."""
        letters = {e.value.event_id: e.value for e in emits if isinstance(e.value, DeadLetter)}
        incs = [dead_letter_increment(letter) for letter in letters.values()]
        if incs:
            await self.state.apply(incs)


__all__ = ["INPUT_DEFECTS", "Emit", "Ingress", "Record", "Settings"]
