"""The item processor: item-keyed inputs (annotations, gold, reviews, round timeouts) in batches.

A batch goes through three passes, so that the number of Redis round trips and scoring calls
does not grow with the number of events in it:

1. **state**: each record, in order, changes its item's state (`ItemState`, plain Python, no
   I/O) and leaves *jobs*: a gold comparison, a consensus round, an audit draw, a review;
2. **scoring**: every comparison the jobs need, of every item of the batch, in one
   `score_items` call per project (box matching vectorised across items);
3. **standing**: the workers' totals and the projects' fitted models in one pipelined read,
   then each job becomes its ScoreRecords and Escalations, in record order.

Every output derives its id from its inputs, so a batch delivered again emits the same messages.
A comparison that raises (a defect one input finds) is retried alone and dead-letters only the
record that asked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import combinations

import numpy as np
from goldstream.schemas.base import Id, Model
from goldstream.schemas.content import Content
from goldstream.schemas.criteria import MIN_ANNOTATORS, ProjectCriteria
from goldstream.schemas.messages import (
    AnnotationSubmitted,
    Escalation,
    EscalationReason,
    GoldAnswer,
    ItemScore,
    ReviewResult,
    RoundTimeout,
    ScoreKind,
    ScoreRecord,
    Verdict,
    WorkerSnapshot,
    derive_id,
)
from goldstream.scoring import ScoringError, check_geometry, consensus_scores, score_items
from goldstream.scoring.policy import (
    Proficiency,
    audit_draw,
    audit_rate,
    consensus_result,
    gold_escalates,
    gold_threshold,
    peer_confidence,
    primary_reason,
    priority,
    proficiency,
    rejected_result,
    review_reasons,
    review_threshold,
)
from goldstream.scoring.reliability import known_risk, round_estimates_many, round_quality_many
from goldstream.streams.ingress import INPUT_DEFECTS, Emit, Ingress, Record
from goldstream.streams.state import STANDING_FIELDS, ProficiencyStore, ProjectView, level_of
from goldstream.streams.waiting import Rules, Waiting, WaitingIndex
from pydantic import Field

MAX_ANNOTATIONS_PER_ITEM = 200
ITEM_TOPICS = ("annotations", "gold", "reviews", "control")
MODELS = {"annotations": AnnotationSubmitted, "gold": GoldAnswer, "reviews": ReviewResult, "control": RoundTimeout}
log = logging.getLogger(__name__)


class ItemState(Model):
    """What the engine remembers of one item (its row in the item store, keyed by item_id).

    What later inputs need: the annotations (for reviews and consensus), the gold, which wait for
    a round and which form rounds. An input already recorded here was fully handled (its outputs
    acknowledged before the state was stored), so its redelivery makes nothing again."""

    gold: GoldAnswer | None = None
    annotations: list[AnnotationSubmitted] = Field(default_factory=list)
    waiting: list[Id] = Field(default_factory=list, description="annotations without gold, not yet in a round")
    gold_scored: list[Id] = Field(
        default_factory=list, description="no longer written: a redelivered gold makes nothing again (items._on_gold)"
    )
    rounds: dict[Id, list[Id]] = Field(default_factory=dict, description="consensus round -> annotation ids")
    parked_reviews: list[ReviewResult] = Field(
        default_factory=list, description="reviews that arrived before their annotation (topics are not ordered)"
    )
    active_at: float | None = Field(
        None, description="event time (epoch s) of the latest input that changed the item: its retention counts from it"
    )
    expired_at: float | None = Field(
        None,
        description="set on what is left of an item past its retention (`item_retention_s`): its annotations are "
        "no longer kept, and a review of one is dead-lettered (item_expired)",
    )

    def annotation(self, event_id: str) -> AnnotationSubmitted | None:
        for a in self.annotations:
            if a.event_id == event_id:
                return a
        return None

    def encode(self, known: Mapping[int, bytes | memoryview] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
        """The state as stored, and where each annotation's JSON lies in it (`spans`).

        `known`: JSON of annotations by `id()` of the object (the bytes they arrived in, or
        their span in the stored state they were parsed from), spliced in rather than dumped
        again. Why: a state holds every annotation of its item and is written after each of its
        inputs, so dumping them all again each time was most of what storing a state cost."""
        known = known or {}
        head = self.model_dump_json(exclude={"annotations"}).encode()
        out = bytearray(head[:-1])
        out += b',"annotations":[' if len(head) > 2 else b'"annotations":['
        spans: dict[str, tuple[int, int]] = {}
        for n, a in enumerate(self.annotations):
            if n:
                out += b","
            raw = known.get(id(a))
            start = len(out)
            out += a.model_dump_json().encode() if raw is None else raw
            spans[a.event_id] = (start, len(out))
        out += b"]}"
        return bytes(out), spans

    def with_annotation(self, a: AnnotationSubmitted) -> ItemState:
        if self.annotation(a.event_id) is not None:
            return self
        kept = [*self.annotations, a][-MAX_ANNOTATIONS_PER_ITEM:]
        return self.model_copy(update={"annotations": kept})


# ---------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    """Work the state pass found, finished once scores and standings are in hand."""

    rec: Record  # the input that asked for it: its dead letter if the comparison fails
    criteria: ProjectCriteria
    pairs: list[tuple[AnnotationSubmitted, object]] = field(default_factory=list)
    answers: list[AnnotationSubmitted] = field(default_factory=list)  # whose workers it judges
    results: list[ItemScore] | None = None
    failed: str | None = None
    origin: Record | None = None  # the input whose position its scores carry, when not `rec`

    @property
    def a(self) -> AnnotationSubmitted:
        """The annotation a job of one annotation is about."""
        return self.answers[0]


@dataclass
class _Gold(_Job):
    gold: GoldAnswer | None = None


@dataclass
class _Review(_Job):
    review: ReviewResult | None = None


@dataclass
class _Round(_Job):
    round_id: str = ""
    late: bool = False
    fit: _Fit | None = None


@dataclass
class _Fit:
    """A round's figures, fitted with the batch's other rounds in one pass."""

    agreement: np.ndarray
    raw: np.ndarray
    levels: list
    times: list[float | None]
    quality: list = field(default_factory=list)


@dataclass
class _Audit(_Job):
    pass


@dataclass
class _Invalid(_Job):
    detail: str = ""


Slot = Emit | _Job


@dataclass
class ItemProcessor:
    """Owns the item state (`items`: item id -> ItemState, the batch's states loaded by the worker,
    every item in a replay) and what changed in it (`dirty`)."""

    ingress: Ingress
    proficiency: ProficiencyStore
    items: MutableMapping[str, ItemState] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    event_time: float | None = None  # the latest annotation's submission (epoch s): a replay's clock
    # items with annotations waiting for a round (oldest one's submission, project, workers), so
    # that the consensus timer need neither parse the item table nor scan every waiting item
    _waiting: WaitingIndex = field(default_factory=WaitingIndex, repr=False)
    _indexed: set[str] = field(default_factory=set, repr=False)
    _rescan: bool = field(default=True, repr=False)
    _ticks: int = field(default=0, repr=False)  # a replay's timer requests so far: their positions
    # the batch's contents checked on arrival, with the criteria they fit: not checked again when scored
    _checked: dict[int, tuple[Content, ProjectCriteria]] = field(default_factory=dict, repr=False)
    _at: float | None = field(default=None, repr=False)  # the event time of the input in hand
    removed: set[str] = field(default_factory=set)  # items whose state retention deleted
    # the latest submission per input partition: item retention's clock. Per partition, since an
    # item's inputs all come through its own: a partition read behind the others (a backlog)
    # must not find its items expired by the others' progress, before their rounds could form
    clocks: dict[int, float] = field(default_factory=dict)
    # the last batch's annotations with the bytes they arrived in: the worker splices those into
    # the states it stores (`ItemState.encode`) instead of serialising the annotations again
    arrived: list[tuple[AnnotationSubmitted, bytes]] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ batch

    async def process(self, records: Sequence[Record], ticks: Sequence[tuple[int, datetime]] = ()) -> list[Emit]:
        """One batch of item-keyed records (criteria records first: they apply to the batch).

        `ticks`: (position, moment) of consensus-timer ticks inside the batch: before the record at
        that position, the rounds waiting past their timeout at that moment close, as a batch cut
        at the tick and followed by the timer's requests would close them. A replay's timer runs
        on event time and ticks often; cutting its batches at every tick left them small."""
        slots: list[Slot] = []
        for rec in records:
            if rec.topic == "projects":
                slots += await self.ingress.on_criteria(rec)
        decoded: list[tuple[int, Record, object]] = []
        self.arrived = []
        self._checked = {}
        for i, rec in enumerate(records):
            if rec.topic == "projects":
                continue
            model = MODELS.get(rec.topic)
            if model is None:
                slots.append(self.ingress.dead(rec, "unknown_topic", f"no handler for topic {rec.topic!r}"))
            elif rec.value is None and rec.topic == "gold":
                slots += self._retract_gold(rec)
            else:
                msg = self.ingress.decode(rec, model)
                decoded.append((i, rec, msg))
                if isinstance(msg, AnnotationSubmitted) and rec.value is not None:
                    self.arrived.append((msg, rec.value))
        named = {m.project_id for _, _, m in decoded if not isinstance(m, Emit)}  # type: ignore[attr-defined]
        if ticks:
            self._refresh_index()
            named |= self._waiting.projects()
        criteria = await self.ingress.projects(named)
        pending = sorted(ticks, key=lambda t: t[0])
        for i, rec, msg in decoded:
            while pending and pending[0][0] <= i:
                slots += self._on_tick(pending.pop(0)[1], criteria)
            if isinstance(msg, Emit):
                slots.append(msg)
                continue
            c = criteria[msg.project_id]  # type: ignore[attr-defined]
            if c is None:
                slots.append(self.ingress.unknown(rec, msg.project_id))  # type: ignore[attr-defined]
                continue
            try:
                slots += self._on(rec, msg, c)
            except ScoringError as exc:
                slots.append(self.ingress.dead(rec, exc.reason, str(exc)))
            except INPUT_DEFECTS as exc:
                slots.append(self._defect(rec, exc))
        for _, at in pending:
            slots += self._on_tick(at, criteria)
        jobs = [s for s in slots if isinstance(s, _Job)]
        _score(jobs, self._checked)
        self._checked = {}
        out = await self._finish(slots, jobs)
        await self.ingress.count_dead(out)
        return out

    def _problems(self, content: Content, c: ProjectCriteria) -> tuple[str, str] | None:
        """`content_problems`, remembering content that fits `c` for the batch's scoring."""
        found = content_problems(content, c)
        if found is None:
            self._checked[id(content)] = (content, c)
        return found

    def _defect(self, rec: Record, exc: BaseException) -> Emit:
        log.error("input %s/%s@%s raised; dead-lettered", rec.topic, rec.partition, rec.offset, exc_info=exc)
        return self.ingress.dead(rec, "internal_error", f"{type(exc).__name__}: {exc}")

    def _on(self, rec: Record, msg: object, c: ProjectCriteria) -> list[Slot]:
        self._at = event_time_of(msg)
        if isinstance(msg, AnnotationSubmitted):
            return self._on_annotation(rec, msg, c)
        if isinstance(msg, GoldAnswer):
            return self._on_gold(rec, msg, c)
        if isinstance(msg, ReviewResult):
            return self._on_review(rec, msg, c)
        assert isinstance(msg, RoundTimeout)
        return self.close_round(msg.item_id, c, rec)

    # ------------------------------------------------------------------ state

    def _item(self, item_id: str, marker: bool = False) -> ItemState:
        """An item's state; what retention left of an expired item reads as a new item with the
        old one's gold, unless the marker itself is asked for (`marker`: a review wants to know)."""
        st = self.items.get(item_id)
        if st is None:
            return ItemState()
        if st.expired_at is not None and not marker:
            return ItemState(gold=st.gold)
        return st

    def _save(self, item_id: str, state: ItemState) -> None:
        if self._at is not None and (state.active_at is None or state.active_at < self._at):
            state = state.model_copy(update={"active_at": self._at})
        self.items[item_id] = state
        self.dirty.add(item_id)
        self.removed.discard(item_id)
        self._index(item_id, state)

    # ------------------------------------------------------------------ retention

    def due(self, st: ItemState) -> float | None:
        """When an item's state falls out of retention (event time, epoch s); None: never (a
        marker that keeps gold: gold is reference data, kept until a tombstone retracts it)."""
        retention = self.ingress.settings.item_retention_s
        if retention <= 0 or st.active_at is None or (st.expired_at is not None and st.gold is not None):
            return None
        return st.active_at + retention

    def retention_clocks(self, partitions: Iterable[int], wall: float | None = None) -> dict[int, float]:
        """The event time retention is judged at, per input partition: the latest submission
        seen there, never past `wall` (a worker's clock: one event stamped years ahead must not
        expire every item; a replay has none); none for a partition without one yet, nor when
        items are kept for ever."""
        if self.ingress.settings.item_retention_s <= 0:
            return {}
        return {p: self.clocks[p] if wall is None else min(self.clocks[p], wall)
                for p in sorted(partitions) if p in self.clocks}  # fmt: skip

    def expire(self, item_ids: Iterable[str], now: float) -> list[Emit]:
        """Retention: each of these items whose latest input is older than `item_retention_s` at
        event time `now` keeps only a marker (with its gold, if it has one: the gold stays until
        retracted), and a marker without gold that old is deleted (`removed`). The reviews still
        parked for an annotation that never came are dead-lettered (review_unmatched);
        annotations still waiting for a round leave without one."""
        out: list[Emit] = []
        for item_id in sorted(set(item_ids)):
            st = self.items.get(item_id)
            due = None if st is None else self.due(st)
            if st is None or due is None or due > now:
                continue
            if st.expired_at is not None:
                del self.items[item_id]
                self.dirty.discard(item_id)
                self.removed.add(item_id)
                self._waiting.set(item_id, None)
                self._indexed.discard(item_id)
                continue
            for r in st.parked_reviews:
                rec = Record("reviews", r.to_bytes(), r.item_id.encode())
                out.append(self.ingress.dead(rec, "review_unmatched",
                                             f"its annotation {r.annotation_event_id!r} never arrived while item "
                                             f"{item_id!r} was kept (item_retention_s)"))  # fmt: skip
            self.items[item_id] = ItemState(gold=st.gold, expired_at=st.active_at, active_at=now)
            self.dirty.add(item_id)
            self._index(item_id, self.items[item_id])
        return out

    def _index(self, item_id: str, st: ItemState) -> None:
        self._indexed.add(item_id)
        self._waiting.set(item_id, waiting_of(st))

    def _retract_gold(self, rec: Record) -> list[Slot]:
        item_id = self.ingress.tombstone_key(rec)
        if isinstance(item_id, Emit):
            return [item_id]
        st = self._item(item_id)
        if st.gold is not None:
            self._save(item_id, st.model_copy(update={"gold": None}))
        return []

    def _on_gold(self, rec: Record, g: GoldAnswer, c: ProjectCriteria) -> list[Slot]:
        problems = self._problems(g.content, c)
        if problems:
            return [self.ingress.dead(rec, *problems)]
        st = self._item(g.item_id)
        if st.gold is not None and st.gold.event_id == g.event_id:
            return []  # redelivered after its state was stored, so after its outputs were acknowledged
        # annotations waiting for a consensus round are scored against the new gold
        targets = st.waiting
        st = st.model_copy(update={"gold": g, "waiting": []})
        self._save(g.item_id, st)
        return [
            _Gold(rec, c, [(a, g)], answers=[a], gold=g)
            for e in targets
            if (a := st.annotation(e)) is not None and a.project_id == g.project_id
        ]

    def _on_annotation(self, rec: Record, a: AnnotationSubmitted, c: ProjectCriteria) -> list[Slot]:
        self.event_time = max(self.event_time or 0.0, a.submitted_at.timestamp())
        if rec.partition >= 0:
            self.clocks[rec.partition] = max(self.clocks.get(rec.partition, 0.0), a.submitted_at.timestamp())
        problems = self._problems(a.content, c)
        if problems:
            out: list[Slot] = [self.ingress.dead(rec, *problems)]
            if problems[0] == "invalid_geometry":
                out.append(_Invalid(rec, c, answers=[a], detail=problems[1]))
            return out
        seen = self._item(a.item_id)
        if seen.annotation(a.event_id) is not None:
            # redelivered after its item's state was stored, so after its outputs were acknowledged
            # (the worker stores states only then): nothing to make again. Redelivered before,
            # it makes them again from the same state, with the same ids and positions
            return []
        st = seen.with_annotation(a)
        if st.gold is not None and st.gold.project_id == a.project_id:
            self._save(a.item_id, st)
            return [_Gold(rec, c, [(a, st.gold)], answers=[a], gold=st.gold), *self._parked_reviews(rec, a, seen, c)]
        if a.event_id not in st.waiting:
            st = st.model_copy(update={"waiting": [*st.waiting, a.event_id]})
        self._save(a.item_id, st)
        # an item without gold: audit a random sample at a rate that falls as the worker proves
        # itself (the rest waits for its round, where its risk decides)
        out = [_Audit(rec, c, answers=[a])]
        return out + self._consensus(rec, a, st, c) + self._parked_reviews(rec, a, seen, c)

    def _parked_reviews(self, rec: Record, a: AnnotationSubmitted, seen: ItemState, c: ProjectCriteria) -> list[Slot]:
        """Reviews that waited for this annotation (`rec`, whose position their scores carry: it
        is what made them). `seen`: the item state as this event found it (only reviews park
        reviews, so when it holds none for `a` there is nothing to re-read)."""
        if not any(r.annotation_event_id == a.event_id for r in seen.parked_reviews):
            return []
        st = self._item(a.item_id)
        mine = [r for r in st.parked_reviews if r.annotation_event_id == a.event_id]
        if not mine:
            return []
        self._save(a.item_id, st.model_copy(update={"parked_reviews": [r for r in st.parked_reviews if r not in mine]}))
        out: list[Slot] = []
        for r in mine:
            review = Record("reviews", r.to_bytes(), r.item_id.encode())
            out += [replace(j, origin=rec) if isinstance(j, _Job) else j for j in self._review(review, r, a, c)]
        return out

    def _on_review(self, rec: Record, r: ReviewResult, c: ProjectCriteria) -> list[Slot]:
        if r.corrected is not None:  # on arrival, not after parking: the letter keeps its source and bytes
            problems = self._problems(r.corrected, c)
            if problems:
                return [self.ingress.dead(rec, *problems)]
        st = self._item(r.item_id, marker=True)
        a = st.annotation(r.annotation_event_id)
        if a is None and st.expired_at is not None:
            when = datetime.fromtimestamp(st.expired_at, UTC).isoformat()
            return [self.ingress.dead(rec, "item_expired", f"item {r.item_id!r} was last active at {when}, longer "
                                      "ago than item_retention_s: its annotations are no longer kept")]  # fmt: skip
        if a is None:
            # Kafka orders a partition, not two topics: the annotation may still be on its way.
            if all(p.event_id != r.event_id for p in st.parked_reviews):
                parked = [*st.parked_reviews, r][-MAX_ANNOTATIONS_PER_ITEM:]
                self._save(r.item_id, st.model_copy(update={"parked_reviews": parked}))
            return []
        return self._review(rec, r, a, c)

    def _review(self, rec: Record, r: ReviewResult, a: AnnotationSubmitted, c: ProjectCriteria) -> list[Slot]:
        if r.corrected is not None:
            problems = self._problems(r.corrected, c)
            if problems:
                return [self.ingress.dead(rec, *problems)]
        st = self._item(r.item_id)
        if r.annotation_event_id in st.waiting:  # judged by an expert: no consensus round needed
            self._save(r.item_id, st.model_copy(update={"waiting": [w for w in st.waiting if w != a.event_id]}))
        # correct: against the correction; approve: the annotation is its own reference;
        # reject: nothing in it is right (no comparison)
        pairs: list = []
        if r.verdict is Verdict.CORRECT:
            assert r.corrected is not None
            pairs = [(a, r.corrected)]
        elif r.verdict is Verdict.APPROVE:
            pairs = [(a, a)]
        return [_Review(rec, c, pairs, answers=[a], review=r)]

    def _consensus(self, rec: Record, a: AnnotationSubmitted, st: ItemState, c: ProjectCriteria) -> list[Slot]:
        """A round once the item has its overlap; the same round again when a member is re-delivered."""
        for round_id, members in st.rounds.items():
            if a.event_id in members:
                return self._round(rec, st, round_id, members, c)
        latest: dict[str, AnnotationSubmitted] = {}
        for event_id in st.waiting:
            x = st.annotation(event_id)
            if x is not None and x.project_id == a.project_id:
                latest[x.worker_id] = x  # a worker's resubmission replaces its earlier answer
        if st.rounds:  # a late annotator: scored against the first round's members
            members = [*next(iter(st.rounds.values())), a.event_id]
            round_id = derive_id("late", a.event_id, *members)
        elif len(latest) >= c.consensus.overlap:
            members = sorted(x.event_id for x in latest.values())
            round_id = derive_id("round", a.item_id, *members)
        else:
            return []
        st = st.model_copy(
            update={"rounds": {**st.rounds, round_id: members}, "waiting": [w for w in st.waiting if w not in members]}
        )
        self._save(a.item_id, st)
        return self._round(rec, st, round_id, members, c)

    def close_round(self, item_id: str, c: ProjectCriteria, rec: Record | None = None) -> list[Slot]:
        """Close a waiting item with at least `min_annotators` (the consensus timeout)."""
        st = self._item(item_id)
        waiting = {x.worker_id: x for e in st.waiting if (x := st.annotation(e)) is not None}
        if st.gold is not None or st.rounds or len(waiting) < c.consensus.min_annotators:
            return []
        members = sorted(x.event_id for x in waiting.values())
        round_id = derive_id("round", item_id, *members)
        st = st.model_copy(update={"rounds": {**st.rounds, round_id: members}, "waiting": []})
        self._save(item_id, st)
        return self._round(rec or Record("control", None, item_id.encode()), st, round_id, members, c)

    def _round(self, rec: Record, st: ItemState, round_id: str, members: list[str], c: ProjectCriteria) -> list[Slot]:
        answers = [x for m in members if (x := st.annotation(m)) is not None]
        if len(answers) < 2:
            return []
        late = round_id != derive_id("round", answers[0].item_id, *members)
        # PQ is symmetric, so one comparison per pair serves both directions
        pairs = [(answers[i], answers[j]) for i, j in combinations(range(len(answers)), 2)]
        return [_Round(rec, c, pairs, answers=answers, round_id=round_id, late=late)]

    # ------------------------------------------------------------------ timer

    async def timed_out(
        self, now: datetime | None, candidates: Sequence[tuple[str, datetime]] | None = None
    ) -> list[RoundTimeout]:
        """Requests to close the rounds of items that waited past their project's consensus
        timeout (every waiting item when `now` is None, as at the end of a replay). Only reads
        state: the worker's timer sends them on `control`, so the item's own consumer closes them.
        `candidates`: (item, oldest waiting submission) from the worker's index in Redis, else
        the items of this processor's own index that its rules say are due."""
        if candidates is None:
            self._refresh_index()
            known = await self.ingress.projects(self._waiting.projects())
            mine = self.waiting_items() if now is None else self._candidates(now, known)
            return self._due(now, mine, known)
        return self._due(now, candidates, await self.ingress.projects(self._timeout_projects(candidates)))

    def _timeout_projects(self, candidates: Sequence[tuple[str, datetime]]) -> set[str]:
        """The projects whose criteria decide whether the candidates' rounds are due."""
        out = set()
        for item_id, _ in candidates:
            entry = self._waiting.get(item_id)
            if entry is not None:
                out.add(entry.project_id)
            st = self._item(item_id)
            if st.waiting and (a := st.annotation(st.waiting[0])) is not None:
                out.add(a.project_id)
        return out

    def _candidates(self, now: datetime, criteria: Mapping[str, ProjectCriteria | None]) -> list[tuple[str, datetime]]:
        """The indexed items whose round may be due at `now` (a second's slack: `_due` decides
        exactly, on the same datetimes as for the worker's candidates)."""
        found = self._waiting.due_by(now.timestamp(), _rules(criteria), slack=1.0)
        return [(item, entry.since) for item in found if (entry := self._waiting.get(item)) is not None]

    def _on_tick(self, now: datetime, criteria: Mapping[str, ProjectCriteria | None]) -> list[Slot]:
        """Close the rounds due at a timer tick inside a batch, as the timer's requests would."""
        slots: list[Slot] = []
        for r in self._due(now, self._candidates(now, criteria), criteria):
            c = criteria.get(r.project_id)
            if c is not None:
                slots += self.close_round(r.item_id, c, self.timer_record(r))
        return slots

    def timer_record(self, request: RoundTimeout) -> Record:
        """A replay's timer request as an input, at the next position of the replay's timer stream
        (the live timer's requests have theirs on `control`)."""
        self._ticks += 1
        return Record("control", request.to_bytes(), request.item_id.encode(), 0, self._ticks - 1, "replay|timer")

    def _due(
        self,
        now: datetime | None,
        candidates: Sequence[tuple[str, datetime]],
        known: Mapping[str, ProjectCriteria | None],
    ) -> list[RoundTimeout]:
        out = []
        for item_id, first in candidates:
            entry = self._waiting.get(item_id)
            criteria = known.get(entry.project_id) if entry is not None else None
            if (
                entry is not None
                and criteria is not None
                and (
                    entry.workers < criteria.consensus.min_annotators
                    or (now is not None and (now - first).total_seconds() < criteria.consensus.timeout_s)
                )
            ):
                continue  # not yet, or cannot close: decided from the index, without parsing the item
            st = self._item(item_id)
            if not st.waiting or st.gold is not None:
                continue  # changed since it was listed
            a = st.annotation(st.waiting[0])
            criteria = known.get(a.project_id) if a is not None else None
            if a is None or criteria is None:
                continue
            workers = {x.worker_id for e in st.waiting if (x := st.annotation(e)) is not None}
            if len(workers) < criteria.consensus.min_annotators:
                continue  # close_round would refuse it: asking every tick would only repeat
            if now is None or (now - first).total_seconds() >= criteria.consensus.timeout_s:
                out.append(
                    RoundTimeout(
                        event_id=derive_id("timeout", item_id, *st.waiting),
                        project_id=a.project_id,
                        item_id=item_id,
                        requested_at=now or first,
                    )
                )
        return out

    async def _index_rules(self) -> Rules:
        self._refresh_index()
        return await self.round_rules(self._waiting.projects())

    async def round_rules(self, projects: Iterable[str]) -> Rules:
        """Each project's round rules (consensus timeout, minimum annotators; None: its rounds
        never close), from the criteria every batch reads: what a timer index is read with."""
        return _rules(await self.ingress.projects(projects))

    async def next_due(self) -> float | None:
        """When (epoch s) the first round of this processor's own index can time out (None:
        none can): a replay's timer need not stop its batch before then."""
        return self._waiting.first_due(await self._index_rules())

    async def closing_by(self, at: float) -> set[str]:
        """Items of this processor's index whose round could time out by `at` (epoch s)."""
        return set(self._waiting.due_by(at, await self._index_rules()))

    def waiting_items(self) -> list[tuple[str, datetime]]:
        """Items with annotations waiting for a round, with the oldest one's submission time.

        From the index kept by `_save`; the items are scanned again after `reindex` or when their
        number says that someone else changed them."""
        self._refresh_index()
        return sorted((k, v.since) for k, v in self._waiting.items())

    def _refresh_index(self) -> None:
        if self._rescan or len(self.items) != len(self._indexed):
            self._rescan = False
            self._waiting.clear()
            self._indexed.clear()
            for item_id, st in list(self.items.items()):
                self._index(item_id, st)

    def watched(self, item_id: str) -> Waiting | None:
        """The item's entry in the worker's timer index (`watched` of its current state)."""
        return _timed(self._waiting.get(item_id))

    def forget(self, item_ids: Iterable[str]) -> None:
        """Drop items from the in-memory index once their state is stored elsewhere (the worker
        swaps its items per batch; the index must not grow with every item ever seen)."""
        for item_id in item_ids:
            self._waiting.set(item_id, None)
            self._indexed.discard(item_id)

    def reindex(self) -> None:
        """The items changed under us: scan them next time."""
        self._rescan = True

    # ------------------------------------------------------------------ outputs

    async def _finish(self, slots: list[Slot], jobs: list[_Job]) -> list[Emit]:
        """Standings for every job in one read, then each slot's outputs in order."""
        need = [j for j in jobs if j.failed is None and not isinstance(j, _Review)]
        projects = {j.criteria.project_id: j.criteria for j in need}
        pairs = sorted({(x.project_id, x.worker_id) for j in need for x in j.answers})
        views, found = await self.proficiency.views_and_totals(projects, pairs, STANDING_FIELDS)
        totals = dict(zip(pairs, found, strict=True))
        _fit_rounds([j for j in need if isinstance(j, _Round)], views, totals)
        out: list[Emit] = []
        for slot in slots:
            if isinstance(slot, Emit):
                out.append(slot)
            elif slot.failed is not None:
                out.append(self.ingress.dead(slot.rec, *_failure(slot.failed)))
            else:
                out += _from(slot.origin or slot.rec, _outputs(slot, views.get(slot.criteria.project_id), totals))
        return out


