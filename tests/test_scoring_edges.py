"""Every edge case of metrics spec §7, each its own test, plus the rules of §2-§4 and §6."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import shapely
from goldstream.scoring import Counters, geometry, score_item
from goldstream.scoring.errors import InvalidGeometry

from goldstream import schemas as s
from goldstream import scoring


def obj(i: str, label: str, shape: Any, **kw: Any) -> s.AnnotatedObject:
    return s.AnnotatedObject(id=i, label=label, shape=shape, **kw)


def box(i: str, label: str, x: float, y: float, w: float, h: float, **kw: Any) -> s.AnnotatedObject:
    return obj(i, label, s.BBox(x=x, y=y, w=w, h=h), **kw)


def content(*objects: s.AnnotatedObject, **kw: Any) -> s.Content:
    return s.Content(objects=list(objects), **kw)


def outcomes(r: s.ItemScore) -> list[tuple[str, str | None, str | None]]:
    return [(m.outcome.value, m.annotation_object_id, m.reference_object_id) for m in r.matches]


# ------------------------------------------------------------------- §7: empty sides


def test_both_sides_empty_is_a_correct_answer() -> None:
    r = score_item(content(), content())
    assert (r.metrics.precision, r.metrics.recall, r.metrics.f1, r.metrics.accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert r.score == 1.0 and r.passed is True


def test_both_sides_empty_with_the_empty_item_rule_off_has_nothing_to_score() -> None:
    r = score_item(content(), content(), s.ProjectCriteria(project_id="p", empty_item_correct=False))
    assert r.metrics.precision is None and r.metrics.accuracy is None
    assert r.score is None and r.passed is None


def test_empty_gold_with_objects_annotated() -> None:
    r = score_item(content(box("a", "car", 0, 0, 10, 10)), content())
    assert r.objects.extra == 1
    assert r.metrics.precision == 0.0 and r.metrics.recall is None  # undefined, not 0
    assert r.metrics.f1 == 0.0 and r.metrics.accuracy == 0.0
    assert r.score == 0.0 and r.passed is False
    assert r.labels["car"] == s.LabelCounts(tp=0, fp=1, fn=0)


# ------------------------------------------------------------------- §7: boxes


def test_duplicate_boxes_give_one_tp_and_one_fp() -> None:
    gold = content(box("A", "car", 0, 0, 10, 10))
    r = score_item(content(box("a", "car", 0, 0, 10, 10), box("b", "car", 0, 0, 10, 10)), gold)
    assert r.labels["car"].tp == 1 and r.labels["car"].fp == 1 and r.labels["car"].fn == 0
    assert r.metrics.precision == 0.5 and r.metrics.recall == 1.0
    # PQ: 1 / (1 + 0.5 * 1)
    assert r.components.objects == pytest.approx(1 / 1.5)


def test_iou_exactly_at_the_threshold_matches() -> None:
    gold = content(box("A", "car", 0, 0, 10, 10))
    ann = content(box("a", "car", 0, 0, 10, 5))  # IoU = 50 / 100 = 0.5 exactly
    assert scoring.box_iou([[0, 0, 10, 5]], [[0, 0, 10, 10]])[0, 0] == 0.5
    r = score_item(ann, gold)
    assert outcomes(r) == [("match", "a", "A")]
    just_below = score_item(content(box("a", "car", 0, 0, 10, 4.999)), gold)
    assert [m.outcome.value for m in just_below.matches] == ["missed", "extra"]


def test_touching_boxes_score_zero_not_nan() -> None:
    iou = scoring.box_iou([[0, 0, 10, 10]], [[10, 0, 10, 10]])
    assert iou[0, 0] == 0.0
    r = score_item(content(box("a", "car", 10, 0, 10, 10)), content(box("A", "car", 0, 0, 10, 10)))
    assert r.score == 0.0 and not math.isnan(r.score)


def test_zero_area_boxes_score_zero_not_nan() -> None:
    iou = scoring.box_iou([[5, 5, 0, 0], [0, 0, 10, 0]], [[5, 5, 0, 0], [0, 0, 10, 10]])
    assert np.array_equal(iou, np.zeros((2, 2)))
    r = score_item(content(box("a", "car", 5, 5, 0, 0)), content(box("A", "car", 5, 5, 0, 0)))
    assert r.score == 0.0 and r.objects.missed == 1 and r.objects.extra == 1


def test_label_mismatch_at_high_iou_prefers_the_same_label_pair() -> None:
    gold = content(box("A", "car", 0, 0, 10, 10))
    ann = content(box("t", "truck", 0, 0, 10, 10), box("c", "car", 2, 0, 10, 10))  # IoU 1.0 vs 0.667
    r = score_item(ann, gold)
    assert ("match", "c", "A") in outcomes(r)
    assert ("extra", "t", None) in outcomes(r)
    assert r.objects.mismatches == 0


def test_a_lone_label_mismatch_counts_fp_for_the_annotated_label_and_fn_for_gold() -> None:
    r = score_item(content(box("t", "truck", 0, 0, 10, 10)), content(box("A", "car", 0, 0, 10, 10)))
    assert outcomes(r) == [("mismatch", "t", "A")]
    assert r.labels["truck"] == s.LabelCounts(tp=0, fp=1, fn=0)
    assert r.labels["car"] == s.LabelCounts(tp=0, fp=0, fn=1)
    assert r.metrics.accuracy == 0.0  # M / (M + X + Ug + Ud) = 0 / 1
    assert r.components.objects == 0.0  # sums similarity over matches only


def _greedy_matches(sim: np.ndarray, t: float) -> int:
    """COCO's greedy order: each annotation in turn takes its best free reference."""
    taken, n = set(), 0
    for row in sim:
        for j in np.argsort(-row, kind="stable"):
            if j not in taken and row[j] >= t:
                taken.add(j)
                n += 1
                break
    return n


