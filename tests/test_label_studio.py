"""Label Studio results become goldstream content with the same geometry (issue #12)."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import shapely

from goldstream import schemas as s
from goldstream.gold import gold_from_file
from goldstream.label_studio import Unsupported, content_of, label_studio_messages, task_item_id

W, H = 1280, 720


def _rect(rid: str, x: float, y: float, w: float, h: float, rotation: float = 0.0, label: str = "car") -> dict:
    return {
        "id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }  # fmt: skip


def _corners_as_label_studio_draws(x: float, y: float, w: float, h: float, rotation: float) -> list[tuple]:
    """Pixels of the four corners: the box turned `rotation` degrees clockwise about its top-left."""
    x0, y0, w, h = x / 100 * W, y / 100 * H, w / 100 * W, h / 100 * H
    t = math.radians(rotation)
    return [
        (x0 + dx * math.cos(t) - dy * math.sin(t), y0 + dx * math.sin(t) + dy * math.cos(t))
        for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))
    ]


def _corners_of(box: s.RotatedBBox) -> list[tuple]:
    t, hw, hh = math.radians(box.angle), box.w / 2, box.h / 2
    return [
        (box.cx + dx * math.cos(t) - dy * math.sin(t), box.cy + dx * math.sin(t) + dy * math.cos(t))
        for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))
    ]


def test_an_upright_rectangle_in_percent_becomes_the_same_box_in_pixels() -> None:
    content = content_of([_rect("r1", 10, 20, 30, 40)])
    (obj,) = content.objects
    assert obj.shape == s.BBox(x=128, y=144, w=384, h=288)
    assert (obj.id, obj.label) == ("r1", "car")
    assert content.image == s.ImageSize(width=W, height=H)


@pytest.mark.parametrize("rotation", [15.0, 90.0, 200.0, 359.0])
def test_a_rectangle_rotated_about_its_corner_becomes_the_same_box_rotated_about_its_centre(rotation: float) -> None:
    (obj,) = content_of([_rect("r1", 40, 30, 20, 25, rotation)]).objects
    assert isinstance(obj.shape, s.RotatedBBox)
    drawn = _corners_as_label_studio_draws(40, 30, 20, 25, rotation)
    for ours, theirs in zip(_corners_of(obj.shape), drawn, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)
    a, b = shapely.Polygon(_corners_of(obj.shape)), shapely.Polygon(drawn)
    assert a.intersection(b).area / a.union(b).area == pytest.approx(1.0)


def test_keypoint_regions_joined_by_relations_become_one_set_per_instance_in_schema_order() -> None:
    names = s.coco_person().names

    def point(rid: str, name: str, x: float, y: float) -> dict:
        return {
            "id": rid, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
            "original_width": W, "original_height": H,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [name]},
        }  # fmt: skip

    def link(a: str, b: str) -> dict:
        return {"type": "relation", "from_id": a, "to_id": b, "direction": "right"}

    results = [
        point("a1", "nose", 50, 50), point("a2", "left_eye", 51, 49), point("a3", "left_ankle", 50, 90),
        point("b1", "nose", 10, 10), point("b2", "right_wrist", 12, 30),
        link("a1", "a2"), link("a3", "a2"), link("b2", "b1"),
    ]  # fmt: skip
    objects = {o.id: o for o in content_of(results).objects}
    assert sorted(objects) == ["a1", "b1"]
    a = objects["a1"].shape
    assert isinstance(a, s.Keypoints) and a.schema_name == "coco_person" and len(a.points) == len(names)
    assert a.points[names.index("nose")] == (640.0, 360.0, 2)
    assert a.points[names.index("left_eye")] == pytest.approx((652.8, 352.8, 2))
    assert a.points[names.index("left_ankle")] == (640.0, 648.0, 2)
    assert sum(v for _, _, v in a.points) == 6  # the other 14 unlabeled
    b = objects["b1"].shape
    assert isinstance(b, s.Keypoints) and b.points[names.index("right_wrist")] == (153.6, 216.0, 2)


def test_per_region_choices_are_attributes_others_classifications_and_relations_relationships() -> None:
    results = [
        _rect("r1", 10, 10, 10, 10),
        _rect("r2", 50, 50, 10, 10, label="person"),
        {"id": "r1", "type": "choices", "from_name": "occluded", "to_name": "image", "value": {"choices": ["yes"]}},
        {"id": "c9", "type": "choices", "from_name": "scene", "to_name": "image", "value": {"choices": ["street"]}},
        {"type": "relation", "from_id": "r2", "to_id": "r1", "labels": ["drives"]},
        {
            "id": "p1", "type": "polygonlabels", "from_name": "poly", "to_name": "image",
            "original_width": W, "original_height": H,
            "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["road"]},
        },
    ]  # fmt: skip
    content = content_of(results)
    objects = {o.id: o for o in content.objects}
    assert objects["r1"].attributes == {"occluded": "yes"} and objects["r2"].attributes == {}
    assert content.classifications == {"scene": ["street"]}
    assert content.relationships == [s.Relationship(subject="r2", predicate="drives", object="r1")]
    assert objects["p1"].shape == s.Polygon(points=[(0, 0), (640, 0), (640, 360)])


@pytest.mark.parametrize(
    ("result", "says"),
    [
        ({"id": "m1", "type": "brushlabels", "value": {}}, "'brushlabels' is not supported"),
        (_rect("r1", 1, 1, 1, 1) | {"value": {"x": 1, "y": 1, "width": 1, "height": 1, "rectanglelabels": []}},
         "exactly one label"),
    ],
)  # fmt: skip
def test_what_cannot_be_converted_faithfully_is_refused_with_the_reason(result: dict, says: str) -> None:
    with pytest.raises(Unsupported, match=says):
        content_of([result])


def test_gold_loads_from_a_label_studio_export_taking_each_tasks_latest_ground_truth(tmp_path: Path) -> None:
    def ann(aid: int, x: float, truth: bool, at: str, cancelled: bool = False) -> dict:
        return {
            "id": aid, "ground_truth": truth, "was_cancelled": cancelled, "updated_at": at,
            "result": [] if cancelled else [_rect(f"r{aid}", x, 10, 10, 10)],
        }  # fmt: skip

    export = [
        {"id": 7, "data": {"image": "a.jpg"}, "annotations": [
            ann(1, 10, True, "2026-11-01T10:00:00Z"), ann(2, 20, True, "2026-11-02T10:00:00Z"),
            ann(3, 30, False, "2026-11-03T10:00:00Z")]},
        {"id": 8, "data": {"image": "b.jpg"},
         "annotations": [ann(4, 40, True, "2026-11-01T10:00:00Z", cancelled=True)]},
        {"id": 9, "data": {"image": "c.jpg"}, "annotations": []},
    ]  # fmt: skip
    path = tmp_path / "export.json"
    path.write_bytes(orjson.dumps(export))
    (g,) = gold_from_file(path, "p1")
    assert (g.item_id, g.project_id, g.source) == (task_item_id(7), "p1", "import")
    assert g.content.objects[0].shape == s.BBox(x=256, y=72, w=128, h=72)  # the later ground truth
    assert g.created_at.isoformat() == "2026-11-02T10:00:00+00:00"
    assert [x.event_id for x in gold_from_file(path, "p1")] == [g.event_id]  # a reload publishes the same id
    starred = {**export[0]["annotations"][1], "task": 7, "project": 3, "completed_by": 1}
    (webhook,) = label_studio_messages({"action": "ANNOTATION_UPDATED", "annotation": starred}, lambda _: "p1")[0]
    assert webhook[2].event_id == g.event_id  # the same gold whether starred live or loaded from an export

    none = tmp_path / "none.json"
    none.write_bytes(orjson.dumps([export[2]]))
    with pytest.raises(SystemExit, match="no task has a ground-truth annotation"):
        gold_from_file(none, "p1")
    other = tmp_path / "other.json"
    other.write_bytes(orjson.dumps([{"a": 1}]))
    with pytest.raises(SystemExit, match="not a Label Studio export"):
        gold_from_file(other, "p1")