# ---------------------------------------------------------------------------- passes (pure)


def waiting_of(st: ItemState) -> Waiting | None:
    """An item's place among the items waiting for a round: since its oldest waiting submission,
    in its project, with how many workers wait (None: nothing waits, or gold scores them)."""
    first = [x for e in st.waiting if (x := st.annotation(e)) is not None]
    if not first or st.gold is not None:
        return None
    return Waiting(min(x.submitted_at for x in first), first[0].project_id, len({x.worker_id for x in first}))


def watched(st: ItemState) -> Waiting | None:
    """The item's entry in the worker's consensus timer index (kept in Redis beside its state):
    only once its waiting annotations come from at least `MIN_ANNOTATORS` workers. Items with one
    annotator can wait until retention, and no round of fewer closes: a timer that loaded them
    all at every check did work that grew with the items waiting, not with the rounds due."""
    return _timed(waiting_of(st))


def _timed(found: Waiting | None) -> Waiting | None:
    return None if found is None or found.workers < MIN_ANNOTATORS else found


def _rules(criteria: Mapping[str, ProjectCriteria | None]) -> dict[str, tuple[float, int] | None]:
    """Each project's round rules for the waiting index: (timeout, minimum annotators)."""
    return {p: c and (c.consensus.timeout_s, c.consensus.min_annotators) for p, c in criteria.items()}