def test_hungarian_beats_greedy_on_overlapping_boxes() -> None:
    gold = [[0, 0, 10, 10], [4, 0, 10, 10]]
    ann = [[1.5, 0, 10, 10], [-1, 0, 10, 10]]
    assert _greedy_matches(scoring.box_iou(ann, gold), 0.5) == 1
    r = score_item(
        content(*(box(f"a{i}", "car", *b) for i, b in enumerate(ann))),
        content(*(box(f"G{i}", "car", *b) for i, b in enumerate(gold))),
    )
    assert r.objects.matches == 2
    assert sorted(outcomes(r)) == [("match", "a0", "G1"), ("match", "a1", "G0")]


def test_rotated_boxes_with_equal_angles_and_different_centres() -> None:
    a, b = [20, 20, 10, 4, 45.0], [24, 20, 10, 4, 45.0]
    exact = scoring.rotated_box_iou([a], [b])[0, 0]
    shortcut = scoring.box_iou([[15, 18, 10, 4]], [[19, 18, 10, 4]])[0, 0]  # "same angle => axis-aligned"
    assert shortcut == pytest.approx(6 / 14)
    # in the boxes' own frame the shift (4, 0) is (2.83, -2.83): overlap (10 - 2.83) x (4 - 2.83)
    along, across = 10 - 4 * math.sqrt(0.5), 4 - 4 * math.sqrt(0.5)
    assert exact == pytest.approx(along * across / (80 - along * across))
    assert abs(exact - shortcut) > 0.3
    same_centre = scoring.rotated_box_iou([[20, 20, 10, 4, 30]], [[20, 20, 10, 4, 30]])[0, 0]
    assert same_centre == pytest.approx(1.0)


def test_an_axis_aligned_box_and_a_rotated_box_compare_in_one_family() -> None:
    gold = content(box("A", "sign", 0, 0, 10, 10))
    ann = content(obj("r", "sign", s.RotatedBBox(cx=5, cy=5, w=10, h=10, angle=90)))
    r = score_item(ann, gold)
    assert outcomes(r) == [("match", "r", "A")] and r.score == pytest.approx(1.0)


# ------------------------------------------------------------------- §7: polygons


def test_bowtie_polygon_is_repaired_with_even_odd_rule() -> None:
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10]]
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert scoring.region(bowtie).area == pytest.approx(50.0)  # two triangles, not 0 and not 100
    assert scoring.polygon_iou(bowtie, square) == pytest.approx(0.5)


def test_a_polygon_of_two_distinct_vertices_is_invalid_input() -> None:
    with pytest.raises(scoring.InvalidGeometry, match="2 distinct vertices"):
        scoring.polygon_iou([[0, 0], [5, 5], [0, 0]], [[0, 0], [1, 0], [1, 1]])
    degenerate = content(obj("p", "road", s.Polygon(points=[(0, 0), (5, 5), (5, 5)])))
    with pytest.raises(scoring.InvalidGeometry) as info:
        score_item(degenerate, content())
    assert info.value.reason == "invalid_geometry"


def test_a_polygon_outside_the_image_is_clipped_to_nothing() -> None:
    image = s.ImageSize(width=100, height=100)
    outside = s.Polygon(points=[(150, 150), (190, 150), (190, 190)])  # outside, within the schema's window
    assert scoring.region(outside.points, image=(100, 100)).area == 0.0
    r = score_item(content(obj("p", "road", outside), image=image), content(obj("G", "road", outside), image=image))
    assert r.objects.matches == 0 and r.score == 0.0  # an empty region matches nothing, never NaN
    half_in = s.Polygon(points=[(50, 0), (150, 0), (150, 100), (50, 100)])
    inside = s.Polygon(points=[(50, 0), (100, 0), (100, 100), (50, 100)])
    clipped = score_item(
        content(obj("p", "road", half_in), image=image), content(obj("G", "road", inside), image=image)
    )
    assert clipped.matches[0].similarity == pytest.approx(1.0)


