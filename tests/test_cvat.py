"""Gold from CVAT for images 1.1 XML, with CVAT's geometry as goldstream's (issue #12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from goldstream import schemas as s
from goldstream.cvat import item_id
from goldstream.gold import gold_from_file

XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><name>cars</name></task></meta>
  <image id="0" name="frames/street 01.jpg" width="1280" height="720">
    <box label="car" source="manual" occluded="0" xtl="10.5" ytl="20" xbr="110.5" ybr="70" z_order="0">
      <attribute name="color">red</attribute>
      <attribute name="parked">true</attribute>
    </box>
    <box label="bus" occluded="0" xtl="200" ytl="100" xbr="300" ybr="140" rotation="30.0" z_order="0"/>
    <polygon label="road" occluded="0" points="0.0,700.0;1279.0,700.0;640.0,400.0" z_order="0"/>
    <polyline label="lane" occluded="0" points="10,10;20,20;30,10" z_order="0"/>
    <points label="sign" occluded="0" points="5,6;7,8" z_order="0"/>
    <skeleton label="person" occluded="0" z_order="0">
      <points label="nose" outside="0" occluded="0" points="600,300"/>
      <points label="left_eye" outside="0" occluded="1" points="605,295"/>
      <points label="right_eye" outside="1" occluded="0" points="0,0"/>
    </skeleton>
    <tag label="daytime" source="manual"/>
  </image>
  <image id="1" name="frames/street 02.jpg" width="1280" height="720"/>
</annotations>
"""


def test_cvat_xml_becomes_gold_with_every_shape_attribute_and_tag(tmp_path: Path) -> None:
    path = tmp_path / "annotations.xml"
    path.write_text(XML)
    first, empty = gold_from_file(path, "cars")
    assert (first.item_id, empty.item_id) == ("frames/street_01.jpg", item_id("frames/street 02.jpg"))
    assert empty.content.objects == [] and empty.source == "import"
    c = first.content
    assert c.image == s.ImageSize(width=1280, height=720)
    assert c.classifications == {"tag": ["daytime"]}
    by_label: dict[str, list[s.AnnotatedObject]] = {}
    for o in c.objects:
        by_label.setdefault(o.label, []).append(o)
    (car,) = by_label["car"]
    assert car.shape == s.BBox(x=10.5, y=20, w=100, h=50)
    assert car.attributes == {"color": "red", "parked": True}
    (bus,) = by_label["bus"]  # CVAT turns a box about its centre, as goldstream does
    assert bus.shape == s.RotatedBBox(cx=250, cy=120, w=100, h=40, angle=30)
    assert by_label["road"][0].shape == s.Polygon(points=[(0, 700), (1279, 700), (640, 400)])
    assert by_label["lane"][0].shape == s.Polyline(points=[(10, 10), (20, 20), (30, 10)])
    assert [o.shape for o in by_label["sign"]] == [s.Point(x=5, y=6), s.Point(x=7, y=8)]
    (person,) = by_label["person"]
    assert isinstance(person.shape, s.Keypoints) and person.shape.schema_name == "coco_person"
    names = s.coco_person().names
    points = dict(zip(names, person.shape.points, strict=True))
    assert points["nose"] == (600, 300, 2) and points["left_eye"] == (605, 295, 1)  # visible, occluded
    assert points["right_eye"] == (0, 0, 0) and sum(v for *_, v in person.shape.points) == 3  # outside: unlabeled
    assert [g.event_id for g in gold_from_file(path, "cars")] == [first.event_id, empty.event_id]  # reload: same ids


@pytest.mark.parametrize(
    ("xml", "says"),
    [
        ("<annotations><image name='a' width='10' height='10'><cuboid label='x'/></image></annotations>",
         "<cuboid> .* is not supported"),
        ("<annotations><image name='a' width='10' height='10'><skeleton label='hand'>"
         "<points label='thumb' points='1,1'/></skeleton></image></annotations>", "no keypoint schema"),
        ("<?xml version='1.0'?><annotations><image", "not XML"),
    ],
)  # fmt: skip
def test_what_cannot_be_converted_is_refused_naming_the_image_and_element(tmp_path: Path, xml: str, says: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(xml)
    with pytest.raises(SystemExit, match=says):
        gold_from_file(path, "p")


def test_gold_from_cvats_coco_export_keeps_attributes_and_rotation() -> None:
    """CVAT's COCO 1.0 export keeps rotation and attributes in each annotation's `attributes`;
    the loader used to drop both."""
    from goldstream.gold import from_coco

    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 100, 40], "iscrowd": 0, "segmentation": [],
             "attributes": {"occluded": False, "rotation": 330.0, "color": "red", "track": {"id": 3}}},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [300, 200, 50, 50], "iscrowd": 0, "segmentation": [],
             "attributes": {"occluded": True, "rotation": 0.0}},
        ],
    }  # fmt: skip
    (g,) = from_coco(doc, "cars")
    turned, upright = g.content.objects
    assert turned.shape == s.RotatedBBox(cx=60, cy=40, w=100, h=40, angle=-30)
    assert turned.attributes == {"occluded": False, "color": "red"}  # geometry and non-values left out
    assert upright.shape == s.BBox(x=300, y=200, w=50, h=50) and upright.attributes == {"occluded": True}


