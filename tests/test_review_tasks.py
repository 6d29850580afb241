"""Escalations become Label Studio review tasks; the reviewer's verdict comes back as a review (#12)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from goldstream import schemas as s
from goldstream.label_studio import (
    REVIEW_FIELD,
    BadDelivery,
    Controls,
    content_of,
    label_studio_messages,
    results_of,
    review_config,
)
from goldstream.review_tasks import merged, review_task

W, H = 1000, 800
PARSED = {  # Label Studio's parsed_label_config of a review project made from a boxes + polygons + keypoints config
    "label": {"type": "RectangleLabels", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}]},
    "poly": {"type": "PolygonLabels", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}]},
    "kp": {"type": "KeyPointLabels", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}]},
    "occluded": {"type": "Choices", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}]},
    "scene": {"type": "Choices", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}]},
    "goldstream_verdict": {"type": "Choices", "to_name": ["goldstream_summary"], "inputs": []},
}
CONTROLS = Controls.of(PARSED)


def _content() -> s.Content:
    names = s.coco_person().names
    points = [(0.0, 0.0, 0)] * len(names)
    points[names.index("nose")] = (500.0, 400.0, 2)
    points[names.index("left_ankle")] = (480.0, 700.0, 2)
    return s.Content(
        objects=[
            s.AnnotatedObject(id="b1", label="car", shape=s.BBox(x=100, y=120, w=200, h=80),
                              attributes={"occluded": "yes"}),
            s.AnnotatedObject(id="b2", label="bus", shape=s.RotatedBBox(cx=600, cy=300, w=240, h=100, angle=-30)),
            s.AnnotatedObject(id="p1", label="road", shape=s.Polygon(points=[(0, 600), (1000, 600), (1000, 800)])),
            s.AnnotatedObject(id="k1", label="person", shape=s.Keypoints(points=points, schema_name="coco_person")),
        ],
        classifications={"scene": ["street"]},
        relationships=[s.Relationship(subject="b1", predicate="next_to", object="b2")],
        image=s.ImageSize(width=W, height=H),
    )  # fmt: skip


def _numbers(x: object) -> list[float]:
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list | tuple):
        return [n for v in x for n in _numbers(v)]
    return [float(x)] if isinstance(x, int | float) and not isinstance(x, bool) else []


def _same_shape(a: s.Shape, b: s.Shape) -> None:
    assert (type(a), a.model_dump(exclude_none=True).keys()) == (type(b), b.model_dump(exclude_none=True).keys())
    assert _numbers(b.model_dump()) == pytest.approx(_numbers(a.model_dump()), abs=1e-9)


def test_a_content_shown_in_label_studio_reads_back_as_the_same_content() -> None:
    """`results_of` is the inverse of `content_of`: the reviewer starts from exactly the boxes,
    polygons, keypoints, attributes, classifications and relations the worker submitted."""
    content = _content()
    criteria = s.ProjectCriteria(project_id="p", labels=[s.LabelSpec(name="person", keypoint_schema="coco_person")])
    results, skipped = results_of(content, CONTROLS, criteria)
    assert skipped == []
    back = content_of(results, criteria)
    ours, theirs = {o.id: o for o in content.objects}, {o.id: o for o in back.objects}
    assert ours.keys() == theirs.keys() == {"b1", "b2", "p1", "k1"}
    for key, obj in theirs.items():
        assert (obj.label, obj.attributes) == (ours[key].label, ours[key].attributes)
        _same_shape(ours[key].shape, obj.shape)
    assert back.classifications == content.classifications and back.image == content.image
    assert back.relationships == content.relationships


def test_the_rotated_box_keeps_its_corners_on_the_way_to_label_studio() -> None:
    shape = s.RotatedBBox(cx=600, cy=300, w=240, h=100, angle=-30)
    (region,) = [r for r in results_of(s.Content(objects=[s.AnnotatedObject(id="b", label="bus", shape=shape)],
                                                 image=s.ImageSize(width=W, height=H)), CONTROLS)[0]]  # fmt: skip
    v = region["value"]
    x0, y0, t = v["x"] / 100 * W, v["y"] / 100 * H, math.radians(v["rotation"])
    # Label Studio turns the box about its top-left corner: the far corner is where goldstream's is
    far = (x0 + 240 * math.cos(t) - 100 * math.sin(t), y0 + 240 * math.sin(t) + 100 * math.cos(t))
    a = math.radians(-30)
    ours = (600 + 120 * math.cos(a) - 50 * math.sin(a), 300 + 120 * math.sin(a) + 50 * math.cos(a))
    assert far == pytest.approx(ours) and v["rotation"] == pytest.approx(330)


def test_what_label_studio_cannot_show_is_listed_not_dropped() -> None:
    content = s.Content(
        objects=[s.AnnotatedObject(id="l1", label="lane", shape=s.Polyline(points=[(0, 0), (10, 10)]))],
        image=s.ImageSize(width=W, height=H),
    )
    assert results_of(content, CONTROLS) == ([], ["l1 (polyline lane)"])


def _escalation(reasons: list[s.EscalationReason], priority: int = 60) -> s.Escalation:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    a = s.AnnotationSubmitted(event_id="a" * 32, project_id="cars", item_id="ls-17", worker_id="ls-user-5",
                              content=_content(), submitted_at=at, source="label_studio", external_id="41")  # fmt: skip
    snap = s.WorkerSnapshot(state=s.QualificationState.QUALIFYING)
    return s.Escalation(event_id=s.derive_id("e", *reasons), project_id="cars", item_id="ls-17", worker_id="ls-user-5",
                        reasons=reasons, priority=priority, score=0.31, threshold=0.75, worker=snap, annotation=a,
                        created_at=at)  # fmt: skip


def test_an_escalation_becomes_a_task_with_the_items_data_the_annotation_as_prediction_and_why() -> None:
    e = _escalation([s.EscalationReason.GOLD_BELOW_THRESHOLD])
    task = review_task(e, {"image": "https://img/17.jpg"}, CONTROLS, s.ProjectCriteria(project_id="cars"))
    data = task["data"]
    assert data["image"] == "https://img/17.jpg" and data[REVIEW_FIELD] == e.annotation.event_id
    assert (data["goldstream_project"], data["goldstream_item"], data["goldstream_worker"]) == (
        "cars", "ls-17", "ls-user-5")  # fmt: skip
    assert data["goldstream_priority"] == 60 and data["goldstream_reasons"] == "gold_below_threshold"
    assert "score 0.31 (pass 0.75)" in data["goldstream_summary"]
    (prediction,) = task["predictions"]
    assert prediction["score"] == 0.31
    assert content_of(prediction["result"]).objects[0].shape == s.BBox(x=100, y=120, w=200, h=80)


def test_a_later_reason_for_the_same_annotation_joins_its_task_and_a_repeat_changes_nothing() -> None:
    first = review_task(_escalation([s.EscalationReason.TOO_FAST], 45), {"image": "x"}, CONTROLS)["data"]
    both = merged(first, _escalation([s.EscalationReason.GOLD_BELOW_THRESHOLD], 60))
    assert both is not None
    assert both["goldstream_reasons"] == "too_fast, gold_below_threshold" and both["goldstream_priority"] == 60
    assert merged(both, _escalation([s.EscalationReason.TOO_FAST], 45)) is None  # a redelivery: nothing new


def test_the_review_config_adds_a_verdict_promotion_and_comment_to_the_source_config() -> None:
    source = '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">' \
             '<Label value="car"/></RectangleLabels></View>'  # fmt: skip
    root = ET.fromstring(review_config(source))
    verdict = root.find(".//Choices[@name='goldstream_verdict']")
    assert verdict is not None and [c.get("value") for c in verdict] == ["approve", "correct", "reject"]
    assert root.find(".//RectangleLabels[@name='label']") is not None  # the reviewer draws as annotators do
    assert root.find(".//Text[@name='goldstream_summary']").get("value") == "$goldstream_summary"  # type: ignore[union-attr]


def _submission(verdict: list[str], promote: bool = False, **data: object) -> dict:
    result = [
        {"id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
         "original_width": W, "original_height": H,
         "value": {"x": 10, "y": 15, "width": 20, "height": 10, "rotation": 0, "rectanglelabels": ["car"]}},
        {"id": "v", "type": "choices", "from_name": "goldstream_verdict", "to_name": "goldstream_summary",
         "value": {"choices": verdict}},
        {"id": "t", "type": "textarea", "from_name": "goldstream_comment", "to_name": "goldstream_summary",
         "value": {"text": ["box too small"]}},
    ]  # fmt: skip
    if promote:
        result.append({"id": "g", "type": "choices", "from_name": "goldstream_gold", "to_name": "goldstream_summary",
                       "value": {"choices": ["promote to gold"]}})  # fmt: skip
    fields = {REVIEW_FIELD: "a" * 32, "goldstream_project": "cars", "goldstream_item": "ls-17",
              "goldstream_worker": "ls-user-5", "image": "x", **data}  # fmt: skip
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 90, "task": 200, "project": 8, "completed_by": 2, "result": result,
                       "created_at": "2026-12-01T09:00:00Z", "updated_at": "2026-12-01T09:01:00Z"},
        "task": {"id": 200, "data": fields},
    }  # fmt: skip


def test_a_reviewers_correction_on_a_review_task_becomes_a_review_of_the_original_annotation() -> None:
    ((topic, key, review),), _ = label_studio_messages(_submission(["correct"], promote=True), lambda p: f"ls-{p}")
    assert topic == "reviews" and key == "ls-17" and isinstance(review, s.ReviewResult)
    assert (review.project_id, review.item_id, review.worker_id) == ("cars", "ls-17", "ls-user-5")
    assert review.annotation_event_id == "a" * 32 and review.reviewer_id == "ls-user-2"
    assert review.verdict is s.Verdict.CORRECT and review.promote_to_gold and review.comment == "box too small"
    assert review.corrected is not None and review.corrected.classifications == {}  # the review controls stay out
    assert review.corrected.objects[0].shape == s.BBox(x=100, y=120, w=200, h=80)
    again, _ = label_studio_messages(_submission(["correct"], promote=True), lambda p: f"ls-{p}")
    assert again[0][2].event_id == review.event_id  # a redelivery: the same review


def test_an_approval_carries_no_correction_and_a_rejection_is_never_promoted() -> None:
    ((_, _, approve),), _ = label_studio_messages(_submission(["approve"], promote=True), str)
    assert approve.verdict is s.Verdict.APPROVE and approve.corrected is None and approve.promote_to_gold  # type: ignore[attr-defined]
    ((_, _, reject),), _ = label_studio_messages(_submission(["reject"], promote=True), str)
    assert reject.verdict is s.Verdict.REJECT and not reject.promote_to_gold  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("submission", "says"),
    [
        (_submission([]), "needs one goldstream_verdict"),
        (_submission(["maybe"]), "needs one goldstream_verdict"),
        (_submission(["approve"], goldstream_worker=None), "needs goldstream_project, goldstream_item"),
    ],
)
def test_a_review_without_a_verdict_or_its_fields_is_refused_with_the_reason(submission: dict, says: str) -> None:
    with pytest.raises(BadDelivery, match=says):
        label_studio_messages(submission, str)