def test_polygons_and_masks_compare_as_regions() -> None:
    dense = np.zeros((20, 20), dtype=bool)
    dense[0:10, 0:10] = True  # rows 0-9, columns 0-9: the square (0,0)-(10,10)
    r = scoring.rle.from_dense(dense)
    mask = s.Mask(size=(20, 20), counts=scoring.rle.encode_counts(r.counts))
    square = s.Polygon(points=[(0, 0), (10, 0), (10, 10), (0, 10)])
    res = score_item(content(obj("p", "blob", square)), content(obj("M", "blob", mask)))
    assert outcomes(res) == [("match", "p", "M")] and res.matches[0].similarity == pytest.approx(1.0)


def test_crowd_gold_neither_misses_nor_penalises_objects_inside_it() -> None:
    gold = content(box("A", "person", 0, 0, 10, 10), box("C", "person", 50, 50, 40, 40, iscrowd=True))
    ann = content(box("a", "person", 0, 0, 10, 10), box("b", "person", 55, 55, 10, 10))
    r = score_item(ann, gold)
    assert r.objects.matches == 1 and r.objects.missed == 0 and r.objects.extra == 0
    assert r.ignored == 1
    assert scoring.box_iou([[55, 55, 10, 10]], [[50, 50, 40, 40]], [True])[0, 0] == 1.0  # I / area(annotation)


# ------------------------------------------------------------------- §7: keypoints

SIGMAS = s.coco_person().sigmas


def kp(i: str, pts: list[tuple[float, float, int]], **kw: Any) -> s.AnnotatedObject:
    return obj(i, "person", s.Keypoints(points=pts, **kw))


def person(dx: float = 0.0, v: int = 2) -> list[tuple[float, float, int]]:
    return [(10.0 * k + dx, 5.0 * k, v) for k in range(17)]


def test_keypoint_gold_with_no_visible_point_is_not_scored() -> None:
    gold = content(kp("G", person(v=0), area=1000.0))
    assert math.isnan(scoring.oks(np.array(person())[:, :2], np.array(person(v=0)), SIGMAS, 1000.0))
    r = score_item(content(), gold)
    assert r.objects.missed == 0 and r.score == 1.0  # nothing scorable in gold: an empty item


def test_occluded_keypoints_count_like_visible_unless_the_project_says_visible_only() -> None:
    gold_pts = person()
    gold_pts[:8] = [(x, y, 1) for x, y, _ in gold_pts[:8]]  # eight occluded
    ann_pts = [(x + (3.0 if k < 8 else 0.0), y, 2) for k, (x, y, _) in enumerate(gold_pts)]
    gold, ann = content(kp("G", gold_pts, area=2000.0)), content(kp("a", ann_pts))
    coco = score_item(ann, gold)
    visible_only = score_item(ann, gold, s.ProjectCriteria(project_id="p", keypoint_visibility="visible_only"))
    assert visible_only.matches[0].similarity == pytest.approx(1.0)  # only the exact 9 count
    assert coco.matches[0].similarity < 1.0
    assert coco.keypoints.gold_labeled == 17 and visible_only.keypoints.gold_labeled == 9


def test_keypoint_gold_area_zero_scores_zero_not_nan() -> None:
    gold, shifted = np.array(person()), np.array(person(dx=1.0))
    assert scoring.oks(gold, gold, SIGMAS, 0.0) == 1.0  # exact agreement survives a zero scale
    value = scoring.oks(shifted, gold, SIGMAS, 0.0)
    assert value == 0.0 and not math.isnan(value)


def test_a_keypoint_visible_on_one_side_only() -> None:
    gold_pts, ann_pts = person(), person()
    gold_pts[0] = (0.0, 0.0, 0)  # gold did not label the nose
    ann_pts[5] = (0.0, 0.0, 0)  # the annotation left out a shoulder
    r = score_item(content(kp("a", ann_pts)), content(kp("G", gold_pts, area=5000.0)))
    k = r.keypoints
    assert k is not None and (k.missing, k.extra, k.gold_labeled, k.both) == (1, 1, 16, 15)
    assert k.rmse == 0.0 and k.pck == pytest.approx(15 / 16)
    assert r.matches[0].similarity == pytest.approx(15 / 16)  # the omitted keypoint contributes 0


def test_keypoint_count_not_matching_the_schema_is_invalid_input() -> None:
    with pytest.raises(scoring.KeypointMismatch) as info:
        score_item(content(kp("a", person()[:15])), content(kp("G", person(), area=100.0)))
    assert info.value.reason == "keypoint_count"


