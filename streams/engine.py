"""The engine: one input event plus state in, the events to emit out (DESIGN §3b).

No Kafka here. The worker's consumers (`streams.worker`) and `goldstream replay`
(`streams.replay`) both drive this class with `Record`s and send what it returns, so a replay of
the same events yields the same scores, escalations and proficiency. Item state (gold, recent
annotations, consensus rounds) lives in a mapping: the batch's states loaded from Redis
(`streams.state.ItemStore`) by the worker, a dict in a replay; criteria and proficiency live in
Redis through `streams.state`.

Every output is derived from its inputs, ids included, so re-delivering an input re-emits the
same messages and changes no counter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import Field
from shapely.errors import GEOSException

from schemas.base import Id, Model, SchemaError, decode, is_id
from schemas.content import Content
from schemas.criteria import ProjectCriteria
from schemas.messages import (
    AlertScope,
    AnnotationSubmitted,
    DeadLetter,
    Escalation,
    EscalationReason,
    GoldAnswer,
    ItemScore,
    Message,
    QualityAlert,
    ReviewResult,
    RoundTimeout,
    ScoreKind,
    ScoreRecord,
    Verdict,
    WorkerSnapshot,
    derive_id,
)
from scoring import ScoringError, check_geometry, consensus_scores, pairwise_agreement, score_items
from scoring.policy import (
    SCALE,
    Proficiency,
    alert_severity,
    alert_transition,
    audit_draw,
    audit_rate,
    drift_flag,
    gold_escalates,
    gold_threshold,
    peer_confidence,
    primary_reason,
    priority,
    proficiency,
    qualification_flag,
    review_reasons,
    review_threshold,
    top_confusion,
    window_mean,
    worker_drift,
)
from scoring.reliability import known_risk, round_estimates, round_quality
from streams.state import (
    AlertFlags,
    CriteriaStore,
    ProficiencyStore,
    ProjectView,
    buckets_of,
    dead_letter_increment,
    high_water,
    level_of,
)

MAX_ANNOTATIONS_PER_ITEM = 200
log = logging.getLogger(__name__)

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


class ItemState(Model):
    """What the engine remembers of one item (its row in the item store, keyed by item_id).

    Enough to re-derive every output of a re-delivered input: the annotations (for reviews and
    consensus), which were scored against the current gold, and which form consensus rounds."""

    gold: GoldAnswer | None = None
    annotations: list[AnnotationSubmitted] = Field(default_factory=list)
    waiting: list[Id] = Field(default_factory=list, description="annotations without gold, not yet in a round")
    gold_scored: list[Id] = Field(default_factory=list, description="annotations scored against the current gold")
    rounds: dict[Id, list[Id]] = Field(default_factory=dict, description="consensus round -> annotation ids")
    parked_reviews: list[ReviewResult] = Field(
        default_factory=list, description="reviews that arrived before their annotation (topics are not ordered)"
    )

    def annotation(self, event_id: str) -> AnnotationSubmitted | None:
        for a in self.annotations:
            if a.event_id == event_id:
                return a
        return None

    def with_annotation(self, a: AnnotationSubmitted) -> ItemState:
        if self.annotation(a.event_id) is not None:
            return self
        kept = [*self.annotations, a][-MAX_ANNOTATIONS_PER_ITEM:]
        return self.model_copy(update={"annotations": kept})


@dataclass
class Settings:
    """Engine behaviour that is not a project's criteria."""

    unknown_projects: str = "default"  # or "deadletter"
    stage: str = "score"