def _score(jobs: Sequence[_Job], checked: Mapping[int, tuple[Content, ProjectCriteria]]) -> None:
    """Every comparison of the batch, in one `score_items` call per project; when that raises,
    each job alone, so that only the input that found the defect is dead-lettered. `checked`:
    contents checked on arrival, each with the criteria it was checked against."""
    by_project: dict[str, list[_Job]] = {}
    for j in jobs:
        if j.pairs:
            by_project.setdefault(j.criteria.project_id, []).append(j)
    for group in by_project.values():
        criteria = group[0].criteria
        flat = [p for j in group for p in j.pairs]
        fits = [content for content, c in checked.values() if c is criteria]
        try:
            results = score_items(flat, criteria, fits)
        except (ScoringError, *INPUT_DEFECTS):
            for j in group:
                _score_alone(j)
            continue
        n = 0
        for j in group:
            j.results, n = results[n : n + len(j.pairs)], n + len(j.pairs)


def _score_alone(job: _Job) -> None:
    try:
        job.results = score_items(job.pairs, job.criteria)
    except ScoringError as exc:
        job.failed = f"{exc.reason}\t{exc}"
    except INPUT_DEFECTS as exc:
        log.error("input %s/%s@%s raised; dead-lettered", job.rec.topic, job.rec.partition, job.rec.offset,
                  exc_info=exc)  # fmt: skip
        job.failed = f"internal_error\t{type(exc).__name__}: {exc}"