def test_keypoint_rmse_and_pck() -> None:
    ann = [(x + 3.0, y + 4.0, 2) for x, y, _ in person()]  # every keypoint 5 px off
    r = score_item(
        content(kp("a", ann)),
        content(kp("G", person(), area=10_000.0)),
        s.ProjectCriteria(project_id="p", point_tolerance=5.0),
    )
    assert r.keypoints.rmse == pytest.approx(5.0) and r.keypoints.pck == 1.0
    tight = score_item(
        content(kp("a", ann)),
        content(kp("G", person(), area=10_000.0)),
        s.ProjectCriteria(project_id="p", point_tolerance=4.9),
    )
    assert tight.keypoints.pck == 0.0


# ------------------------------------------------------------------- §7: points and lines


def test_points_match_within_the_pixel_tolerance_only() -> None:
    sim = scoring.point_similarity([[0, 0], [3, 4], [6, 8]], [[0, 0]], 5.0)
    assert sim[0, 0] == 1.0 and sim[1, 0] == 0.0 and math.isnan(sim[2, 0])  # d = 0, 5 (inclusive), 10
    r = score_item(content(obj("a", "eye", s.Point(x=3, y=4))), content(obj("G", "eye", s.Point(x=0, y=0))))
    assert r.objects.matches == 1 and r.score == 0.0  # matched at the edge of tolerance: similarity 0


def test_a_reversed_polyline_matches_unless_orientation_matters() -> None:
    line = [(0.0, 0.0), (50.0, 0.0), (50.0, 30.0)]
    reversed_line = list(reversed(line))
    assert scoring.polyline_similarity(line, reversed_line, 5.0) == pytest.approx(1.0)
    assert scoring.polyline_similarity(line, reversed_line, 5.0, oriented=True) < 0.1
    oriented = s.ProjectCriteria(project_id="p", labels=[s.LabelSpec(name="lane", orientation_matters=True)])
    ann = content(obj("a", "lane", s.Polyline(points=reversed_line)))
    gold = content(obj("G", "lane", s.Polyline(points=line)))
    assert score_item(ann, gold).objects.matches == 1
    assert score_item(ann, gold, oriented).objects.matches == 0


def test_polyline_similarity_resamples_at_both_lines_breakpoints() -> None:
    a = [(0.0, 0.0), (100.0, 0.0)]
    b = [(0.0, 0.0), (50.0, 0.0), (100.0, 0.0)]  # the same line, another vertex
    assert scoring.polyline_similarity(a, b, 2.0) == pytest.approx(1.0)
    shifted = [(0.0, 3.0), (100.0, 3.0)]
    assert scoring.polyline_similarity(a, shifted, 3.0) == pytest.approx(math.exp(-0.5))


# ------------------------------------------------------------------- §7: NaN and infinity


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_infinite_coordinates_are_invalid_input_not_a_score(bad: float) -> None:
    with pytest.raises(scoring.InvalidGeometry):
        scoring.box_iou([[0, 0, bad, 1]], [[0, 0, 1, 1]])
    with pytest.raises(scoring.InvalidGeometry):
        scoring.polygon_iou([[0, 0], [bad, 0], [1, 1]], [[0, 0], [1, 0], [1, 1]])
    with pytest.raises(scoring.InvalidGeometry):
        scoring.oks([[bad, 0]] * 17, np.array(person()), SIGMAS, 10.0)
    with pytest.raises(scoring.InvalidGeometry):
        scoring.point_similarity([[bad, 0]], [[0, 0]], 5.0)
    with pytest.raises(s.SchemaError):  # and the message never gets that far
        s.decode(s.BBox, f'{{"x": {"NaN" if math.isnan(bad) else "1e999"}, "y": 0, "w": 1, "h": 1}}')


# ------------------------------------------------------------------- §3-§4: classes, attributes, relationships


def _criteria(**kw: Any) -> s.ProjectCriteria:
    return s.ProjectCriteria(project_id="p", **kw)


def test_unknown_labels_raise_a_typed_error_in_a_closed_taxonomy() -> None:
    c = _criteria(labels=[s.LabelSpec(name="car")])
    with pytest.raises(scoring.UnknownLabel) as info:
        score_item(content(box("a", "tank", 0, 0, 1, 1)), content(), c)
    assert info.value.reason == "unknown_label" and "annotation.objects.0.label" in str(info.value)


def test_classifications_single_and_multi_label() -> None:
    c = _criteria(
        classifications={
            "weather": s.ClassificationSpec(labels=["sun", "rain"]),
            "tags": s.ClassificationSpec(labels=["blur", "night", "dark"], multi=True),
        }
    )
    gold = s.Content(classifications={"weather": ["sun"], "tags": ["blur", "night"]})
    ann = s.Content(classifications={"weather": ["sun"], "tags": ["night", "dark"]})
    r = score_item(ann, gold, c)
    assert (r.classifications_compared, r.classifications_correct) == (2, 1)
    assert r.classification_labels["tags/night"] == s.LabelCounts(tp=1)
    assert r.classification_labels["tags/dark"] == s.LabelCounts(fp=1)
    assert r.classification_labels["tags/blur"] == s.LabelCounts(fn=1)
    assert r.components.classifications == 0.5 and r.components.objects is None  # no object task here
    assert r.score == 0.5


