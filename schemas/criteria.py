"""A project's quality criteria: taxonomy, thresholds, targets and the policies that act on them.

Published on the compacted `projects` topic (`goldstream criteria set FILE`). Every field has a
default, so a project without criteria is still scored sensibly, and a YAML file only needs to
name what differs from the defaults.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated, Any, ClassVar, Literal

import orjson
from goldstream.schemas.base import Id, Label, Message, Model
from goldstream.schemas.content import ShapeType
from pydantic import Field, model_validator

Unit = Annotated[float, Field(ge=0, le=1)]
Pixels = Annotated[float, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0)]

# COCO person keypoints: the OKS sigmas of pycocotools' COCOeval.
COCO_PERSON_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
COCO_PERSON_SIGMAS = (
    0.026,
    0.025,
    0.025,
    0.035,
    0.035,
    0.079,
    0.079,
    0.072,
    0.072,
    0.062,
    0.062,
    0.107,
    0.107,
    0.087,
    0.087,
    0.089,
    0.089,
)
COCO_PERSON_SKELETON = (
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
)


class KeypointSchema(Model):
    """Names, OKS sigmas and skeleton (1-based index pairs, as COCO) of a keypoint set."""

    names: list[Label] = Field(min_length=1)
    sigmas: list[Annotated[float, Field(gt=0)]]
    skeleton: list[tuple[int, int]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> KeypointSchema:
        if len(self.sigmas) != len(self.names):
            raise ValueError(f"{len(self.names)} names but {len(self.sigmas)} sigmas")
        for a, b in self.skeleton:
            if not (1 <= a <= len(self.names) and 1 <= b <= len(self.names)):
                raise ValueError(f"skeleton edge ({a}, {b}) is outside 1..{len(self.names)}")
        return self


def coco_person() -> KeypointSchema:
    return KeypointSchema(
        names=list(COCO_PERSON_NAMES),
        sigmas=list(COCO_PERSON_SIGMAS),
        skeleton=[tuple(e) for e in COCO_PERSON_SKELETON],
    )


class AttributeSpec(Model):
    """How one attribute is compared on matched objects."""

    compare: Literal["exact", "numeric", "text"] = "exact"
    tolerance: Annotated[float, Field(ge=0)] = Field(
        0.0, description="numeric: |a - b| <= tolerance; text: normalised edit distance <= tolerance"
    )
    values: list[str] | None = Field(None, description="allowed values, when the attribute is a choice")


class LabelSpec(Model):
    """Per-label settings; anything left None falls back to the project's defaults."""

    name: Label
    shape_types: list[ShapeType] = Field(default_factory=list, description="empty: any shape")
    threshold: Unit | None = Field(None, description="match threshold on the family's similarity")
    point_tolerance: Pixels | None = None
    line_tolerance: Pixels | None = None
    orientation_matters: bool = Field(False, description="polylines: do not try the reversed line")
    keypoint_schema: Label | None = None
    attributes: dict[Label, AttributeSpec] = Field(default_factory=dict)
    min_score: Unit | None = Field(None, description="escalate a gold score below this for the label")


class ClassificationSpec(Model):
    """An item-level taxonomy (e.g. weather: sunny / rain / snow)."""

    labels: list[Label] = Field(min_length=1)
    multi: bool = False


class Weights(Model):
    """Weights of the item score's components; equal by default (metrics spec §4)."""

    objects: Annotated[float, Field(ge=0)] = 1.0
    classifications: Annotated[float, Field(ge=0)] = 1.0
    attributes: Annotated[float, Field(ge=0)] = 1.0
    relationships: Annotated[float, Field(ge=0)] = 1.0


class ComponentMinimums(Model):
    objects: Unit | None = None
    classifications: Unit | None = None
    attributes: Unit | None = None
    relationships: Unit | None = None


class QualityTargets(Model):
    """Minimums a batch, worker, label or project must reach (batch verdict, alerts)."""

    accuracy: Unit | None = 0.9
    precision: Unit | None = 0.9
    recall: Unit | None = 0.9
    f1: Unit | None = 0.9
    item_score: Unit | None = 0.75