# ----------------------------------------------------------------------------- the REST API (webhook side)
# A job as CVAT's API returns it (formats: cvat/apps/engine/serializers.py; job 14 of CVAT's own
# test assets covers task frames 15-19; `data/meta` lists the job's own frames from its start frame)

LABELS = [
    {"id": 5, "name": "car", "type": "rectangle", "sublabels": [], "attributes": [
        {"id": 1, "name": "color", "input_type": "select", "mutable": False, "values": ["red", "blue"]},
        {"id": 4, "name": "parked", "input_type": "checkbox", "mutable": True, "values": ["false"]}]},
    {"id": 6, "name": "bus", "type": "rectangle", "sublabels": [], "attributes": []},
    {"id": 7, "name": "road", "type": "polygon", "sublabels": [], "attributes": []},
    {"id": 8, "name": "lane", "type": "polyline", "sublabels": [], "attributes": []},
    {"id": 9, "name": "sign", "type": "points", "sublabels": [], "attributes": []},
    {"id": 22, "name": "person", "type": "skeleton", "attributes": [], "sublabels": [
        {"id": 23, "name": "nose", "type": "points", "attributes": []},
        {"id": 24, "name": "left_eye", "type": "points", "attributes": []},
        {"id": 25, "name": "right_eye", "type": "points", "attributes": []}]},
    {"id": 17, "name": "daytime", "type": "tag", "sublabels": [], "attributes": []},
]  # fmt: skip
JOB = {
    "id": 14, "task_id": 9, "project_id": 1, "stage": "annotation", "state": "completed", "type": "annotation",
    "start_frame": 15, "stop_frame": 18, "updated_date": "2026-12-01T10:00:00.000000Z",
    "assignee": {"url": "http://cvat/api/users/7", "id": 7, "username": "worker2", "first_name": "W", "last_name": "S"},
}  # fmt: skip
META = {
    "start_frame": 15, "stop_frame": 18, "deleted_frames": [18], "included_frames": None,
    "frames": [{"name": f"frames/street 0{k}.jpg", "width": 1280, "height": 720, "related_files": 0}
               for k in (1, 2, 3, 4)],
}  # fmt: skip


def _shape(sid: int, frame: int, kind: str, label_id: int, points: list[float], **extra: object) -> dict:
    return {"id": sid, "frame": frame, "type": kind, "label_id": label_id, "points": points, "group": 0,
            "source": "manual", "occluded": False, "outside": False, "z_order": 0, "rotation": 0.0,
            "attributes": [], "elements": [], **extra}  # fmt: skip


def _element(sid: int, label_id: int, x: float, y: float, **flags: bool) -> dict:
    return _shape(sid, 15, "points", label_id, [x, y], **flags)


ANNOTATIONS = {
    "version": 0,
    "tags": [{"id": 1, "frame": 15, "label_id": 17, "group": 0, "source": "manual", "attributes": []}],
    "shapes": [
        _shape(41, 15, "rectangle", 5, [10.5, 20, 110.5, 70],
               attributes=[{"spec_id": 1, "value": "red"}, {"spec_id": 4, "value": "true"}]),
        _shape(42, 15, "rectangle", 6, [200, 100, 300, 140], rotation=30.0),
        _shape(43, 15, "polygon", 7, [0.0, 700.0, 1279.0, 700.0, 640.0, 400.0]),
        _shape(44, 15, "polyline", 8, [10, 10, 20, 20, 30, 10]),
        _shape(45, 15, "points", 9, [5, 6, 7, 8]),
        _shape(46, 15, "skeleton", 22, [], elements=[
            _element(47, 23, 600, 300), _element(48, 24, 605, 295, occluded=True),
            _element(49, 25, 0, 0, outside=True)]),
        _shape(50, 17, "ellipse", 5, [100, 100, 150, 80]),
    ],
    "tracks": [],
}  # fmt: skip


