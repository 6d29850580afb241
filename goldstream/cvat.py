"""CVAT's "CVAT for images 1.1" XML -> goldstream gold answers, with exact geometry (issue #12).

CVAT stores pixels already. A `<box>` is its corners (`xtl ytl xbr ybr`) and a `rotation` in degrees
clockwise about its centre, which is goldstream's `RotatedBBox` as it is. A `<skeleton>` holds one
`<points>` per keypoint, named by its label, with `outside` (not labeled) and `occluded` flags:
goldstream wants one keypoint set in the order of the project's keypoint schema, with COCO's
visibility (0 not labeled, 1 occluded, 2 visible). `<tag>`s are image-level labels: the item's
`tag` classification. `<attribute name>` children become the object's attributes (CVAT writes a
checkbox as "true" / "false": those become booleans). An image is the item named by its file name
(characters an id cannot hold replaced by `_`), which is what a CVAT task's frames are known by.

Anything this cannot convert faithfully raises `Unsupported` naming the image and the element.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime

from goldstream import schemas as s

ID_CHARS = re.compile(r"[^A-Za-z0-9._:@/+\-]")


class Unsupported(ValueError):
    """A CVAT element that cannot be converted faithfully; the message says which and why."""


def item_id(image_name: str) -> str:
    """goldstream's item id of a CVAT image: its file name, made an id."""
    name = ID_CHARS.sub("_", image_name).lstrip("._:@/+-") or "image"
    return name[:128]


def _xy(points: str) -> list[tuple[float, float]]:
    out = []
    for pair in points.split(";"):
        x, _, y = pair.partition(",")
        out.append((float(x), float(y)))
    return out


def _attributes(el: ET.Element) -> dict[str, s.AttributeValue]:
    out: dict[str, s.AttributeValue] = {}
    for a in el.findall("attribute"):
        value = (a.text or "").strip()
        out[a.get("name", "")] = {"true": True, "false": False}.get(value, value)
    return out


def _box(el: ET.Element) -> s.BBox | s.RotatedBBox:
    xtl, ytl, xbr, ybr = (float(el.get(k, "nan")) for k in ("xtl", "ytl", "xbr", "ybr"))
    angle = float(el.get("rotation") or 0.0) % 360
    if angle == 0:
        return s.BBox(x=xtl, y=ytl, w=xbr - xtl, h=ybr - ytl)
    return s.RotatedBBox(
        cx=(xtl + xbr) / 2, cy=(ytl + ybr) / 2, w=xbr - xtl, h=ybr - ytl, angle=angle if angle <= 180 else angle - 360
    )


def _skeleton(el: ET.Element, criteria: s.ProjectCriteria) -> s.Keypoints:
    points = {}
    for p in el.findall("points"):
        (xy,) = _xy(p.get("points", ""))
        visibility = 0 if p.get("outside") == "1" else 1 if p.get("occluded") == "1" else 2
        points[p.get("label", "")] = (*xy, visibility) if visibility else (0.0, 0.0, 0)
    schema = next((k for k, sch in sorted(criteria.keypoint_schemas.items()) if set(points) <= set(sch.names)), None)
    if schema is None:
        raise Unsupported(f"skeleton {el.get('label')!r}: no keypoint schema of the project holds {sorted(points)}")
    return s.Keypoints(
        points=[points.get(n, (0.0, 0.0, 0)) for n in criteria.keypoint_schemas[schema].names], schema_name=schema
    )


def content_of(image: ET.Element, criteria: s.ProjectCriteria) -> s.Content:
    """The content of one `<image>` element."""
    objects = []
    for n, el in enumerate(image):
        label = el.get("label", "")
        shape: s.Shape
        if el.tag == "box":
            shape = _box(el)
        elif el.tag == "polygon":
            shape = s.Polygon(points=_xy(el.get("points", "")))
        elif el.tag == "polyline":
            shape = s.Polyline(points=_xy(el.get("points", "")))
        elif el.tag == "points":
            for k, (x, y) in enumerate(_xy(el.get("points", ""))):
                objects.append(s.AnnotatedObject(id=f"{n}.{k}", label=label, shape=s.Point(x=x, y=y),
                                                 attributes=_attributes(el)))  # fmt: skip
            continue
        elif el.tag == "skeleton":
            shape = _skeleton(el, criteria)
        elif el.tag == "tag":
            continue
        else:
            raise Unsupported(f"<{el.tag}> (label {label!r}) is not supported")
        objects.append(s.AnnotatedObject(id=str(n), label=label, shape=shape, attributes=_attributes(el)))
    tags = sorted({el.get("label", "") for el in image.findall("tag")})
    size = s.ImageSize(width=int(image.get("width", "0")), height=int(image.get("height", "0")))
    return s.validate(
        s.Content,
        {
            "objects": [o.model_dump(mode="json", by_alias=True) for o in objects],
            "classifications": {"tag": tags} if tags else {},
            "image": size.model_dump(mode="json"),
        },
    )


def is_cvat_xml(raw: bytes) -> bool:
    head = raw.lstrip()[:400]
    return head.startswith(b"<?xml") or head.startswith(b"<annotations")


def gold_from_xml(raw: bytes, project_id: str, criteria: s.ProjectCriteria | None = None) -> Iterator[s.GoldAnswer]:
    """One GoldAnswer per `<image>` of a CVAT for images 1.1 export."""
    criteria = criteria or s.ProjectCriteria(project_id=project_id)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise Unsupported(f"not XML: {exc}") from None
    if root.tag != "annotations":
        raise Unsupported(f"the root element is <{root.tag}>, not <annotations> (CVAT for images 1.1)")
    created = datetime.now(UTC)
    for image in root.iter("image"):
        name = image.get("name", image.get("id", ""))
        try:
            content = content_of(image, criteria)
        except (ValueError, s.SchemaError) as exc:
            raise Unsupported(f"image {name!r}: {exc}") from None
        item = item_id(name)
        yield s.GoldAnswer(
            event_id=s.derive_id("cvat-gold", project_id, item, content.model_dump_json()),
            project_id=project_id,
            item_id=item,
            content=content,
            created_at=created,
            source="import",
        )


__all__ = ["Unsupported", "content_of", "gold_from_xml", "is_cvat_xml", "item_id"]