class EscalationPolicy(Model):
    """What goes to expert review: the riskiest work first, within a budget; plus random audits."""

    review_budget: Unit | None = Field(
        None,
        description="share of non-gold annotations sent to review, riskiest first (an adaptive threshold on "
        "their risk that tracks this share); None (the default): every annotation more likely bad than not "
        "(risk at least 0.5). `goldstream report` shows the expected bad share and what a budget buys",
    )
    score_threshold: Unit | None = Field(None, description="gold score below: escalate (default: pass_threshold)")
    consensus_threshold: Unit = Field(
        0.6, description="an escalated annotation whose estimated quality is below this is labelled consensus_below"
    )
    proficiency_target: Unit = Field(
        0.7, description="an escalated annotation whose worker's level is confidently below this: low_proficiency"
    )
    fast_share: Unit = Field(
        0.25, description="time on task below this share of the project's median is too fast (a risk signal)"
    )
    audit_rate_max: Unit = Field(0.05, description="random audit rate of a worker without evidence yet")
    audit_rate_min: Unit = Field(0.01, description="random audit rate of a proven worker")
    audit_seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _rates(self) -> EscalationPolicy:
        if self.audit_rate_min > self.audit_rate_max:
            raise ValueError("audit_rate_min is above audit_rate_max")
        return self


class QualificationPolicy(Model):
    """qualifying -> qualified / probation -> suspended, on the interval of the worker's level."""

    min_gold_items: Annotated[int, Field(ge=0)] = Field(
        10,
        description="known answers (gold, review) a worker needs to be qualified; probation and suspension "
        "need none when the other evidence is clear",
    )
    qualify_at: Unit = 0.7
    probation_below: Unit = 0.6
    suspend_below: Unit = 0.4

    @model_validator(mode="after")
    def _ordered(self) -> QualificationPolicy:
        if not self.suspend_below <= self.probation_below <= self.qualify_at:
            raise ValueError("need suspend_below <= probation_below <= qualify_at")
        return self


class ProficiencyPolicy(Model):
    """How a worker's standing is kept: the evidence sequence, the time buckets, the interval."""

    bucket_s: Annotated[int, Field(gt=0)] = 300
    history_s: Annotated[int, Field(gt=0)] = Field(
        7 * 86_400,
        description="how long time buckets are kept (event time, behind the newest): the alert window and "
        "the dashboard's trends read them; older buckets are deleted, so a worker's state does not grow with time",
    )
    evidence_items: Annotated[int, Field(ge=10, le=1000)] = Field(
        100, description="the latest evidence items kept per worker, in event-time order, for drift"
    )
    prior_weight: Annotated[float, Field(gt=0)] = Field(
        2.0, description="a new worker starts at the project's mean level, worth this many annotations"
    )
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    qualification: QualificationPolicy = Field(default_factory=QualificationPolicy)
    # retired with the reliability model: read and ignored, so that the criteria an earlier
    # goldstream published (every field written out) still load from the compacted topic
    ewma_half_life_s: Any = Field(None, exclude=True, description="retired; ignored")
    windows_s: Any = Field(None, exclude=True, description="retired; ignored")
    prior_passes: Any = Field(None, exclude=True, description="retired (see prior_weight); ignored")
    prior_fails: Any = Field(None, exclude=True, description="retired (see prior_weight); ignored")


MIN_ANNOTATORS = 2
"""The fewest annotators of any consensus round: an item waiting on fewer workers cannot time out
(the consensus timer need not watch it)."""


class ConsensusPolicy(Model):
    """Items without gold: how many annotators, and how long to wait for them."""

    overlap: Annotated[int, Field(ge=2, le=100)] = 3
    method: Literal["weighted", "mean"] = Field(
        "weighted", description="annotator score: mean agreement with peers, or weighted by peer reliability"
    )
    timeout_s: Seconds = 3_600.0
    min_annotators: Annotated[int, Field(ge=MIN_ANNOTATORS)] = 2


class AlertPolicy(Model):
    """When quality alerts fire. Project and label metrics: over a time window, below their target
    (resolved above target + margin). Workers: qualification changes, and drift counted in items."""

    margin: Unit = 0.05
    min_items: Annotated[int, Field(ge=1)] = 20
    window_s: Annotated[int, Field(gt=0)] = 86_400
    drift_threshold: Annotated[float, Field(gt=0)] = Field(
        25.0, description="drift: squared z-score of the drop between before and after the change point"
    )
    drift_min_items: Annotated[int, Field(ge=2)] = Field(4, description="drift: evidence items after the change")
    drift_drop: Unit = Field(0.1, description="drift: smallest drop of level that counts")
    worker_scores: Any = Field(None, exclude=True, description="retired (worker alerts are drift now); ignored")


class LimitsSpec(Model):
    """Size limits for this project's messages (schemas.base.Limits)."""

    max_message_bytes: Annotated[int, Field(gt=0)] = 512 * 1024
    max_objects: Annotated[int, Field(gt=0)] = 5_000
    max_vertices: Annotated[int, Field(gt=0)] = 20_000
    max_keypoints: Annotated[int, Field(gt=0)] = 512


