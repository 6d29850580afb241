"""The messages on goldstream's topics (DESIGN §2), one model each.

Ids of emitted events are derived from their inputs (see `derive_id`), never random, so a
re-delivered input produces byte-identical outputs that consumers can de-duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from goldstream.schemas.base import Id, Label, Message, Model
from goldstream.schemas.content import Content
from goldstream.schemas.criteria import ProjectCriteria
from pydantic import AwareDatetime, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

OUTPUT_SIZE_LIMIT = 1024 * 1024
"""Escalations and dead letters may exceed the input limit (they embed an input): up to Kafka's
default message size."""

Unit = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]


def derive_id(*parts: str) -> str:
    """A deterministic event id from its inputs (sha256, 32 hex chars)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------- inputs


class AnnotationSubmitted(Message):
    """A worker's submitted annotation of one item (topic `annotations`, key item_id)."""

    topic: ClassVar[str] = "annotations"

    project_id: Id
    item_id: Id
    worker_id: Id
    content: Content
    submitted_at: AwareDatetime
    started_at: AwareDatetime | None = Field(None, description="with submitted_at: time on task")
    batch_id: Id | None = None
    source: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="producing tool: label_studio, cvat, or your own"
    )
    external_id: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="the annotation's id in the producing tool"
    )

    @model_validator(mode="after")
    def _times(self) -> AnnotationSubmitted:
        if self.started_at is not None and self.started_at > self.submitted_at:
            raise ValueError("started_at is after submitted_at")
        return self


class GoldAnswer(Message):
    """The ground truth of an item (compacted topic `gold`, key item_id; a tombstone retracts it)."""

    topic: ClassVar[str] = "gold"

    project_id: Id
    item_id: Id
    content: Content
    created_at: AwareDatetime
    source: Literal["curated", "import", "review"] = "curated"
    review_event_id: Id | None = Field(None, description="the review whose correction became gold")


class Verdict(StrEnum):
    APPROVE = "approve"
    CORRECT = "correct"
    REJECT = "reject"


class ReviewResult(Message):
    """An expert's verdict on one annotation (topic `reviews`, key item_id)."""

    topic: ClassVar[str] = "reviews"

    project_id: Id
    item_id: Id
    annotation_event_id: Id = Field(description="event_id of the reviewed AnnotationSubmitted")
    worker_id: Id = Field(description="the annotator whose work was reviewed")
    reviewer_id: Id
    reviewer_role: Literal["expert", "reviewer", "lead", "customer"] = "reviewer"
    verdict: Verdict
    corrected: Content | None = Field(None, description="the reviewer's answer; required with correct")
    promote_to_gold: bool = False
    comment: Annotated[str, Field(max_length=4096)] | None = None
    reviewed_at: AwareDatetime

    @model_validator(mode="after")
    def _correction(self) -> ReviewResult:
        if self.verdict is Verdict.CORRECT and self.corrected is None:
            raise ValueError("verdict 'correct' needs the corrected content")
        if self.verdict is not Verdict.CORRECT and self.corrected is not None:
            raise ValueError(f"verdict {self.verdict.value!r} carries no corrected content")
        if self.promote_to_gold and self.verdict is Verdict.REJECT:
            raise ValueError("a rejected annotation cannot be promoted to gold")
        return self


# ------------------------------------------------------------------------------- scores


class ScoreKind(StrEnum):
    GOLD = "gold"
    CONSENSUS = "consensus"
    REVIEW = "review"


class Family(StrEnum):
    """Shape families: objects are only compared within one (metrics spec §1)."""

    BOX = "box"
    REGION = "region"
    KEYPOINTS = "keypoints"
    POINT = "point"
    POLYLINE = "polyline"


class Outcome(StrEnum):
    MATCH = "match"  # same label, similarity >= threshold (TP)
    MISMATCH = "mismatch"  # other label, similarity >= threshold (FP + FN)
    MISSED = "missed"  # reference object left unmatched (FN)
    EXTRA = "extra"  # annotation object left unmatched (FP)


class ObjectMatch(Model):
    """One row of an item's assignment between annotation and reference objects."""

    outcome: Outcome
    family: Family
    annotation_object_id: Id | None = None
    reference_object_id: Id | None = None
    annotation_label: Label | None = None
    reference_label: Label | None = None
    similarity: Unit | None = None


class LabelCounts(Model):
    """Mergeable per-label counters (metrics spec §3, §5)."""

    tp: Count = 0
    fp: Count = 0
    fn: Count = 0
    sim_sum: Annotated[float, Field(ge=0)] = 0.0


