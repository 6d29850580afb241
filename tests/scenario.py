"""Small builders of pipeline events for tests: a project, gold items, good and bad annotations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from goldstream.streams.engine import Record

from goldstream import schemas as s

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def criteria(project: str = "p1", **kw: Any) -> s.ProjectCriteria:
    base: dict[str, Any] = {
        "labels": [s.LabelSpec(name="car"), s.LabelSpec(name="bus"), s.LabelSpec(name="road")],
        "pass_threshold": 0.7,
        "escalation": s.EscalationPolicy(audit_rate_max=0.0, audit_rate_min=0.0),
        "proficiency": s.ProficiencyPolicy(qualification=s.QualificationPolicy(min_gold_items=3)),
        "alerts": s.AlertPolicy(min_items=3, window_s=86_400, margin=0.05),
        # the events are dated T0; a wall-clock timeout must not close rounds behind a test's back
        "consensus": s.ConsensusPolicy(timeout_s=10 * 365 * 86_400.0),
    }
    base.update(kw)
    return s.ProjectCriteria(project_id=project, **base)


def boxes(*specs: tuple[str, float, float, float, float]) -> s.Content:
    return s.Content(
        objects=[
            s.AnnotatedObject(id=f"o{i}", label=label, shape=s.BBox(x=x, y=y, w=w, h=h))
            for i, (label, x, y, w, h) in enumerate(specs)
        ]
    )


GOLD_CONTENT = boxes(("car", 10, 10, 50, 40), ("bus", 200, 50, 120, 80))
GOOD = boxes(("car", 11, 10, 50, 40), ("bus", 201, 52, 118, 80))
BAD = boxes(("car", 40, 30, 50, 40))  # misplaced, and the bus missed


def gold(item: str, content: s.Content = GOLD_CONTENT, project: str = "p1", n: int = 0) -> s.GoldAnswer:
    return s.GoldAnswer(event_id=f"gold-{item}-{n}", project_id=project, item_id=item, content=content, created_at=T0)


def annotation(
    n: int, item: str, worker: str, content: s.Content, project: str = "p1", minutes: float | None = None, **kw: Any
) -> s.AnnotationSubmitted:
    at = T0 + timedelta(minutes=n if minutes is None else minutes)
    return s.AnnotationSubmitted(
        event_id=f"ann-{n}",
        project_id=project,
        item_id=item,
        worker_id=worker,
        content=content,
        submitted_at=at,
        started_at=at - timedelta(seconds=30),
        **kw,
    )


def review(
    n: int, a: s.AnnotationSubmitted, verdict: s.Verdict, corrected: s.Content | None = None, promote: bool = False
) -> s.ReviewResult:
    return s.ReviewResult(
        event_id=f"rev-{n}",
        project_id=a.project_id,
        item_id=a.item_id,
        annotation_event_id=a.event_id,
        worker_id=a.worker_id,
        reviewer_id="expert-1",
        reviewer_role="expert",
        verdict=verdict,
        corrected=corrected,
        promote_to_gold=promote,
        reviewed_at=a.submitted_at + timedelta(hours=1),
    )


TOPIC_OF = {
    s.AnnotationSubmitted: "annotations",
    s.GoldAnswer: "gold",
    s.ReviewResult: "reviews",
    s.ProjectCriteria: "projects",
}


def key_of(m: s.Message) -> str:
    if isinstance(m, s.ProjectCriteria):
        return m.project_id
    return m.item_id  # type: ignore[attr-defined]


def record(m: s.Message, offset: int = 0) -> Record:
    return Record(TOPIC_OF[type(m)], m.to_bytes(), key_of(m).encode(), 0, offset)


def records(*messages: s.Message) -> list[Record]:
    return [record(m, i) for i, m in enumerate(messages)]