def test_attributes_compared_on_matched_pairs_exact_numeric_and_text() -> None:
    c = _criteria(
        labels=[
            s.LabelSpec(
                name="car",
                attributes={
                    "color": s.AttributeSpec(),
                    "speed": s.AttributeSpec(compare="numeric", tolerance=2.0),
                    "plate": s.AttributeSpec(compare="text", tolerance=0.2),
                },
            )
        ]
    )
    gold = content(
        box("A", "car", 0, 0, 10, 10, attributes={"color": "red", "speed": 50, "plate": "AB1234"}),
        box("B", "car", 50, 50, 10, 10, attributes={"color": "blue"}),
    )
    ann = content(
        box("a", "car", 0, 0, 10, 10, attributes={"color": "red", "speed": 51.5, "plate": "AB1235"}),
        box("x", "car", 200, 200, 10, 10, attributes={"color": "blue"}),
    )  # unmatched: not compared
    r = score_item(ann, gold, c)
    assert (r.attributes_compared, r.attributes_correct) == (3, 3)
    worse = content(box("a", "car", 0, 0, 10, 10, attributes={"color": "Red", "speed": 53, "plate": "XY9999"}))
    r2 = score_item(worse, gold, c)
    assert (r2.attributes_compared, r2.attributes_correct) == (3, 0)
    missing = content(box("a", "car", 0, 0, 10, 10, attributes={"color": "red"}))
    assert score_item(missing, gold, c).attributes_correct == 1  # speed and plate missing: wrong


def test_relationships_need_both_ends_matched_and_the_predicate() -> None:
    gold = content(
        box("P", "person", 0, 0, 10, 20),
        box("H", "horse", 0, 10, 30, 20),
        relationships=[s.Relationship(subject="P", predicate="rides", object="H")],
    )
    good = content(
        box("p", "person", 0, 0, 10, 20),
        box("h", "horse", 0, 10, 30, 20),
        relationships=[s.Relationship(subject="p", predicate="rides", object="h")],
    )
    wrong_pred = content(
        box("p", "person", 0, 0, 10, 20),
        box("h", "horse", 0, 10, 30, 20),
        relationships=[s.Relationship(subject="p", predicate="feeds", object="h")],
    )
    r = score_item(good, gold)
    assert (r.relationships_tp, r.relationships_fp, r.relationships_fn) == (1, 0, 0)
    assert r.components.relationships == 1.0
    r = score_item(wrong_pred, gold)
    assert (r.relationships_tp, r.relationships_fp, r.relationships_fn) == (0, 1, 1)
    assert r.components.relationships == 0.0 and r.score == pytest.approx(0.5)


def test_item_score_weights_and_component_minimums() -> None:
    gold = s.Content(objects=[box("A", "car", 0, 0, 10, 10)], classifications={"w": ["sun"]})
    ann = s.Content(objects=[box("a", "car", 0, 0, 10, 10)], classifications={"w": ["rain"]})
    assert score_item(ann, gold).score == 0.5
    weighted = _criteria(weights=s.Weights(objects=3.0, classifications=1.0))
    r = score_item(ann, gold, weighted)
    assert r.score == 0.75 and r.passed is True
    strict = _criteria(weights=s.Weights(objects=3.0), component_minimums=s.ComponentMinimums(classifications=0.5))
    r = score_item(ann, gold, strict)
    assert r.score == 0.75 and r.passed is False


def test_per_label_thresholds_from_the_criteria() -> None:
    gold, ann = content(box("A", "car", 0, 0, 10, 10)), content(box("a", "car", 0, 0, 10, 6))  # IoU 0.6
    assert score_item(ann, gold).objects.matches == 1
    strict = _criteria(labels=[s.LabelSpec(name="car", threshold=0.7)])
    assert score_item(ann, gold, strict).objects.matches == 0


def test_review_corrections_are_a_reference() -> None:
    from datetime import UTC, datetime

    review = s.ReviewResult(
        event_id="r",
        project_id="p",
        item_id="i",
        annotation_event_id="e",
        worker_id="w",
        reviewer_id="x",
        verdict=s.Verdict.CORRECT,
        reviewed_at=datetime(2026, 1, 1, tzinfo=UTC),
        corrected=content(box("A", "car", 0, 0, 10, 10)),
    )
    assert score_item(content(box("a", "car", 0, 0, 10, 10)), review).score == 1.0
    approve = review.model_copy(update={"verdict": s.Verdict.APPROVE, "corrected": None})
    with pytest.raises(scoring.ScoringError):
        score_item(content(), approve)