class ObjectCounts(Model):
    matches: Count = 0
    mismatches: Count = 0
    missed: Count = 0
    extra: Count = 0
    sim_sum: Annotated[float, Field(ge=0)] = 0.0


class Metrics(Model):
    """Ratios; None where the denominator is zero (undefined, not 0)."""

    precision: Unit | None = None
    recall: Unit | None = None
    f1: Unit | None = None
    accuracy: Unit | None = None
    mean_similarity: Unit | None = None


class Components(Model):
    """The item score's components; None where the item has no such content."""

    objects: Unit | None = None
    classifications: Unit | None = None
    attributes: Unit | None = None
    relationships: Unit | None = None


class KeypointFigures(Model):
    """Keypoint figures over matched keypoint sets (metrics spec §1): sums that merge across
    items, and the ratios derived from them."""

    pairs: Count = 0
    oks_sum: Annotated[float, Field(ge=0)] = 0.0
    sq_err_sum: Annotated[float, Field(ge=0)] = 0.0
    both: Count = Field(0, description="keypoints labeled on both sides")
    within: Count = Field(0, description="gold-labeled keypoints annotated within the pixel tolerance")
    gold_labeled: Count = 0
    missing: Count = Field(0, description="gold-labeled keypoints the annotation left out")
    extra: Count = Field(0, description="keypoints labeled by the annotation but not by gold")
    oks_mean: Unit | None = None
    rmse: Annotated[float, Field(ge=0)] | None = None
    pck: Unit | None = None


class ItemScore(Model):
    """The comparison of one annotation with one reference: what `scoring.score_item` returns."""

    matches: list[ObjectMatch] = Field(default_factory=list)
    labels: dict[Label, LabelCounts] = Field(default_factory=dict)
    objects: ObjectCounts = Field(default_factory=ObjectCounts)
    metrics: Metrics = Field(default_factory=Metrics)
    components: Components = Field(default_factory=Components)
    keypoints: KeypointFigures | None = None
    attributes_compared: Count = 0
    attributes_correct: Count = 0
    classifications_compared: Count = 0
    classifications_correct: Count = 0
    classification_labels: dict[Label, LabelCounts] = Field(
        default_factory=dict, description="per 'taxonomy/label' TP/FP/FN of item classifications"
    )
    relationships_tp: Count = 0
    relationships_fp: Count = 0
    relationships_fn: Count = 0
    ignored: Count = Field(0, description="annotation objects on crowd regions, not counted")
    score: Unit | None = Field(description="None: nothing to compare (both empty, empty-item rule off)")
    passed: bool | None


class Figures(Model):
    """Quality figures of merged counters (a batch, a worker, a label, a project): what
    `scoring.Counters.compute` returns. None where undefined (zero denominator)."""

    items: Count = 0
    scored: Count = 0
    passed: Count = 0
    pass_rate: Unit | None = None
    mean_score: Unit | None = None
    precision: Unit | None = None
    recall: Unit | None = None
    f1: Unit | None = None
    accuracy: Unit | None = None
    mean_similarity: Unit | None = None
    panoptic_quality: Unit | None = None
    attribute_accuracy: Unit | None = None
    classification_accuracy: Unit | None = None
    relationship_f1: Unit | None = None
    keypoints: KeypointFigures | None = None
    labels: dict[Label, Metrics] = Field(default_factory=dict)


class ScoreRecord(Message):
    """One scored annotation (topic `scores`, key worker_id): the log of record for proficiency."""

    topic: ClassVar[str] = "scores"

    project_id: Id
    item_id: Id
    worker_id: Id
    annotation_event_id: Id
    kind: ScoreKind
    reference_id: Id = Field(description="gold / review event id, or the consensus round id")
    result: ItemScore
    confidence: Unit = Field(description="how much to trust this score (gold 1, consensus < 1)")
    event_time: AwareDatetime = Field(description="the annotation's submitted_at: windows use it")
    time_on_task_s: Annotated[float, Field(ge=0)] | None = None
    batch_id: Id | None = None
    estimate: Unit | None = Field(
        None,
        description="consensus: the annotation's quality as its round alone says (scoring.reliability."
        "round_estimates); the same in every replay, so proficiency sums it",
    )
    risk: Unit | None = Field(
        None,
        description="probability that the annotation is bad (quality below pass_threshold) as judged when "
        "scored: measured against a known answer, else from the reliability-weighted consensus, the "
        "worker's level and its pace",
    )
    escalated: bool = Field(False, description="this score sent the annotation to review (risk above the budget's)")
    source_topic: Annotated[str, Field(min_length=1, max_length=249)] | None = Field(
        None,
        description="the input that made this score (an annotation, a review, a round's timeout): its topic, "
        "partition and offset. Proficiency applies each score once by it (streams.state.Position)",
    )
    source_partition: Annotated[int, Field(ge=0)] | None = None
    source_offset: Annotated[int, Field(ge=0)] | None = None

    @staticmethod
    def make_id(annotation_event_id: str, kind: ScoreKind, reference_id: str) -> str:
        return derive_id("score", annotation_event_id, kind.value, reference_id)