@dataclass
class Engine:
    items: MutableMapping[str, bytes]
    criteria: CriteriaStore
    proficiency: ProficiencyStore
    alerts: AlertFlags
    settings: Settings = field(default_factory=Settings)
    clock: object = time.time  # wall clock, only for caches and received_at stamps
    # items with annotations waiting for a round -> the oldest one's submission time, so that the
    # consensus timer need not parse the whole item table each tick (it did: a pause that grew
    # with the table); `_indexed` are the item ids the index has seen (see `waiting_items`)
    _waiting: dict[str, datetime] = field(default_factory=dict, init=False, repr=False)
    _indexed: set[str] = field(default_factory=set, init=False, repr=False)
    _rescan: bool = field(default=True, init=False, repr=False)

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        return self.clock()  # type: ignore[operator]

    def _stamp(self) -> datetime:
        return datetime.fromtimestamp(self._now(), UTC)

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
            received_at=self._stamp(),
            errors=[{"loc": e.loc, "msg": e.msg, "type": e.type} for e in (errors or [])],
        )
        return Emit("deadletter", None, letter)

    def _decode(self, rec: Record, model: type[Message]) -> Message | Emit:
        if rec.value is None:
            return self.dead(rec, "empty", "message has no value")
        try:
            return decode(model, rec.value)
        except SchemaError as exc:
            reason = "undecodable" if exc.reason == "json_invalid" else "schema"
            if exc.reason == "too_large":
                reason = "too_large"
            return self.dead(rec, reason, str(exc), exc.errors)

    async def _criteria(self, project_id: str) -> ProjectCriteria | None:
        found = await self.criteria.get(project_id, self._now())
        if found is None and self.settings.unknown_projects == "default":
            return ProjectCriteria(project_id=project_id)
        return found

    def _item(self, item_id: str) -> ItemState:
        raw = self.items.get(item_id)
        return ItemState.model_validate_json(raw) if raw else ItemState()

    def _save(self, item_id: str, state: ItemState) -> None:
        self.items[item_id] = state.model_dump_json().encode()
        self._index(item_id, state)

    def _index(self, item_id: str, st: ItemState) -> None:
        self._indexed.add(item_id)
        times = [x.submitted_at for e in st.waiting if (x := st.annotation(e)) is not None]
        if times and st.gold is None:
            self._waiting[item_id] = min(times)
        else:
            self._waiting.pop(item_id, None)

    # ------------------------------------------------------------------ inputs

    async def handle(self, rec: Record) -> list[Emit]:
        emits = await self._handle(rec)
        await self.count_dead(emits)
        return emits

    async def count_dead(self, emits: Sequence[Emit]) -> None:
        """Count dead letters by reason in Redis, once each (their ids derive from the source offset)."""
        incs = [
            dead_letter_increment(e.value) for e in emits if e.topic == "deadletter" and isinstance(e.value, DeadLetter)
        ]
        if incs:
            await self.proficiency.state.apply(incs)

    async def _handle(self, rec: Record) -> list[Emit]:
        try:
            if rec.topic == "annotations":
                return await self._on_annotation(rec)
            if rec.topic == "gold":
                return await self._on_gold(rec)
            if rec.topic == "reviews":
                return await self._on_review(rec)
            if rec.topic == "projects":
                return await self._on_criteria(rec)
            if rec.topic == "scores":
                return await self.apply_scores([rec])
            if rec.topic == "control":
                return await self._on_timeout(rec)
            return [self.dead(rec, "unknown_topic", f"no handler for topic {rec.topic!r}")]
        except ScoringError as exc:  # a shape the schema let through but scoring cannot use
            return [self.dead(rec, exc.reason, str(exc))]
        except INPUT_DEFECTS as exc:  # a bug this input found: keep the input, count it, live on
            log.exception("input %s/%s@%s raised; dead-lettered", rec.topic, rec.partition, rec.offset)
            return [self.dead(rec, "internal_error", f"{type(exc).__name__}: {exc}")]

    def _tombstone_key(self, rec: Record) -> str | Emit:
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

    async def _on_timeout(self, rec: Record) -> list[Emit]:
        t = self._decode(rec, RoundTimeout)
        if isinstance(t, Emit):
            return [t]
        assert isinstance(t, RoundTimeout)
        criteria = await self._criteria(t.project_id)
        if criteria is None:
            return [self.dead(rec, "unknown_project", f"project {t.project_id!r} has no criteria")]
        return await self.close_round(t.item_id, criteria)

    async def _on_criteria(self, rec: Record) -> list[Emit]:
        if rec.value is None:  # tombstone: the project falls back to defaults (or is unknown)
            project = self._tombstone_key(rec)
            if isinstance(project, Emit):
                return [project]
            await self.criteria.delete(project, self._now())
            return []
        c = self._decode(rec, ProjectCriteria)
        if isinstance(c, Emit):
            return [c]
        await self.criteria.set(c, self._now())  # type: ignore[arg-type]
        return []

    async def _on_gold(self, rec: Record) -> list[Emit]:
        if rec.value is None:  # tombstone retracts gold
            item_id = self._tombstone_key(rec)
            if isinstance(item_id, Emit):
                return [item_id]
            st = self._item(item_id)
            if st.gold is not None:
                self._save(item_id, st.model_copy(update={"gold": None}))
            return []
        g = self._decode(rec, GoldAnswer)
        if isinstance(g, Emit):
            return [g]
        assert isinstance(g, GoldAnswer)
        criteria = await self._criteria(g.project_id)
        if criteria is None:
            return [self.dead(rec, "unknown_project", f"project {g.project_id!r} has no criteria")]
        problems = _content_problems(g.content, criteria)
        if problems:
            return [self.dead(rec, problems[0], problems[1])]
        st = self._item(g.item_id)
        same_gold = st.gold is not None and st.gold.event_id == g.event_id
        # annotations waiting for a consensus round are scored against the new gold; on a
        # re-delivery of the same gold, what it scored before is scored (and emitted) again
        targets = [*st.waiting, *(st.gold_scored if same_gold else [])]
        st = st.model_copy(update={"gold": g, "waiting": [], "gold_scored": targets})
        self._save(g.item_id, st)
        out: list[Emit] = []
        for event_id in targets:
            a = st.annotation(event_id)
            if a is not None and a.project_id == g.project_id:
                out += await self._gold_score(a, g, criteria)
        return out

    async def _on_annotation(self, rec: Record) -> list[Emit]:
        a = self._decode(rec, AnnotationSubmitted)
        if isinstance(a, Emit):
            return [a]
        assert isinstance(a, AnnotationSubmitted)
        criteria = await self._criteria(a.project_id)
        if criteria is None:
            return [self.dead(rec, "unknown_project", f"project {a.project_id!r} has no criteria")]
        problems = _content_problems(a.content, criteria)
        if problems:
            out = [self.dead(rec, problems[0], problems[1])]
            if problems[0] == "invalid_geometry":
                out.append(await self._escalate(a, [EscalationReason.INVALID_GEOMETRY], criteria, detail=problems[1]))
            return out
        st = self._item(a.item_id).with_annotation(a)
        if _in_round(st, a.event_id):  # a redelivered round member: its round again, even if gold came since
            return await self._consensus(a, st, criteria) + await self._parked_reviews(a, st, criteria)
        if st.gold is not None and st.gold.project_id == a.project_id:
            if a.event_id not in st.gold_scored:
                st = st.model_copy(update={"gold_scored": [*st.gold_scored, a.event_id][-MAX_ANNOTATIONS_PER_ITEM:]})
            self._save(a.item_id, st)
            return await self._gold_score(a, st.gold, criteria) + await self._parked_reviews(a, st, criteria)
        if a.event_id not in st.waiting and not _in_round(st, a.event_id):
            st = st.model_copy(update={"waiting": [*st.waiting, a.event_id]})
        self._save(a.item_id, st)
        out = await self._submission_checks(a, criteria)
        out += await self._consensus(a, st, criteria)
        return out + await self._parked_reviews(a, st, criteria)

    async def _parked_reviews(self, a: AnnotationSubmitted, seen: ItemState, criteria: ProjectCriteria) -> list[Emit]:
        """Reviews that waited for this annotation. `seen`: the item state as this event found it
        (only reviews park reviews, so when it holds none for `a` there is nothing to re-read)."""
        if not any(r.annotation_event_id == a.event_id for r in seen.parked_reviews):
            return []
        st = self._item(a.item_id)
        mine = [r for r in st.parked_reviews if r.annotation_event_id == a.event_id]
        if not mine:
            return []
        st = st.model_copy(update={"parked_reviews": [r for r in st.parked_reviews if r not in mine]})
        self._save(a.item_id, st)
        out: list[Emit] = []
        for r in mine:
            out += await self._review(r, a, self._item(a.item_id), criteria, None)
        return out

    async def _on_review(self, rec: Record) -> list[Emit]:
        r = self._decode(rec, ReviewResult)
        if isinstance(r, Emit):
            return [r]
        assert isinstance(r, ReviewResult)
        criteria = await self._criteria(r.project_id)
        if criteria is None:
            return [self.dead(rec, "unknown_project", f"project {r.project_id!r} has no criteria")]
        if r.corrected is not None:  # on arrival, not after parking: the letter keeps its source and bytes
            problems = _content_problems(r.corrected, criteria)
            if problems:
                return [self.dead(rec, problems[0], problems[1])]
        st = self._item(r.item_id)
        a = st.annotation(r.annotation_event_id)
        if a is None:
            # Kafka orders a partition, not two topics: the annotation may still be on its way.
            if all(p.event_id != r.event_id for p in st.parked_reviews):
                parked = [*st.parked_reviews, r][-MAX_ANNOTATIONS_PER_ITEM:]
                self._save(r.item_id, st.model_copy(update={"parked_reviews": parked}))
            return []
        return await self._review(r, a, st, criteria, rec)

    async def _review(
        self, r: ReviewResult, a: AnnotationSubmitted, st: ItemState, criteria: ProjectCriteria, rec: Record | None
    ) -> list[Emit]:
        if r.corrected is not None:
            problems = _content_problems(r.corrected, criteria)
            if problems:
                if rec is None:
                    rec = Record("reviews", r.to_bytes(), r.item_id.encode())
                return [self.dead(rec, problems[0], problems[1])]
        if r.annotation_event_id in st.waiting:  # judged by an expert: no consensus round needed
            self._save(r.item_id, st.model_copy(update={"waiting": [w for w in st.waiting if w != a.event_id]}))
        if r.verdict is Verdict.CORRECT:
            assert r.corrected is not None
            result = score_items([(a, r.corrected)], criteria)[0]
        else:
            # approve: the annotation is its own reference; reject: nothing in it is right
            result = score_items([(a, a)], criteria)[0] if r.verdict is Verdict.APPROVE else _rejected()
        risk = None if result.score is None else known_risk(result.score, criteria.pass_threshold)
        out = [self._score_record(a, ScoreKind.REVIEW, r.event_id, result, confidence=1.0, risk=risk)]
        if r.promote_to_gold:
            content = r.corrected if r.corrected is not None else a.content
            gold = GoldAnswer(
                event_id=derive_id("gold", r.event_id),
                project_id=r.project_id,
                item_id=r.item_id,
                content=content,
                created_at=r.reviewed_at,
                source="review",
                review_event_id=r.event_id,
            )
            out.append(Emit("gold", r.item_id, gold))
        return out

    # ------------------------------------------------------------------ scoring

    def _score_record(
        self,
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
            time_on_task_s=_time_on_task(a),
            batch_id=a.batch_id,
            estimate=None if estimate is None else round(min(max(estimate, 0.0), 1.0), 6),
            risk=None if risk is None else round(risk, 6),
            escalated=escalated,
        )
        return Emit("scores", a.worker_id, rec)

    async def _gold_score(self, a: AnnotationSubmitted, g: GoldAnswer, criteria: ProjectCriteria) -> list[Emit]:
        result = score_items([(a, g)], criteria)[0]
        risk = None if result.score is None else known_risk(result.score, criteria.pass_threshold)
        out = [self._score_record(a, ScoreKind.GOLD, g.event_id, result, confidence=1.0, risk=risk)]
        if gold_escalates(result, criteria):
            out.append(
                await self._escalate(
                    a,
                    [EscalationReason.GOLD_BELOW_THRESHOLD],
                    criteria,
                    score=result.score,
                    threshold=gold_threshold(criteria),
                )
            )
        return out

    async def _submission_checks(self, a: AnnotationSubmitted, criteria: ProjectCriteria) -> list[Emit]:
        """An item without gold: audit a random sample at a rate that falls as the worker proves
        itself (the rest waits for its round, where its risk decides)."""
        (snap,) = await self.proficiency.snapshots([(a.project_id, a.worker_id, criteria)])
        if audit_draw(a.event_id, criteria.escalation.audit_seed) >= audit_rate(snap.lower_bound, criteria):
            return []
        return [await self._escalate(a, [EscalationReason.AUDIT_SAMPLE], criteria, snap=snap)]

    async def _consensus(self, a: AnnotationSubmitted, st: ItemState, criteria: ProjectCriteria) -> list[Emit]:
        """Score a round once the item has its overlap; re-emit it when a member is re-delivered."""
        for round_id, members in st.rounds.items():
            if a.event_id in members:
                return await self._score_round(st, round_id, members, criteria)
        latest: dict[str, AnnotationSubmitted] = {}
        for event_id in st.waiting:
            x = st.annotation(event_id)
            if x is not None and x.project_id == a.project_id:
                latest[x.worker_id] = x  # a worker's resubmission replaces its earlier answer
        closed = [m for members in st.rounds.values() for m in members]
        if closed:  # a late annotator: scored against the first round's members
            members = [*next(iter(st.rounds.values())), a.event_id]
            round_id = derive_id("late", a.event_id, *members)
        elif len(latest) >= criteria.consensus.overlap:
            members = sorted(x.event_id for x in latest.values())
            round_id = derive_id("round", a.item_id, *members)
        else:
            return []
        st = st.model_copy(
            update={"rounds": {**st.rounds, round_id: members}, "waiting": [w for w in st.waiting if w not in members]}
        )
        self._save(a.item_id, st)
        return await self._score_round(st, round_id, members, criteria)

    async def close_round(self, item_id: str, criteria: ProjectCriteria) -> list[Emit]:
        """Close a waiting item with at least `min_annotators` (the consensus timeout)."""
        st = self._item(item_id)
        waiting = {x.worker_id: x for e in st.waiting if (x := st.annotation(e)) is not None}
        if st.gold is not None or st.rounds or len(waiting) < criteria.consensus.min_annotators:
            return []
        members = sorted(x.event_id for x in waiting.values())
        round_id = derive_id("round", item_id, *members)
        st = st.model_copy(update={"rounds": {**st.rounds, round_id: members}, "waiting": []})
        self._save(item_id, st)
        return await self._score_round(st, round_id, members, criteria)

    async def timed_out(
        self, now: datetime | None, candidates: Sequence[tuple[str, datetime]] | None = None
    ) -> list[RoundTimeout]:
        """Requests to close the rounds of items that waited past their project's consensus
        timeout (every waiting item when `now` is None, as at the end of a replay). Only reads
        state: the worker's timer sends them on `control`, so the item's own consumer closes them.
        `candidates`: (item, oldest waiting submission) from the worker's index in Redis, else
        this engine's own index of its item store."""
        out = []
        for item_id, first in self.waiting_items() if candidates is None else candidates:
            st = self._item(item_id)
            if not st.waiting or st.gold is not None:
                continue  # changed since it was listed: the score agent runs between our awaits
            a = st.annotation(st.waiting[0])
            criteria = await self._criteria(a.project_id) if a is not None else None
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

    async def close_waiting(self, now: datetime | None = None) -> list[Emit]:
        """Close every round `timed_out` asks for, here and now (replay has no other agent)."""
        out: list[Emit] = []
        for req in await self.timed_out(now):
            criteria = await self._criteria(req.project_id)
            if criteria is not None:
                out += await self.close_round(req.item_id, criteria)
        return out

    def waiting_items(self) -> list[tuple[str, datetime]]:
        """Items with annotations waiting for a round, with the oldest one's submission time.

        From the index kept by `_save`; the table is scanned again after `reindex` (a rebalance)
        or when its size says that someone else changed it."""
        if self._rescan or len(self.items) != len(self._indexed):
            self._rescan = False
            self._waiting.clear()
            self._indexed.clear()
            for item_id, raw in list(self.items.items()):
                self._index(item_id, ItemState.model_validate_json(raw))
        return sorted(self._waiting.items())

    def waiting_since(self, item_id: str) -> datetime | None:
        """When the oldest annotation of an item still waiting for a round was submitted (None:
        nothing waits), as of the last save: the worker keeps its index in Redis with it."""
        return self._waiting.get(item_id)

    def forget(self, item_ids: Iterable[str]) -> None:
        """Drop items from the in-memory index once their state is stored elsewhere (the worker
        swaps its item store per batch; the index must not grow with every item ever seen)."""
        for item_id in item_ids:
            self._waiting.pop(item_id, None)
            self._indexed.discard(item_id)

    def reindex(self) -> None:
        """The item table changed under us (partitions recovered or revoked): scan it next time."""
        self._rescan = True

    async def _score_round(
        self, st: ItemState, round_id: str, members: list[str], criteria: ProjectCriteria
    ) -> list[Emit]:
        """Score a round's members: agreement with peers (the consensus score), each member's
        quality as the round alone says (`estimate`, summed into its worker's level), and its
        risk with the peers weighted by their levels; escalate what the review budget affords."""
        answers = [x for m in members if (x := st.annotation(m)) is not None]
        if len(answers) < 2:
            return []
        late = round_id != derive_id("round", answers[0].item_id, *members)
        agreement = pairwise_agreement(answers, criteria)
        scores = consensus_scores(answers, criteria, agreement=agreement)
        raw, _ = round_estimates(agreement)
        project = answers[0].project_id
        view = await self.proficiency.view(project, criteria)
        totals = await self.proficiency.totals([(project, x.worker_id) for x in answers])
        levels = [level_of(view.model, t) for t in totals]
        times = [_time_on_task(x) for x in answers]
        quality = round_quality(
            agreement, levels, view.model, criteria.pass_threshold, [view.pace.odds(t) for t in times]
        )
        threshold = review_threshold(view.risks, criteria)
        out: list[Emit] = []
        targets = [len(answers) - 1] if late else range(len(answers))
        for i in targets:
            a = answers[i]
            confidence = peer_confidence(agreement, i)
            result = _consensus_result(scores[i], criteria)
            risk = quality[i].risk
            standing = proficiency(totals[i], criteria, levels[i])
            said = view.model.calibration(float(raw[i]))
            reasons = review_reasons(risk, threshold, said, standing, view.pace.too_fast(times[i]), criteria)
            out.append(
                self._score_record(
                    a,
                    ScoreKind.CONSENSUS,
                    round_id,
                    result,
                    confidence=round(confidence, 6),
                    risk=risk,
                    estimate=float(raw[i]),
                    escalated=bool(reasons),
                )
            )
            if reasons:
                detail = (
                    f"risk {risk:.2f} (review from {threshold:.2f}); estimated quality {quality[i].estimate:.2f}"
                    f" +- {quality[i].sd:.2f}; consensus says {said:.2f}; worker level "
                    f"{levels[i].estimate:.2f} +- {levels[i].sd:.2f}"
                    + (
                        f"; {times[i]:.0f} s on task, project median {view.pace.median_s:.0f} s"
                        if view.pace.too_fast(times[i])
                        else ""
                    )
                )
                out.append(
                    await self._escalate(
                        a,
                        reasons,
                        criteria,
                        snap=standing,
                        score=quality[i].estimate,
                        threshold=criteria.pass_threshold,
                        risk=risk,
                        detail=detail,
                    )
                )
        return out

    async def _escalate(
        self,
        a: AnnotationSubmitted,
        reasons: list[EscalationReason],
        criteria: ProjectCriteria,
        *,
        snap: Proficiency | None = None,
        score: float | None = None,
        threshold: float | None = None,
        detail: str | None = None,
        risk: float | None = None,
    ) -> Emit:
        if snap is None:
            (snap,) = await self.proficiency.snapshots([(a.project_id, a.worker_id, criteria)])
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

    # ------------------------------------------------------------------ proficiency

    async def apply_scores(self, records: Sequence[Record]) -> list[Emit]:
        """Apply a batch of ScoreRecords to Redis (once each) and raise the alerts they cause."""
        out: list[Emit] = []
        scored: list[tuple[ScoreRecord, ProjectCriteria]] = []
        for rec in records:
            s = self._decode(rec, ScoreRecord)
            if isinstance(s, Emit):
                out.append(s)
                continue
            assert isinstance(s, ScoreRecord)
            c = await self._criteria(s.project_id)
            if c is None:
                out.append(self.dead(rec, "unknown_project", f"project {s.project_id!r} has no criteria"))
                continue
            scored.append((s, c))
        if not scored:
            await self.count_dead(out)
            return out
        await self.count_dead(out)
        workers = sorted({(s.project_id, s.worker_id) for s, _ in scored})
        crit = {s.project_id: c for s, c in scored}
        before = await self.proficiency.snapshots([(p, w, crit[p]) for p, w in workers])
        applied = await self.proficiency.apply(scored)
        after = await self.proficiency.snapshots([(p, w, crit[p]) for p, w in workers])
        latest = {}
        for (s, _), done in zip(scored, applied, strict=True):
            if done:
                latest[(s.project_id, s.worker_id)] = max(
                    latest.get((s.project_id, s.worker_id), s.event_time), s.event_time
                )
        standing = {
            (p, w): (b, a) for (p, w), b, a in zip(workers, before, after, strict=True) if (p, w) in latest
        }  # only re-deliveries for the others: nothing changed
        out += await self._window_alerts(latest, crit, scored, standing)
        return out

    async def _window_alerts(
        self, latest: dict, crit: dict[str, ProjectCriteria], scored: list, standing: dict
    ) -> list[Emit]:
        """Worker alerts (qualification, `scoring.policy.qualification_flag`; drift counted in
        items, `scoring.policy.drift_flag`) and label and project metrics over the alert window,
        with hysteresis."""
        if not latest:
            return []
        out: list[Emit] = []
        keys = self.proficiency.keys
        projects = sorted({p for p, _ in latest})
        checks: list[
            tuple[str, AlertScope, str, str, float | None, str]
        ] = []  # project, scope, id, key, target, metric
        for p in projects:
            checks.append(
                (p, AlertScope.PROJECT, p, keys.project(p, "buckets"), crit[p].targets.item_score, "item_score")
            )
        labels = sorted({(s.project_id, label) for s, _ in scored for label in s.result.labels})
        for p, label in labels:
            checks.append((p, AlertScope.LABEL, label, keys.project(p, f"label:{label}"), crit[p].targets.f1, "f1"))
        hashes = await self.proficiency.hashes([c[3] for c in checks])
        # Windows end at the project's high-water mark of event time, not at this batch's latest
        # score: a consensus round scores annotations submitted long before it closed, and judging
        # "now" as of their time made alerts flap back and forth in time.
        as_of = {p: max(t for (pp, _), t in latest.items() if pp == p) for p in projects}
        for (p, scope, _, _, _, _), fields in zip(checks, hashes, strict=True):
            hw = high_water(fields) if scope == AlertScope.PROJECT else None
            if hw is not None and hw > as_of[p].timestamp():
                as_of[p] = datetime.fromtimestamp(hw, UTC)
        flags = {p: await self.alerts.current(p) for p in projects}
        out += await self._worker_alerts(crit, standing, flags, as_of)
        for (p, scope, sid, _, target, metric), fields in zip(checks, hashes, strict=True):
            pol = crit[p].alerts
            t = int(as_of[p].timestamp())
            if metric == "f1":
                value, n = _window_f1(fields, t, pol.window_s)
            else:
                value, n = window_mean(buckets_of(fields), t, pol.window_s)
            if n < pol.min_items:
                continue
            field_name = f"{scope.value}:{sid}:{metric}"
            new = alert_transition(flags[p].get(field_name), value, target, pol.margin)
            if new is None or not await self.alerts.change(p, field_name, new):
                continue
            out.append(self._alert(p, scope, sid, metric, value, target, f"{pol.window_s}s", as_of[p], new))
        return out

    async def _worker_alerts(
        self, crit: dict[str, ProjectCriteria], standing: dict, flags: dict[str, dict[str, str]], as_of: dict
    ) -> list[Emit]:
        """Qualification changes and drift of the workers whose evidence this batch changed."""
        out: list[Emit] = []
        workers = sorted(standing)
        sequences = await self.proficiency.evidence(workers)
        views = {p: await self.proficiency.view(p, crit[p]) for p, _ in workers}
        for (p, w), seq in zip(workers, sequences, strict=True):
            before, after = standing[(p, w)]
            c, view = crit[p], views[p]
            qual = f"{AlertScope.WORKER.value}:{w}:qualification"
            flag = qualification_flag(flags[p].get(qual), after.state)
            if flag is not None and await self.alerts.change(p, qual, flag):
                detail = f"qualification {before.state.value} -> {after.state.value}; " + await self._about(
                    p, w, after, view
                )
                state = "resolved" if flag == "resolved" else "firing"
                target = c.proficiency.qualification.qualify_at
                out.append(self._alert(p, AlertScope.WORKER, w, "qualification", after.estimate, target, "all",
                                       as_of[p], state, detail=detail))  # fmt: skip
            found = worker_drift(seq, view.model, c)
            name = f"{AlertScope.WORKER.value}:{w}:drift"
            flag = drift_flag(flags[p].get(name), found, c)
            if flag is None or found is None or not await self.alerts.change(p, name, flag):
                continue
            detail = (
                f"level {found.before:.2f} -> {found.after:.2f} from item {found.at + 1} of its latest "
                f"{len(seq)} (z^2 {found.statistic:.0f}); latest items {found.recent:.2f}; "
            ) + await self._about(p, w, after, view)
            out.append(self._alert(p, AlertScope.WORKER, w, "drift", found.recent, c.targets.item_score,
                                   f"{len(seq)} items", as_of[p], flag, detail=detail))  # fmt: skip
        return out

    async def _about(self, project: str, worker: str, standing: Proficiency, view: ProjectView) -> str:
        """What a QC lead wants to know with a worker alert: its level and evidence, its pace,
        and the label confusion it makes most (the car/truck worker named as such)."""
        parts = []
        if standing.estimate is not None:
            parts.append(
                f"level {standing.estimate:.2f} +- {standing.sd or 0:.2f} from {standing.known} known answers "
                f"and {standing.rounds} consensus rounds"
            )
        top = top_confusion(await self.proficiency.confusions(project, worker))
        if top is not None:
            parts.append(top)
        return "; ".join(parts)

    def _alert(
        self,
        project: str,
        scope: AlertScope,
        scope_id: str,
        metric: str,
        value: float | None,
        target: float | None,
        window: str,
        when: datetime,
        state: str,
        detail: str | None = None,
    ) -> Emit:
        severity = alert_severity(state, value, target)
        alert = QualityAlert(
            event_id=derive_id("alert", project, scope.value, scope_id, metric, state, when.isoformat()),
            project_id=project,
            scope=scope,
            scope_id=scope_id,
            metric=metric,
            value=None if value is None else round(value, 6),
            target=target,
            window=window,
            severity=severity,
            state=state,
            raised_at=when,
            detail=detail,
        )
        return Emit("alerts", alert.key, alert)