def _failure(failed: str) -> tuple[str, str]:
    reason, _, error = failed.partition("\t")
    return reason, error


def _from(rec: Record, emits: list[Emit]) -> list[Emit]:
    """Scores carry the position of the input that made them: proficiency applies each once by
    it (`streams.state.Position`), so a redelivered input's scores, sent again, count once."""
    if rec.offset < 0 or rec.partition < 0:
        return emits
    source = {"source_topic": rec.source or rec.topic, "source_partition": rec.partition, "source_offset": rec.offset}
    return [
        Emit(e.topic, e.key, e.value.model_copy(update=source)) if isinstance(e.value, ScoreRecord) else e
        for e in emits
    ]


def _outputs(job: _Job, view: ProjectView | None, totals: dict) -> list[Emit]:
    def standing(a: AnnotationSubmitted) -> Proficiency:
        t = totals[(a.project_id, a.worker_id)]
        assert view is not None
        return proficiency(t, job.criteria, level_of(view.model, t))

    c = job.criteria
    if isinstance(job, _Gold):
        assert job.gold is not None and job.results is not None
        result = job.results[0]
        risk = None if result.score is None else known_risk(result.score, c.pass_threshold)
        out = [score_record(job.a, ScoreKind.GOLD, job.gold.event_id, result, 1.0, risk=risk)]
        if gold_escalates(result, c):
            out.append(escalation(job.a, [EscalationReason.GOLD_BELOW_THRESHOLD], standing(job.a),
                                  score=result.score, threshold=gold_threshold(c)))  # fmt: skip
        return out
    if isinstance(job, _Review):
        return _review_outputs(job)
    if isinstance(job, _Audit):
        snap = standing(job.a)
        if audit_draw(job.a.event_id, c.escalation.audit_seed) >= audit_rate(snap.lower_bound, c):
            return []
        return [escalation(job.a, [EscalationReason.AUDIT_SAMPLE], snap)]
    if isinstance(job, _Invalid):
        return [escalation(job.a, [EscalationReason.INVALID_GEOMETRY], standing(job.a), detail=job.detail)]
    assert isinstance(job, _Round) and view is not None
    return _round_outputs(job, view, [totals[(x.project_id, x.worker_id)] for x in job.answers])