# ------------------------------------------------------------------------------- decisions


class EscalationReason(StrEnum):
    GOLD_BELOW_THRESHOLD = "gold_below_threshold"
    CONSENSUS_BELOW_THRESHOLD = "consensus_below_threshold"
    LOW_PROFICIENCY = "low_proficiency"
    HIGH_RISK = "high_risk"
    TOO_FAST = "too_fast"
    AUDIT_SAMPLE = "audit_sample"
    INVALID_GEOMETRY = "invalid_geometry"


class QualificationState(StrEnum):
    QUALIFYING = "qualifying"
    QUALIFIED = "qualified"
    PROBATION = "probation"
    SUSPENDED = "suspended"


class WorkerSnapshot(Model):
    """The worker's standing when the decision was made."""

    state: QualificationState
    items: Count = 0
    gold_items: Count = 0
    mean_score: Unit | None = None
    lower_bound: Unit | None = Field(None, description="conservative proficiency: estimate - z * sd")
    estimate: Unit | None = Field(None, description="the worker's level from all its evidence (scoring.reliability)")
    estimate_sd: Annotated[float, Field(ge=0)] | None = None


class Escalation(Message):
    """An annotation sent to expert review (topic `escalations`, key item_id)."""

    topic: ClassVar[str] = "escalations"
    min_size_limit: ClassVar[int] = OUTPUT_SIZE_LIMIT

    project_id: Id
    item_id: Id
    worker_id: Id
    reasons: list[EscalationReason] = Field(min_length=1)
    priority: Annotated[int, Field(ge=0, le=100)]
    score: Unit | None = None
    threshold: Unit | None = None
    risk: Unit | None = Field(None, description="probability that the annotation is bad (see ScoreRecord.risk)")
    worker: WorkerSnapshot
    annotation: AnnotationSubmitted
    created_at: AwareDatetime
    detail: Annotated[str, Field(max_length=4096)] | None = None

    @staticmethod
    def make_id(annotation_event_id: str, reason: EscalationReason) -> str:
        return derive_id("escalation", annotation_event_id, reason.value)


class AlertScope(StrEnum):
    WORKER = "worker"
    LABEL = "label"
    PROJECT = "project"
    BATCH = "batch"


class QualityAlert(Message):
    """A quality metric crossing its target (topic `alerts`, key scope:scope_id)."""

    topic: ClassVar[str] = "alerts"

    project_id: Id
    scope: AlertScope
    scope_id: Annotated[str, Field(min_length=1, max_length=256)]
    metric: Annotated[str, Field(min_length=1, max_length=64)]
    value: float | None
    target: float | None
    window: Annotated[str, Field(max_length=32)] = Field(description="e.g. '24h', 'batch'")
    severity: Literal["info", "warning", "critical"]
    state: Literal["firing", "resolved"]
    raised_at: AwareDatetime
    detail: Annotated[str, Field(max_length=4096)] | None = None

    @property
    def key(self) -> str:
        return f"{self.scope.value}:{self.scope_id}"


# ------------------------------------------------------------------------------- failures


RAW_KEPT_MAX = 600_000
"""Bytes of an input a dead letter carries as they are. With base64 (4/3) and the rest of the
letter that stays under Kafka's default 1 MB, so the letter of any input Kafka delivered can itself
be published; a larger input is kept zlib-compressed, or (incompressible) its first bytes with its
size and sha256 (the whole input stays at its source topic, partition and offset)."""
KEY_KEPT_MAX = 16 * 1024
ERRORS_KEPT = 50