# ------------------------------------------------------------------- §6 agreement, §5 counters


def test_agreement_of_three_annotators() -> None:
    a = content(box("a", "car", 0, 0, 10, 10))
    b = content(box("b", "car", 0, 0, 10, 10))
    c = content(box("c", "car", 0, 0, 10, 8))  # IoU 0.8 with the others
    assert scoring.agreement(a, b) == 1.0
    assert scoring.item_agreement([a, b, c]) == pytest.approx((1.0 + 0.8 + 0.8) / 3)
    assert scoring.consensus_scores([a, b, c], method="mean") == pytest.approx([0.9, 0.9, 0.8])
    # weighted: a's peers weigh by reliability, b (1.0 + 0.8) / 2 = 0.9 and c 0.8
    expected_ab = (1.0 * 0.9 + 0.8 * 0.8) / 1.7
    assert scoring.consensus_scores([a, b, c]) == pytest.approx([expected_ab, expected_ab, 0.8])


def test_weighted_consensus_singles_out_the_outlier() -> None:
    a = content(box("a", "car", 0, 0, 10, 10))
    b = content(box("b", "car", 0, 0, 10, 10))
    c = content(box("c", "car", 50, 50, 10, 10))  # agrees with nobody
    assert scoring.consensus_scores([a, b, c], method="mean") == pytest.approx([0.5, 0.5, 0.0])
    assert scoring.consensus_scores([a, b, c]) == pytest.approx([1.0, 1.0, 0.0])


def test_counters_merge_to_the_figures_of_the_whole_batch() -> None:
    gold = content(box("A", "car", 0, 0, 10, 10), box("B", "bus", 50, 0, 20, 10))
    items = [
        score_item(content(box("a", "car", 0, 0, 10, 10), box("b", "bus", 50, 0, 20, 10)), gold),
        score_item(content(box("a", "car", 0, 0, 10, 10)), gold),
        score_item(content(box("a", "bus", 0, 0, 10, 10), box("z", "car", 200, 0, 5, 5)), gold),
    ]
    total = Counters.of(items)
    parts = Counters.of(items[:1]).merge(Counters.of(items[1:]))
    assert parts == total
    f = total.compute()
    # TP = 3, mismatches = 1, missed = 2 (bus in #2, bus in #3), extra = 1 (z)
    assert (total.matches, total.mismatches, total.missed, total.extra) == (3, 1, 2, 1)
    assert f.precision == pytest.approx(3 / 5) and f.recall == pytest.approx(3 / 6)
    assert f.accuracy == pytest.approx(3 / 7) and f.f1 == pytest.approx(6 / 11)
    assert f.labels["car"].precision == pytest.approx(2 / 3)  # car: 2 TP, and z is an extra car (FP)
    assert f.labels["car"].recall == pytest.approx(2 / 3)  # the car annotated as a bus is a car FN
    assert f.items == 3 and f.passed == sum(bool(i.passed) for i in items)
    assert Counters.from_fields(total.to_fields()) == total


def test_rotated_boxes_sharing_collinear_edges_overlap_in_both_orders() -> None:
    """GEOS' floating overlay returned an empty intersection for these in one order only."""
    a = [(0.0, -36.0, 15.0, 48.05703843110114, 158.1827534749566)]
    b = [(0.0, -36.0, 59.685447839686155, 48.05703843110114, 158.1827534749566)]
    expected = 15.0 / 59.685447839686155  # a lies inside b: same centre, angle and height
    assert scoring.rotated_box_iou(a, b)[0, 0] == pytest.approx(expected, abs=1e-9)
    assert scoring.rotated_box_iou(b, a)[0, 0] == pytest.approx(expected, abs=1e-9)


def test_qualification_flag_has_hysteresis() -> None:
    from goldstream.scoring.policy import qualification_flag

    q = s.QualificationState
    assert qualification_flag(None, q.QUALIFYING) is None
    assert qualification_flag(None, q.PROBATION) == "probation"
    assert qualification_flag("probation", q.QUALIFYING) is None  # no flapping around the line
    assert qualification_flag("probation", q.SUSPENDED) == "suspended"
    assert qualification_flag("suspended", q.PROBATION) is None  # a suspension stands
    assert qualification_flag("suspended", q.QUALIFIED) == "resolved"
    assert qualification_flag(None, q.QUALIFIED) is None


# ------------------------------------------------------------------- the schema's bounds (tests/test_fuzz.py)