def _review_outputs(job: _Review) -> list[Emit]:
    r, a = job.review, job.a
    assert r is not None
    result = job.results[0] if job.results else rejected_result()
    risk = None if result.score is None else known_risk(result.score, job.criteria.pass_threshold)
    out = [score_record(a, ScoreKind.REVIEW, r.event_id, result, 1.0, risk=risk)]
    if r.promote_to_gold:
        gold = GoldAnswer(
            event_id=derive_id("gold", r.event_id),
            project_id=r.project_id,
            item_id=r.item_id,
            content=r.corrected if r.corrected is not None else a.content,
            created_at=r.reviewed_at,
            source="review",
            review_event_id=r.event_id,
        )
        out.append(Emit("gold", r.item_id, gold))
    return out


def agreement_matrix(n: int, results: Sequence[ItemScore]) -> np.ndarray:
    """The symmetric (n, n) agreement matrix from the scores of its pairs in `combinations` order
    (NaN on the diagonal and where undefined)."""
    out = np.full((n, n), np.nan)
    for (i, j), r in zip(combinations(range(n), 2), results, strict=True):
        out[i, j] = out[j, i] = np.nan if r.score is None else r.score
    return out


def _fit_rounds(rounds: Sequence[_Round], views: dict[str, ProjectView], totals: dict) -> None:
    """Every round's agreement matrix, round estimates and member quality, in one vectorised fit."""
    fits = []
    for job in rounds:
        assert job.results is not None
        view = views[job.criteria.project_id]
        agreement = agreement_matrix(len(job.answers), job.results)
        levels = [level_of(view.model, totals[(x.project_id, x.worker_id)]) for x in job.answers]
        fits.append(_Fit(agreement, np.empty(0), levels, [time_on_task(x) for x in job.answers]))
    for fit, raw in zip(fits, round_estimates_many([f.agreement for f in fits]), strict=True):
        fit.raw = raw
    args = []
    for f, j in zip(fits, rounds, strict=True):
        view = views[j.criteria.project_id]
        odds = [view.pace.odds(t) for t in f.times]
        args.append((f.agreement, f.levels, view.model, j.criteria.pass_threshold, odds))
    quality = round_quality_many(args)
    for job, fit, q in zip(rounds, fits, quality, strict=True):
        fit.quality = q
        job.fit = fit