class DeadLetter(Message):
    """Input that could not be processed, kept whole with the reason (topic `deadletter`)."""

    topic: ClassVar[str] = "deadletter"
    min_size_limit: ClassVar[int] = OUTPUT_SIZE_LIMIT

    source_topic: Annotated[str, Field(min_length=1, max_length=249)]
    source_partition: Annotated[int, Field(ge=-1)]
    source_offset: Annotated[int, Field(ge=-1)]
    key_b64: str | None = None
    raw_b64: str = Field(description="the message value as received, base64 (see raw_encoding)")
    raw_encoding: Literal["plain", "zlib", "head"] = Field(
        "plain",
        description="plain: raw_b64 is the whole value; zlib: the whole value zlib-compressed; head: its first "
        f"{RAW_KEPT_MAX} bytes only (an incompressible value over that size). Left out when plain.",
    )
    raw_size: Annotated[int, Field(ge=0)] | None = Field(None, description="size of the whole value (not plain)")
    raw_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="sha256 of the whole value (not plain)"
    )
    reason: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="undecodable / schema / too_large / unknown_project / invalid_geometry / ..."
    )
    error: Annotated[str, Field(max_length=16_384)]
    errors: list[dict[str, str]] = Field(
        default_factory=list, max_length=ERRORS_KEPT + 1, description="field-level errors (the first 50)"
    )
    stage: Annotated[str, Field(max_length=64)] = ""
    received_at: AwareDatetime

    @model_serializer(mode="wrap")
    def _omit_plain(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dead letters that hold their input whole keep the 1.0 layout, byte for byte."""
        data = handler(self)
        if self.raw_encoding == "plain":
            for name in ("raw_encoding", "raw_size", "raw_sha256"):
                data.pop(name, None)
        return data

    @classmethod
    def of(
        cls,
        raw: bytes,
        *,
        topic: str,
        partition: int,
        offset: int,
        reason: str,
        error: str,
        key: bytes | None = None,
        stage: str = "",
        received_at: datetime,
        errors: list[dict[str, str]] | None = None,
    ) -> DeadLetter:
        """Build a dead letter whose id depends only on where the input came from, small enough to
        publish whatever the input's size (see RAW_KEPT_MAX) and however many errors it had."""
        encoding, kept = "plain", raw
        if len(raw) > RAW_KEPT_MAX:
            packed = zlib.compress(raw, 6)
            encoding, kept = ("zlib", packed) if len(packed) <= RAW_KEPT_MAX else ("head", raw[:RAW_KEPT_MAX])
        if key is not None and len(key) > KEY_KEPT_MAX:
            error = f"{error} (key of {len(key)} bytes: its first {KEY_KEPT_MAX} kept)"
            key = key[:KEY_KEPT_MAX]
        listed = [
            {"loc": e.get("loc", "")[:256], "msg": e.get("msg", "")[:1024], "type": e.get("type", "")[:64]}
            for e in (errors or [])[:ERRORS_KEPT]
        ]
        if errors and len(errors) > ERRORS_KEPT:
            listed.append({"loc": "", "msg": f"and {len(errors) - ERRORS_KEPT} more", "type": "more"})
        return cls(
            event_id=derive_id("deadletter", topic, str(partition), str(offset), stage),
            source_topic=topic[:249],
            source_partition=partition,
            source_offset=offset,
            key_b64=base64.b64encode(key).decode() if key is not None else None,
            raw_b64=base64.b64encode(kept).decode(),
            raw_encoding=encoding,
            raw_size=None if encoding == "plain" else len(raw),
            raw_sha256=None if encoding == "plain" else hashlib.sha256(raw).hexdigest(),
            reason=reason[:64],
            error=error[:16_384],
            errors=listed,
            stage=stage[:64],
            received_at=received_at,
        )

    @property
    def raw(self) -> bytes:
        """The input as received; with raw_encoding 'head', only its first bytes (see `complete`)."""
        kept = base64.b64decode(self.raw_b64)
        return zlib.decompress(kept) if self.raw_encoding == "zlib" else kept

    @property
    def complete(self) -> bool:
        """Whether `raw` is the whole input."""
        return self.raw_encoding != "head"


class RoundTimeout(Message):
    """Internal (topic `control`, key item_id): close an item's consensus round after its timeout.

    A timer finds the items; this message brings the closing into the agent that owns the item's
    partition, where its state may be changed."""

    topic: ClassVar[str] = "control"

    project_id: Id
    item_id: Id
    requested_at: AwareDatetime


MESSAGES: tuple[type[Message], ...] = (
    AnnotationSubmitted,
    GoldAnswer,
    ReviewResult,
    ScoreRecord,
    Escalation,
    QualityAlert,
    ProjectCriteria,
    DeadLetter,
    RoundTimeout,
)
"""Every top-level message, in DESIGN §2 order (and the internal control message)."""