def test_shapes_at_the_schemas_coordinate_bounds_score_without_overflow() -> None:
    """Before the schema bounded coordinates, a box at 1e308 overflowed numpy (an infinite area,
    a NaN similarity) and scored 0 against itself, counted against its worker; at the bounds
    themselves every product stays finite."""
    from goldstream.schemas.content import COORD_MAX, COORD_MIN, SIZE_MAX

    far = content(box("a", "car", COORD_MIN, COORD_MIN, SIZE_MAX, SIZE_MAX), box("b", "car", COORD_MAX, 0, 0, 0))
    near = content(box("A", "car", COORD_MIN, COORD_MIN, SIZE_MAX, SIZE_MAX - 1), box("B", "car", COORD_MAX, 0, 0, 0))
    with np.errstate(all="raise"):
        r = score_item(far, near)
    assert r.score is not None and math.isfinite(r.score) and r.objects.matches == 1
    assert r.matches[0].similarity == pytest.approx(1.0)


def _dense_raster(geom: Any, size: tuple[int, int]) -> scoring.Rle:
    """The reference: every pixel centre of the mask tested, then encoded from the dense mask."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w]
    inside = shapely.contains_xy(geom, xs.ravel() + 0.5, ys.ravel() + 0.5).reshape(h, w)
    return scoring.rle.from_dense(inside)


def test_rasterizing_into_a_mask_equals_the_dense_mask_and_costs_the_region_not_the_mask() -> None:
    """It built a dense array of the mask's size: 4.4 GB and 16 s for a 134-megapixel mask."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        ring = np.round(rng.uniform(-5, 45, (int(rng.integers(3, 8)), 2)) * 2) / 2  # centres on edges too
        geom = scoring.region(ring) if len(np.unique(ring, axis=0)) >= 3 else shapely.box(0, 0, w, h)
        for g in (geom, shapely.box(0, 0, w, h), shapely.box(0, 0, w, max(h - 1, 1))):
            got, want = scoring.rle.rasterize(g, (h, w)), _dense_raster(g, (h, w))
            assert np.array_equal(got.counts, want.counts), (h, w, g.wkt)
    side = 11_585  # the largest mask the schema accepts
    small = shapely.box(5000, 5000, 5010, 5004)
    r = scoring.rle.rasterize(small, (side, side))
    assert r.area == 40 and r.counts.sum() == side * side and len(r.counts) == 21


def test_the_objects_component_can_count_matches_whole_as_cvat_does() -> None:
    """With object_metric f1 a box matched at IoU 0.6 counts as right, as in CVAT's report;
    the default (pq) also weighs how well it is placed."""
    from goldstream.scoring import score_items

    from tests.scenario import annotation, boxes, criteria

    truth = boxes(("car", 0, 0, 100, 100), ("bus", 300, 300, 100, 100))
    loose = boxes(("car", 0, 0, 100, 160), ("bus", 300, 300, 100, 100))  # IoU 100/160 = 0.625
    a = annotation(1, "i", "w", loose)
    pq = score_items([(a, truth)], criteria())[0]
    f1 = score_items([(a, truth)], criteria(object_metric="f1"))[0]
    assert pq.components.objects == pytest.approx((0.625 + 1.0) / 2)
    assert f1.components.objects == 1.0 and f1.score == 1.0
    missed = score_items(
        [(annotation(2, "i", "w", boxes(("car", 0, 0, 100, 100))), truth)], criteria(object_metric="f1")
    )
    assert missed[0].components.objects == pytest.approx(2 / 3)


def test_the_small_rules_that_left_the_engine_for_the_policy_module() -> None:
    import numpy as np
    from goldstream.schemas.messages import EscalationReason as R
    from goldstream.scoring.policy import alert_severity, peer_confidence, primary_reason

    assert primary_reason([R.AUDIT_SAMPLE, R.LOW_PROFICIENCY, R.TOO_FAST]) is R.TOO_FAST
    assert primary_reason([R.HIGH_RISK]) is R.HIGH_RISK
    m = np.array([[np.nan, 0.9, 0.1], [0.9, np.nan, 0.7], [0.1, 0.7, np.nan]])
    assert peer_confidence(m, 0) == pytest.approx(0.7) and peer_confidence(m, 2) == pytest.approx(0.9)
    assert peer_confidence(m[:2, :2], 0) == 0.5  # two annotators: no pair of peers
    assert alert_severity("resolved", 0.1, 0.9) == "info"
    assert alert_severity("firing", 0.7, 0.9) == "critical" and alert_severity("firing", 0.8, 0.9) == "warning"


def test_a_region_reaching_past_the_image_is_clipped_to_it_and_one_inside_is_kept_as_drawn() -> None:
    from goldstream.scoring.geometry import region

    assert region([(-50, 0), (50, 0), (50, 100), (-50, 100)], image=(200, 200)).area == pytest.approx(5000)
    assert region([(150, 150), (250, 150), (250, 250)], image=(200, 200)).area == pytest.approx(1250)
    assert region([(10, 10), (60, 10), (60, 60)], image=(200, 200)).area == pytest.approx(1250)
    bowtie = region([(-20, 0), (20, 40), (20, 0), (-20, 40)], image=(200, 200))  # repaired, then clipped
    assert bowtie.area == pytest.approx(400)
    assert region([(300, 300), (400, 300), (400, 400)], image=(200, 200)).area == 0