def _round_outputs(job: _Round, view: ProjectView, totals: list[dict[str, int]]) -> list[Emit]:
    """A round's members: agreement with peers (the consensus score), each member's quality as
    the round alone says (`estimate`, summed into its worker's level), and its risk with the
    peers weighted by their levels; escalate what the review budget affords."""
    c, answers, fit = job.criteria, job.answers, job.fit
    assert fit is not None
    agreement, raw, levels, times, quality = fit.agreement, fit.raw, fit.levels, fit.times, fit.quality
    scores = consensus_scores(answers, c, agreement=agreement)
    threshold = review_threshold(view.risks, c)
    out: list[Emit] = []
    for i in [len(answers) - 1] if job.late else range(len(answers)):
        a, risk = answers[i], quality[i].risk
        standing = proficiency(totals[i], c, levels[i])
        said = view.model.calibration(float(raw[i]))
        too_fast = view.pace.too_fast(times[i])
        reasons = review_reasons(risk, threshold, said, standing, too_fast, c)
        result, confidence = consensus_result(scores[i], c), round(peer_confidence(agreement, i), 6)
        out.append(score_record(a, ScoreKind.CONSENSUS, job.round_id, result, confidence, risk=risk,
                                estimate=float(raw[i]), escalated=bool(reasons)))  # fmt: skip
        if reasons:
            detail = (
                f"risk {risk:.2f} (review from {threshold:.2f}); estimated quality {quality[i].estimate:.2f}"
                f" +- {quality[i].sd:.2f}; consensus says {said:.2f}; worker level "
                f"{levels[i].estimate:.2f} +- {levels[i].sd:.2f}"
                + (f"; {times[i]:.0f} s on task, project median {view.pace.median_s:.0f} s" if too_fast else "")
            )
            out.append(escalation(a, reasons, standing, score=quality[i].estimate, threshold=c.pass_threshold,
                                  risk=risk, detail=detail))  # fmt: skip
    return out


