"""Gold answers from files: CVAT for images 1.1 XML, Datumaro 1.0 JSON, COCO instances /
person-keypoints JSON, a Label Studio JSON export, or GoldAnswer JSONL."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import shapely

from goldstream import cvat
from goldstream import schemas as s
from goldstream.datumaro import gold_from_datumaro, is_datumaro
from goldstream.label_studio import Unsupported, gold_from_export, is_export
from goldstream.schemas.base import validate
from goldstream.scoring import rle


def gold_from_file(path: Path, project_id: str, shape: str = "auto") -> list[s.GoldAnswer]:
    """Gold answers in a file: CVAT for images 1.1 XML, a COCO or Datumaro JSON (by its keys), a Label Studio
    JSON export (a list of tasks: their ground-truth annotations), else JSONL of GoldAnswer or
    envelopes."""
    raw = path.read_bytes()
    if cvat.is_cvat_xml(raw):
        try:
            return list(cvat.gold_from_xml(raw, project_id))
        except cvat.Unsupported as exc:
            raise SystemExit(f"{path}: {exc}") from None
    if raw.lstrip().startswith(b"["):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SystemExit(f"{path}: not JSON: {exc}") from None
        if not is_export(doc):
            raise SystemExit(f"{path}: a JSON list, but not a Label Studio export (tasks with data and annotations)")
        try:
            golds = list(gold_from_export(doc, project_id))
        except Unsupported as exc:
            raise SystemExit(f"{path}: {exc}") from None
        if not golds:
            raise SystemExit(f"{path}: no task has a ground-truth annotation (mark them with the star in Label Studio)")
        return golds
    if raw.lstrip().startswith(b"{"):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
            return list(from_coco(doc, project_id, shape))
        if is_datumaro(doc):
            try:
                return list(gold_from_datumaro(doc, project_id))  # type: ignore[arg-type]
            except cvat.Unsupported as exc:
                raise SystemExit(f"{path}: {exc}") from None
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        data = orjson.loads(line)
        if "topic" in data and "value" in data:
            data = data["value"]
        data.setdefault("project_id", project_id)
        try:
            out.append(validate(s.GoldAnswer, data))
        except s.SchemaError as exc:
            raise SystemExit(f"{path}:{n}: {exc}") from None
    return out


def _coco_person_names() -> list[str]:
    from goldstream.schemas.criteria import COCO_PERSON_NAMES

    return list(COCO_PERSON_NAMES)


def from_coco(doc: dict[str, Any], project_id: str, shape: str = "auto") -> Iterator[s.GoldAnswer]:
    """One GoldAnswer per image. Shapes: keypoints where labeled, else segmentation (polygon, or
    a mask for multi-part and RLE segmentations), else the box; `shape` forces one of them."""
    cats = {c["id"]: c for c in doc.get("categories", [])}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
    created = datetime.now(UTC)
    for img in doc["images"]:
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        objects = []
        for a in by_image.get(img["id"], []):
            cat = cats.get(a["category_id"], {"name": str(a["category_id"])})
            shp = _coco_shape(a, cat, size, shape)
            if shp is None:
                continue
            objects.append(
                s.AnnotatedObject(
                    id=str(a.get("id", len(objects))),
                    label=cat["name"],
                    shape=shp,
                    iscrowd=bool(a.get("iscrowd", 0)),
                    attributes=_coco_attributes(a),
                )
            )
        image = s.ImageSize(width=size[1], height=size[0]) if size else None
        yield s.GoldAnswer(
            event_id=f"coco-{project_id}-{img['id']}",
            project_id=project_id,
            item_id=str(img["id"]),
            content=s.Content(objects=objects, image=image),
            created_at=created,
            source="import",
        )


def _coco_shape(a: dict, cat: dict, size: tuple[int, int] | None, shape: str) -> s.Shape | None:
    kps = a.get("keypoints")
    if kps and (shape == "keypoints" or (shape == "auto" and a.get("num_keypoints", 1) > 0)):
        pts = [(float(kps[i]), float(kps[i + 1]), int(kps[i + 2])) for i in range(0, len(kps), 3)]
        names = cat.get("keypoints") or []
        schema = "coco_person" if names == _coco_person_names() else cat.get("name")
        bbox = tuple(float(v) for v in a["bbox"]) if "bbox" in a else None
        return s.Keypoints(points=pts, schema=schema, area=float(a["area"]) if "area" in a else None, bbox=bbox)
    seg = a.get("segmentation")
    if seg and shape in ("auto", "segmentation"):
        if isinstance(seg, dict):  # RLE
            counts = seg["counts"]
            return s.Mask(size=tuple(seg["size"]), counts=counts.decode() if isinstance(counts, bytes) else counts)
        rings = [np.asarray(p, dtype=float).reshape(-1, 2) for p in seg if len(p) >= 6]
        if len(rings) == 1:
            return s.Polygon(points=[tuple(p) for p in rings[0]])
        if rings and size is not None:  # several parts: one mask, as COCO itself would merge them
            parts = shapely.union_all([shapely.make_valid(shapely.Polygon(r)) for r in rings])
            r = rle.rasterize(parts, size)
            return s.Mask(size=size, counts=rle.encode_counts(r.counts))
    if "bbox" in a and shape in ("auto", "bbox", "segmentation"):
        x, y, w, h = (float(v) for v in a["bbox"])
        angle = float((a.get("attributes") or {}).get("rotation") or 0.0) % 360
        if angle:  # CVAT's COCO export: the unrotated box, turned clockwise about its centre
            return s.RotatedBBox(cx=x + w / 2, cy=y + h / 2, w=w, h=h, angle=angle if angle <= 180 else angle - 360)
        return s.BBox(x=x, y=y, w=w, h=h)
    return None


def _coco_attributes(a: dict) -> dict[str, s.AttributeValue]:
    """An annotation's `attributes` (CVAT's COCO export writes them there), less the rotation,
    which is geometry; values kept when they are attribute values (bool, number, text, list of text)."""
    out: dict[str, s.AttributeValue] = {}
    for name, value in (a.get("attributes") or {}).items():
        if name == "rotation":
            continue
        if isinstance(value, bool | int | float | str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            out[str(name)] = value
    return out
