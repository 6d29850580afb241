"""Gold from a "Datumaro 1.0" export (CVAT's `annotations/<subset>.json`), with CVAT's geometry (#12).

Datumaro names labels by index into `categories.label.labels` (skeleton points are labels with a
`parent`), writes a box as `[x, y, w, h]` with CVAT's rotation (degrees about its centre) and
occlusion among its `attributes`, a skeleton as flat `x, y, v` triplets in the order of
`categories.points` for its label, an image-level tag as a `label` annotation, and an image's
size as `[height, width]`. Each item becomes the content its CVAT XML export and CVAT's API give
(the same item id: the image path, else the item id), so gold from any of the three compares with
a worker's job. Both layouts are read: the classic one (`info`) and the 2025 one
(`dm_format_version`, `infos`). Masks, ellipses, cuboids and captions are refused, naming the item.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from goldstream import schemas as s
from goldstream.cvat import Unsupported, box, imported_gold, skeleton

GEOMETRY_ATTRIBUTES = frozenset({"rotation", "occluded", "track_id", "keyframe", "z_order", "outside"})
"""Attributes CVAT's exporter adds for its own geometry and tracking: not the object's
attributes (the XML export and the API carry them as shape fields)."""


def is_datumaro(doc: object) -> bool:
    return isinstance(doc, dict) and "categories" in doc and "items" in doc and "images" not in doc


def _value(v: object) -> s.AttributeValue:
    """As CVAT's API and XML give it: numbers as the text CVAT stores ("5", "2.5"), booleans kept."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return f"{v:g}"
    return str(v)


def _pairs(flat: list[float]) -> list[tuple[float, float]]:
    return [(float(flat[i]), float(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def _objects(ann: Mapping[str, Any], n: int, names: list[str], order: Mapping[int, list[str]],
             criteria: s.ProjectCriteria) -> list[s.AnnotatedObject]:  # fmt: skip
    kind, label_id = ann.get("type"), ann.get("label_id")
    if not isinstance(label_id, int) or not 0 <= label_id < len(names):
        raise Unsupported(f"{kind} annotation {n} has label_id {label_id!r}, not a label of the export")
    label = names[label_id]
    raw_attrs = ann.get("attributes") or {}
    attrs = {k: _value(v) for k, v in raw_attrs.items() if k not in GEOMETRY_ATTRIBUTES}
    shape: s.Shape
    if kind == "bbox":
        x, y, w, h = (float(v) for v in ann["bbox"])
        shape = box(x, y, x + w, y + h, float(raw_attrs.get("rotation") or 0.0))
    elif kind == "polygon":
        shape = s.Polygon(points=_pairs(ann["points"]))
    elif kind == "polyline":
        shape = s.Polyline(points=_pairs(ann["points"]))
    elif kind == "points":
        return [s.AnnotatedObject(id=f"{n}.{k}", label=label, shape=s.Point(x=x, y=y), attributes=attrs)
                for k, (x, y) in enumerate(_pairs(ann["points"]))]  # fmt: skip
    elif kind == "skeleton":
        flat, point_names = ann["points"], order.get(label_id)
        if point_names is None or len(flat) != 3 * len(point_names):
            raise Unsupported(f"skeleton {label!r}: its points do not follow categories.points for its label")
        named = {}
        for name, k in zip(point_names, range(0, len(flat), 3), strict=True):
            x, y, v = float(flat[k]), float(flat[k + 1]), int(flat[k + 2])
            named[name] = (x, y, v) if v else (0.0, 0.0, 0)
        shape = skeleton(label, named, criteria)
    else:
        raise Unsupported(f"{kind} annotation {n} (label {label!r}) is not supported")
    return [s.AnnotatedObject(id=str(n), label=label, shape=shape, attributes=attrs)]


def content_of(item: Mapping[str, Any], names: list[str], order: Mapping[int, list[str]],
               criteria: s.ProjectCriteria) -> s.Content:  # fmt: skip
    """The content of one item of the export."""
    objects: list[s.AnnotatedObject] = []
    tags = set()
    for n, ann in enumerate(item.get("annotations") or []):
        if ann.get("type") == "label":
            label_id = ann.get("label_id")
            if not isinstance(label_id, int) or not 0 <= label_id < len(names):
                raise Unsupported(f"tag {n} has label_id {label_id!r}, not a label of the export")
            tags.add(names[label_id])
            continue
        objects += _objects(ann, n, names, order, criteria)
    size = (item.get("image") or {}).get("size")
    image = {"width": int(size[1]), "height": int(size[0])} if size else None  # [height, width]
    return s.validate(
        s.Content,
        {
            "objects": [o.model_dump(mode="json", by_alias=True) for o in objects],
            "classifications": {"tag": sorted(tags)} if tags else {},
            "image": image,
        },
    )


def gold_from_datumaro(
    doc: Mapping[str, Any], project_id: str, criteria: s.ProjectCriteria | None = None
) -> Iterator[s.GoldAnswer]:
    """One GoldAnswer per item of a Datumaro export."""
    criteria = criteria or s.ProjectCriteria(project_id=project_id)
    labels = doc["categories"].get("label", {}).get("labels", [])
    names = [str(x["name"]) for x in labels]
    order = {int(p["label_id"]): [str(x) for x in p["labels"]]
             for p in doc["categories"].get("points", {}).get("items", [])}  # fmt: skip
    created = datetime.now(UTC)
    for item in doc["items"]:
        name = (item.get("image") or {}).get("path") or str(item.get("id", ""))
        try:
            content = content_of(item, names, order, criteria)
        except (Unsupported, s.SchemaError, KeyError, TypeError, ValueError) as exc:
            raise Unsupported(f"item {name!r}: {exc}") from None
        yield imported_gold("datumaro-gold", project_id, name, content, created)


__all__ = ["content_of", "gold_from_datumaro", "is_datumaro"]