class ProjectCriteria(Message):
    """Everything that decides how a project's annotations are judged (topic `projects`)."""

    topic: ClassVar[str] = "projects"

    event_id: Id | None = Field(None, description="derived from the content when left out")  # type: ignore[assignment]
    project_id: Id
    labels: list[LabelSpec] = Field(default_factory=list, description="empty: open taxonomy")
    classifications: dict[Label, ClassificationSpec] = Field(default_factory=dict)
    keypoint_schemas: dict[Label, KeypointSchema] = Field(default_factory=lambda: {"coco_person": coco_person()})
    default_threshold: dict[Literal["box", "region", "keypoints", "point", "polyline"], Unit] = Field(
        default_factory=lambda: {"box": 0.5, "region": 0.5, "keypoints": 0.5, "point": 0.0, "polyline": 0.5},
        description="match threshold per shape family on its similarity; points match within "
        "point_tolerance whatever the threshold, which can only ask for more (1 - d/tolerance >= t)",
    )
    point_tolerance: Pixels = 5.0
    line_tolerance: Pixels = 5.0
    keypoint_visibility: Literal["coco", "visible_only"] = "coco"
    empty_item_correct: bool = True
    object_metric: Literal["pq", "f1"] = Field(
        "pq",
        description="the objects component of the item score: 'pq' (sum of similarities over matches / "
        "(matches + mismatches + half the missed and extra): localisation and detection in one figure) or "
        "'f1' (a match at the threshold counts whole, as CVAT's quality report counts it)",
    )
    weights: Weights = Field(default_factory=Weights)
    component_minimums: ComponentMinimums = Field(default_factory=ComponentMinimums)
    pass_threshold: Unit = 0.7
    targets: QualityTargets = Field(default_factory=QualityTargets)
    escalation: EscalationPolicy = Field(default_factory=EscalationPolicy)
    proficiency: ProficiencyPolicy = Field(default_factory=ProficiencyPolicy)
    consensus: ConsensusPolicy = Field(default_factory=ConsensusPolicy)
    alerts: AlertPolicy = Field(default_factory=AlertPolicy)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)

    def model_post_init(self, context: Any, /) -> None:
        # A criteria file written by hand need not invent an event id: derive one from the content.
        # (A mode="before" validator would do it, but it turns strict JSON input into Python input.)
        if self.event_id is None:
            body = orjson.dumps(self.model_dump(mode="json", exclude={"event_id"}), option=orjson.OPT_SORT_KEYS)
            object.__setattr__(self, "event_id", f"criteria:{self.project_id}:{hashlib.sha256(body).hexdigest()[:16]}")

    @model_validator(mode="after")
    def _consistent(self) -> ProjectCriteria:
        names = [spec.name for spec in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("a label is listed twice")
        for spec in self.labels:
            if spec.keypoint_schema and spec.keypoint_schema not in self.keypoint_schemas:
                raise ValueError(f"label {spec.name!r} names unknown keypoint schema {spec.keypoint_schema!r}")
        return self

    def label(self, name: str) -> LabelSpec | None:
        """The spec of a label, or None (unknown label, or an open taxonomy)."""
        return self._label_index.get(name)

    @functools.cached_property
    def has_attributes(self) -> bool:
        """Does any label declare attributes? (Scoring skips the attribute pass when none does
        and the reference objects carry none.)"""
        return any(spec.attributes for spec in self.labels)

    @functools.cached_property
    def component_rules(self) -> tuple[tuple[str, float, float | None], ...]:
        """(component, weight, minimum) of the item score's components, read once per project."""
        names = ("objects", "classifications", "attributes", "relationships")
        return tuple((n, getattr(self.weights, n), getattr(self.component_minimums, n)) for n in names)

    @functools.cached_property
    def _label_index(self) -> dict[str, LabelSpec]:
        return {spec.name: spec for spec in self.labels}

    def threshold(self, label: str, family: str) -> float:
        """Match threshold of a label's objects: the label's own, else the family default."""
        spec = self.label(label)
        if spec is not None and spec.threshold is not None:
            return spec.threshold
        return self.default_threshold.get(family, 0.5)  # type: ignore[call-overload]

    def point_tolerance_of(self, label: str) -> float:
        spec = self.label(label)
        return spec.point_tolerance if spec is not None and spec.point_tolerance is not None else self.point_tolerance

    def line_tolerance_of(self, label: str) -> float:
        spec = self.label(label)
        return spec.line_tolerance if spec is not None and spec.line_tolerance is not None else self.line_tolerance