def _frames() -> dict:
    from goldstream.cvat import Labels, frame_contents

    return frame_contents(JOB, ANNOTATIONS, Labels.of(LABELS), META, s.ProjectCriteria(project_id="cars"))


def test_a_jobs_annotations_from_cvats_api_are_the_same_content_as_its_xml_export_of_them(tmp_path: Path) -> None:
    """The webhook path (REST API, label and attribute ids) and the export path (XML, names) must
    give one image the same content: gold loaded from an export and a worker's job compare."""
    frames = _frames()
    assert sorted(frames) == [15, 16, 17]  # 18 deleted
    name, content = frames[15]
    assert name == "frames/street 01.jpg" and isinstance(content, s.Content)
    path = tmp_path / "annotations.xml"
    path.write_text(XML)
    exported = gold_from_file(path, "cars")[0].content

    def key(o: s.AnnotatedObject) -> str:
        return o.model_dump_json(exclude={"id"})

    assert sorted(map(key, content.objects)) == sorted(map(key, exported.objects))
    assert (content.classifications, content.image) == (exported.classifications, exported.image)
    assert frames[16] == ("frames/street 02.jpg", s.Content(image=s.ImageSize(width=1280, height=720)))


def test_a_frame_with_a_shape_goldstream_cannot_score_is_refused_alone_and_tracks_refuse_the_job() -> None:
    from goldstream.cvat import Labels, Unsupported, frame_contents

    name, refused = _frames()[17]
    assert name == "frames/street 03.jpg" and isinstance(refused, Unsupported) and "ellipse" in str(refused)
    tracked = {**ANNOTATIONS, "tracks": [{"id": 1, "frame": 15, "label_id": 5, "shapes": [
        _shape(1, 15, "rectangle", 5, [0, 0, 5, 5])], "attributes": [], "elements": []}]}  # fmt: skip
    out = frame_contents(JOB, tracked, Labels.of(LABELS), META, s.ProjectCriteria(project_id="cars"))
    assert all(isinstance(c, Unsupported) and "tracks" in str(c) for _, c in out.values())


def test_a_jobs_annotation_ids_change_only_with_a_frames_content() -> None:
    """CVAT fires update:job on every save and may deliver one change several times: an
    unchanged frame must be the same event (applied once), a changed frame a resubmission."""
    from datetime import UTC, datetime

    from goldstream.cvat import Labels, frame_contents, job_annotations

    at = datetime(2026, 12, 1, tzinfo=UTC)
    first, refused = job_annotations(JOB, "cvat-user-7", _frames(), "cars", at)
    assert [(a.item_id, a.external_id) for a in first] == [
        ("frames/street_01.jpg", "job/14/frame/15"), ("frames/street_02.jpg", "job/14/frame/16")]  # fmt: skip
    assert [f for f, _, _ in refused] == [17]
    moved = {**ANNOTATIONS, "shapes": [*ANNOTATIONS["shapes"], _shape(60, 16, "rectangle", 5, [1, 2, 3, 4])]}
    second, _ = job_annotations(
        JOB, "cvat-user-7", frame_contents(JOB, moved, Labels.of(LABELS), META, s.ProjectCriteria(project_id="c")),
        "cars", at,
    )  # fmt: skip
    again, _ = job_annotations(JOB, "cvat-user-7", _frames(), "cars", at)
    assert [a.event_id for a in again] == [a.event_id for a in first]
    assert second[0].event_id == first[0].event_id  # frame 15 as it was: the same event
    assert second[1].event_id != first[1].event_id  # frame 16 changed: a resubmission


# ----------------------------------------------------------------------------- Datumaro 1.0