def _in_round(st: ItemState, event_id: str) -> bool:
    return any(event_id in members for members in st.rounds.values())


def _content_problems(content: Content, criteria: ProjectCriteria) -> tuple[str, str] | None:
    from schemas.validation import content_errors

    errors = content_errors(content, criteria)
    if errors:
        return errors[0].type, "; ".join(str(e) for e in errors[:5])
    try:
        check_geometry(content)
    except ScoringError as exc:
        return exc.reason, str(exc)
    return None


def _rejected() -> ItemScore:
    return ItemScore(score=0.0, passed=False)


def _consensus_result(value: float | None, criteria: ProjectCriteria) -> ItemScore:
    """A consensus score is an agreement, not a comparison with one reference: no object counts."""
    if value is None:
        return ItemScore(score=None, passed=None)
    return ItemScore(score=value, passed=value >= criteria.pass_threshold)


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


def _time_on_task(a: AnnotationSubmitted) -> float | None:
    return (a.submitted_at - a.started_at).total_seconds() if a.started_at else None


def _window_f1(fields: dict[str, int], as_of: int, window_s: int) -> tuple[float | None, int]:
    tp = fp = fn = 0
    for name, value in fields.items():
        start, _, part = name.partition(":")
        if as_of - window_s < int(start) <= as_of:
            if part == "tp":
                tp += value
            elif part == "fp":
                fp += value
            elif part == "fn":
                fn += value
    den = 2 * tp + fp + fn
    return (2 * tp / den if den else None), tp + fn


__all__ = ["SCALE", "Emit", "Engine", "ItemState", "Record", "Settings"]