def score_record(
    a: AnnotationSubmitted,
    kind: ScoreKind,
    reference_id: str,
    result: ItemScore,
    confidence: float,
    *,
    risk: float | None = None,
    estimate: float | None = None,
    escalated: bool = False,
) -> Emit:
    rec = ScoreRecord(
        event_id=ScoreRecord.make_id(a.event_id, kind, reference_id),
        project_id=a.project_id,
        item_id=a.item_id,
        worker_id=a.worker_id,
        annotation_event_id=a.event_id,
        kind=kind,
        reference_id=reference_id,
        result=result,
        confidence=confidence,
        event_time=a.submitted_at,
        time_on_task_s=time_on_task(a),
        batch_id=a.batch_id,
        estimate=None if estimate is None else round(min(max(estimate, 0.0), 1.0), 6),
        risk=None if risk is None else round(risk, 6),
        escalated=escalated,
    )
    return Emit("scores", a.worker_id, rec)


def escalation(
    a: AnnotationSubmitted,
    reasons: list[EscalationReason],
    snap: Proficiency,
    *,
    score: float | None = None,
    threshold: float | None = None,
    detail: str | None = None,
    risk: float | None = None,
) -> Emit:
    primary = primary_reason(reasons)
    esc = Escalation(
        event_id=Escalation.make_id(a.event_id, primary),
        project_id=a.project_id,
        item_id=a.item_id,
        worker_id=a.worker_id,
        reasons=reasons,
        priority=priority(reasons, score, threshold, risk),
        score=None if score is None else round(min(max(score, 0.0), 1.0), 6),
        threshold=threshold,
        risk=None if risk is None else round(risk, 6),
        worker=_snapshot(snap),
        annotation=a,
        created_at=a.submitted_at,
        detail=detail,
    )
    return Emit("escalations", a.item_id, esc)