DATUMARO = {
    "info": {},
    "categories": {
        "label": {
            "labels": [{"name": n, "parent": p, "attributes": []} for n, p in [
                ("car", ""), ("bus", ""), ("road", ""), ("lane", ""), ("sign", ""), ("person", ""),
                ("nose", "person"), ("left_eye", "person"), ("right_eye", "person"), ("daytime", "")]],
            "attributes": ["occluded", "color", "parked"],
        },
        "points": {"items": [{"label_id": 5, "labels": ["nose", "left_eye", "right_eye"], "joints": [[1, 2]]}]},
    },
    "items": [
        {"id": "frames/street 01", "attr": {"frame": 0}, "image": {"path": "frames/street 01.jpg", "size": [720, 1280]},
         "annotations": [
            {"id": 0, "type": "bbox", "group": 0, "label_id": 0, "z_order": 0, "bbox": [10.5, 20.0, 100.0, 50.0],
             "attributes": {"occluded": False, "rotation": 0.0, "color": "red", "parked": True}},
            {"id": 0, "type": "bbox", "group": 0, "label_id": 1, "z_order": 0, "bbox": [200.0, 100.0, 100.0, 40.0],
             "attributes": {"occluded": False, "rotation": 30.0}},
            {"id": 0, "type": "polygon", "group": 0, "label_id": 2, "z_order": 0, "attributes": {"occluded": False},
             "points": [0.0, 700.0, 1279.0, 700.0, 640.0, 400.0]},
            {"id": 0, "type": "polyline", "group": 0, "label_id": 3, "z_order": 0, "attributes": {"occluded": False},
             "points": [10.0, 10.0, 20.0, 20.0, 30.0, 10.0]},
            {"id": 0, "type": "points", "group": 0, "label_id": 4, "z_order": 0, "attributes": {"occluded": False},
             "points": [5.0, 6.0, 7.0, 8.0], "visibility": [2, 2]},
            {"id": 0, "type": "skeleton", "group": 0, "label_id": 5,
             "attributes": {"occluded": False, "keyframe": False},
             "points": [600.0, 300.0, 2, 605.0, 295.0, 1, 0.0, 0.0, 0], "points_attributes": [{}, {}, {}]},
            {"id": 0, "type": "label", "group": 0, "label_id": 9, "attributes": {}},
        ]},
        {"id": "frames/street 02", "annotations": [], "image": {"path": "frames/street 02.jpg", "size": [720, 1280]}},
    ],
}  # fmt: skip


def test_gold_from_a_datumaro_export_is_the_same_as_from_the_xml_export_of_the_same_images(tmp_path: Path) -> None:
    import orjson

    (tmp_path / "default.json").write_bytes(orjson.dumps(DATUMARO))
    (tmp_path / "annotations.xml").write_text(XML)
    datumaro = gold_from_file(tmp_path / "default.json", "cars")
    xml = gold_from_file(tmp_path / "annotations.xml", "cars")
    assert [g.item_id for g in datumaro] == [g.item_id for g in xml]

    def key(o: s.AnnotatedObject) -> str:
        return o.model_dump_json(exclude={"id"})

    for d, x in zip(datumaro, xml, strict=True):
        assert sorted(map(key, d.content.objects)) == sorted(map(key, x.content.objects))
        assert (d.content.classifications, d.content.image) == (x.content.classifications, x.content.image)


def test_a_datumaro_skeleton_follows_its_categories_point_order_into_the_keypoint_schema() -> None:
    """CVAT's own test asset (cvat-ai/datumaro tests/assets/datumaro_dataset/with_skeleton): the
    export's point order (1, 3, 2) is not the schema's (1, 2, 3), and the size is [height, width]."""
    from goldstream.datumaro import gold_from_datumaro

    doc = {
        "info": {},
        "categories": {
            "label": {"labels": [{"name": "skeleton-label", "parent": "", "attributes": []},
                                 {"name": "point1-label", "parent": "skeleton-label", "attributes": []},
                                 {"name": "point3-label", "parent": "skeleton-label", "attributes": []},
                                 {"name": "point2-label", "parent": "skeleton-label", "attributes": []}],
                      "attributes": ["occluded", "point2-attribute-text", "point3-attribute-checkbox"]},
            "points": {"items": [{"label_id": 0, "labels": ["point1-label", "point3-label", "point2-label"],
                                  "joints": [[2, 3], [1, 2]]}]},
        },
        "items": [{"id": "100", "image": {"path": "100.jpg", "size": [10, 6]}, "annotations": [
            {"id": 0, "type": "skeleton", "attributes": {"occluded": False, "keyframe": False}, "group": 0,
             "label_id": 0, "points": [0.9, 3.53, 2, 2.45, 7.6, 2, 5.2, 2.5, 2],
             "points_attributes": [{}, {"point3-attribute-checkbox": True}, {"point2-attribute-text": "some text"}]}]}],
    }  # fmt: skip
    schema = s.KeypointSchema(names=["point1-label", "point2-label", "point3-label"], sigmas=[0.05] * 3)
    criteria = s.ProjectCriteria(project_id="p", keypoint_schemas={"three": schema})
    (gold,) = gold_from_datumaro(doc, "p", criteria)
    (obj,) = gold.content.objects
    assert gold.item_id == "100.jpg" and gold.content.image == s.ImageSize(width=6, height=10)
    assert isinstance(obj.shape, s.Keypoints) and obj.shape.schema_name == "three"
    assert obj.shape.points == [(0.9, 3.53, 2), (5.2, 2.5, 2), (2.45, 7.6, 2)]