def _ring(rng: np.random.Generator, k: int, spread: float) -> list[list[float]]:
    return rng.uniform(-spread / 4, spread, (k, 2)).round(1).tolist()


def test_polygons_built_in_bulk_are_the_regions_built_one_by_one_and_the_rejected_are_left_to_region() -> None:
    """`geometry.regions` builds many polygons in a few vectorised calls: the same geometry,
    byte for byte, as `region` (repaired bowties, clipped to the image or not), and None where
    `region` would raise, so the scorer still reports that polygon's own error."""
    rng = np.random.default_rng(7)
    polygons: list[tuple[list[list[float]], list]] = [(_ring(rng, int(k), 120), []) for k in rng.integers(3, 12, 200)]
    polygons += [([[0, 0], [0, 0], [5, 5]], []), ([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], [])]
    polygons += [([[0, 0], [9, 0], [9, 9], [0, 9]], [[[2, 2], [4, 2], [4, 4]]])]  # holes: left to region
    for image in (None, (100, 100)):
        built = geometry.regions(polygons, image)
        left = 0
        for (points, holes), got in zip(polygons, built, strict=True):
            if got is None:
                left += 1
                if holes:
                    continue
                with pytest.raises(InvalidGeometry):
                    geometry.region(points, holes, image)
                continue
            assert got.wkb == geometry.region(points, holes, image).wkb
        assert left == 2  # the ring of two distinct vertices, and the polygon with a hole
        assert sum(not g.is_valid for g in built if g is not None) == 0


def test_region_ious_of_many_blocks_in_one_pass_equal_one_block_at_a_time() -> None:
    """`geometry.region_iou_blocks` (a scorer's whole batch of region families at once) gives
    each block the matrix `region_iou` gives it alone: crowd columns, empty blocks and
    overlapping and disjoint pairs alike."""
    rng = np.random.default_rng(11)
    blocks = []
    for n, m in [(3, 4), (0, 2), (2, 0), (5, 5), (1, 1), (4, 2)]:
        shift = rng.uniform(0, 1000)
        a = [geometry.region(np.array(_ring(rng, 6, 80)) + shift) for _ in range(n)]
        b = [geometry.region(np.array(_ring(rng, 6, 80)) + shift) for _ in range(m)]
        crowd = rng.random(m) < 0.3
        blocks.append((a, b, crowd))
    together = geometry.region_iou_blocks(blocks)
    assert [t.shape for t in together] == [(len(a), len(b)) for a, b, _ in blocks]
    for (a, b, crowd), got in zip(blocks, together, strict=True):
        np.testing.assert_array_equal(got, geometry.region_iou(a, b, crowd))
    assert any((t > 0).any() for t in together) and any((t == 0).any() for t in together)


def test_a_consensus_result_built_unvalidated_equals_the_validated_one_and_a_value_outside_a_fraction_fails() -> None:
    from goldstream.schemas.messages import ItemScore
    from goldstream.scoring.policy import consensus_result
    from pydantic import ValidationError

    c = s.ProjectCriteria(project_id="p", pass_threshold=0.7)
    for value in (None, 0.0, 0.69, 0.7, 1.0):
        built = consensus_result(value, c)
        passed = None if value is None else value >= 0.7
        assert built == ItemScore(score=value, passed=passed)
        assert built.model_dump_json() == ItemScore(score=value, passed=passed).model_dump_json()
    for bad in (1.0000001, -0.1, float("nan")):
        with pytest.raises(ValidationError):
            consensus_result(bad, c)


def test_score_items_checks_each_content_against_the_criteria_unless_the_caller_says_it_checked_it() -> None:
    """A stream agent checks every content on arrival; scoring it again was half of that work.
    Only the contents named as checked are skipped: the others are still refused."""
    from goldstream.scoring import score_items
    from goldstream.scoring.errors import UnknownLabel

    c = s.ProjectCriteria(project_id="p", labels=[s.LabelSpec(name="car")])
    box = s.BBox(x=0, y=0, w=10, h=10)
    ann = s.Content(objects=[s.AnnotatedObject(id="a", label="cat", shape=box)])
    ref = s.Content(objects=[s.AnnotatedObject(id="r", label="car", shape=box)])
    with pytest.raises(UnknownLabel):
        score_items([(ann, ref)], c)
    with pytest.raises(UnknownLabel):
        score_items([(ann, ref)], c, checked=[ref])
    (result,) = score_items([(ann, ref)], c, checked=[ann, ref])
    assert result.objects.mismatches == 1 and result.objects.matches == 0
