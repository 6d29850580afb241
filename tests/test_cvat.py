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