def test_a_datumaro_mask_is_refused_naming_the_item(tmp_path: Path) -> None:
    import orjson

    mask = {"id": 0, "type": "mask", "label_id": 0, "rle": {"counts": "06", "size": [2, 3]}, "attributes": {}}
    doc = {"categories": {"label": {"labels": [{"name": "car", "parent": ""}]}},
           "items": [{"id": "a", "image": {"path": "a.jpg", "size": [2, 3]}, "annotations": [mask]}]}  # fmt: skip
    (tmp_path / "d.json").write_bytes(orjson.dumps(doc))
    with pytest.raises(SystemExit, match=r"item 'a.jpg': mask annotation 0 .* not supported"):
        gold_from_file(tmp_path / "d.json", "p")


# ----------------------------------------------------------------------------- criteria import-cvat

QUALITY = {  # GET /api/quality/settings/{id}, CVAT 2.x defaults (cvat/apps/quality_control)
    "id": 1, "task_id": 5, "project_id": None, "inherit": True, "job_filter": "", "target_metric": "accuracy",
    "target_metric_threshold": 0.7, "max_validations_per_job": 0, "iou_threshold": 0.4, "oks_sigma": 0.09,
    "point_size_base": "group_bbox_size", "line_thickness": 0.01, "low_overlap_threshold": 0.8,
    "compare_line_orientation": True, "line_orientation_threshold": 0.1, "compare_groups": True,
    "group_match_threshold": 0.5, "check_covered_annotations": True, "object_visibility_threshold": 0.05,
    "panoptic_comparison": True, "compare_attributes": True, "empty_is_annotated": False,
}  # fmt: skip


def test_criteria_imported_from_cvat_match_and_count_as_cvats_quality_report_does() -> None:
    """CVAT's defaults match boxes from IoU 0.4 and count a match whole; goldstream's defaults
    (0.5, panoptic quality) judge the same pair otherwise. Imported, they judge as CVAT."""
    from goldstream.scoring import score_item

    from goldstream.cvat_quality import criteria_from_cvat

    criteria, notes = criteria_from_cvat(QUALITY, "cars", LABELS, image_size=(1920, 1080))
    gold = s.Content(objects=[s.AnnotatedObject(id="g", label="bus", shape=s.BBox(x=0, y=0, w=100, h=100))])
    # 100 x 100 boxes 38 px apart: IoU 6200 / 13800 = 0.449
    work = s.Content(objects=[s.AnnotatedObject(id="w", label="bus", shape=s.BBox(x=38, y=0, w=100, h=100))])
    ours, cvats = score_item(work, gold), score_item(work, gold, criteria)
    assert ours.objects.matches == 0 and ours.score == 0
    assert cvats.objects.matches == 1 and cvats.score == 1.0
    assert (criteria.pass_threshold, criteria.targets.accuracy, criteria.empty_item_correct) == (0.7, 0.7, False)
    person = criteria.label("person")
    assert person is not None and person.keypoint_schema == "person"
    assert criteria.keypoint_schemas["person"].names == ["nose", "left_eye", "right_eye"]
    assert criteria.keypoint_schemas["person"].sigmas == [0.09] * 3
    car = criteria.label("car")
    assert car is not None and car.attributes["color"].values == ["red", "blue"]
    assert criteria.line_tolerance == pytest.approx(2 * 0.01 * (1920 * 1080) ** 0.5)
    assert any(n.startswith("point_size_base not mirrored") for n in notes)


def test_import_cvat_writes_criteria_that_criteria_set_reads_and_refuses_newer_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    import orjson

    from goldstream.commands import load_criteria
    from tests.conftest import REPO

    (tmp_path / "q.json").write_bytes(orjson.dumps({"count": 1, "results": [QUALITY]}))
    (tmp_path / "labels.json").write_bytes(orjson.dumps({"count": len(LABELS), "results": LABELS}))
    argv = [sys.executable, "-m", "goldstream.cli", "criteria", "import-cvat", str(tmp_path / "q.json"), "--project",
            "cars", "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "c.yaml")]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "note: compare_attributes" in done.stderr
    loaded = load_criteria(tmp_path / "c.yaml")
    assert loaded.default_threshold["box"] == 0.4 and loaded.object_metric == "f1"
    assert [spec.name for spec in loaded.labels] == [x["name"] for x in LABELS]
    (tmp_path / "new.json").write_bytes(orjson.dumps({"id": 1, "task_id": 5, "inherit": True}))
    argv[5] = str(tmp_path / "new.json")
    newer = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert newer.returncode != 0 and "requirements" in newer.stderr