def event_time_of(msg: object) -> float | None:
    """The event time an input carries (epoch s): what item retention is counted in."""
    for name in ("submitted_at", "reviewed_at", "created_at", "requested_at"):
        at = getattr(msg, name, None)
        if isinstance(at, datetime):
            return at.timestamp()
    return None


def content_problems(content: Content, criteria: ProjectCriteria) -> tuple[str, str] | None:
    """(reason, error) of content a project cannot score, checked once on arrival."""
    from goldstream.schemas.validation import content_errors

    errors = content_errors(content, criteria)
    if errors:
        return errors[0].type, "; ".join(str(e) for e in errors[:5])
    try:
        check_geometry(content)
    except ScoringError as exc:
        return exc.reason, str(exc)
    return None


def _snapshot(p: Proficiency) -> WorkerSnapshot:
    return WorkerSnapshot(
        state=p.state,
        items=p.items,
        gold_items=p.gold_items,
        mean_score=p.mean_score,
        lower_bound=p.lower_bound,
        estimate=p.estimate,
        estimate_sd=p.sd,
    )


def time_on_task(a: AnnotationSubmitted) -> float | None:
    return (a.submitted_at - a.started_at).total_seconds() if a.started_at else None


__all__ = ["ITEM_TOPICS", "MAX_ANNOTATIONS_PER_ITEM", "ItemProcessor", "ItemState", "agreement_matrix"]
