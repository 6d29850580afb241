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

The bridge's side reads a job through CVAT's REST API (`GET /api/jobs/{id}/annotations`, its
labels and its frames) after CVAT's `update:job` webhook says the annotator completed it. There
labels and attributes are ids (`label_id`, `spec_id`) and shapes flat point lists; each frame
becomes the same `Content` its XML export gives (a test holds the two paths together), so gold
loaded from an export and a worker's job compare item by item.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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


def attribute_value(text: str) -> s.AttributeValue:
    """CVAT writes every attribute as text; a checkbox's "true" / "false" is a boolean."""
    value = text.strip()
    return {"true": True, "false": False}.get(value, value)


def _attributes(el: ET.Element) -> dict[str, s.AttributeValue]:
    return {a.get("name", ""): attribute_value(a.text or "") for a in el.findall("attribute")}


def box(xtl: float, ytl: float, xbr: float, ybr: float, rotation: float) -> s.BBox | s.RotatedBBox:
    """A CVAT box (corners, degrees clockwise about its centre): goldstream's as it is."""
    angle = rotation % 360
    if angle == 0:
        return s.BBox(x=xtl, y=ytl, w=xbr - xtl, h=ybr - ytl)
    return s.RotatedBBox(
        cx=(xtl + xbr) / 2, cy=(ytl + ybr) / 2, w=xbr - xtl, h=ybr - ytl, angle=angle if angle <= 180 else angle - 360
    )


def _box(el: ET.Element) -> s.BBox | s.RotatedBBox:
    xtl, ytl, xbr, ybr = (float(el.get(k, "nan")) for k in ("xtl", "ytl", "xbr", "ybr"))
    return box(xtl, ytl, xbr, ybr, float(el.get("rotation") or 0.0))


def skeleton(label: str, points: dict[str, tuple[float, float, int]], criteria: s.ProjectCriteria) -> s.Keypoints:
    """A skeleton's named points, laid out in the order of the project's keypoint schema that
    holds all their names; points it does not name are (0, 0, 0), not labeled."""
    schema = next((k for k, sch in sorted(criteria.keypoint_schemas.items()) if set(points) <= set(sch.names)), None)
    if schema is None:
        raise Unsupported(f"skeleton {label!r}: no keypoint schema of the project holds {sorted(points)}")
    return s.Keypoints(
        points=[points.get(n, (0.0, 0.0, 0)) for n in criteria.keypoint_schemas[schema].names], schema_name=schema
    )


def _visible(x: float, y: float, outside: bool, occluded: bool) -> tuple[float, float, int]:
    """COCO's visibility of a CVAT point: outside is not labeled (0), occluded 1, else 2."""
    return (0.0, 0.0, 0) if outside else (x, y, 1 if occluded else 2)


def _skeleton(el: ET.Element, criteria: s.ProjectCriteria) -> s.Keypoints:
    points = {}
    for p in el.findall("points"):
        (xy,) = _xy(p.get("points", ""))
        points[p.get("label", "")] = _visible(*xy, p.get("outside") == "1", p.get("occluded") == "1")
    return skeleton(el.get("label", ""), points, criteria)


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
        yield imported_gold("cvat-gold", project_id, name, content, created)


def imported_gold(kind: str, project_id: str, image_name: str, content: s.Content, at: datetime) -> s.GoldAnswer:
    """The gold of one image of an export: its id from the image and the content, so loading
    the same export again publishes the same ids (the item is the image's, as the webhook's)."""
    item = item_id(image_name)
    return s.GoldAnswer(
        event_id=s.derive_id(kind, project_id, item, content.model_dump_json()),
        project_id=project_id,
        item_id=item,
        content=content,
        created_at=at,
        source="import",
    )


# ----------------------------------------------------------------------------- the REST API (the bridge)


@dataclass(frozen=True)
class Labels:
    """A job's labels as `GET /api/labels?job_id=` lists them: names by label id (sublabels, the
    points of a skeleton, included) and attribute names by spec id."""

    names: Mapping[int, str]
    attributes: Mapping[int, str]

    @classmethod
    def of(cls, results: Sequence[Mapping[str, Any]]) -> Labels:
        names: dict[int, str] = {}
        attributes: dict[int, str] = {}
        for label in [*results, *(sub for r in results for sub in r.get("sublabels") or [])]:
            names[int(label["id"])] = str(label["name"])
            for a in label.get("attributes") or []:
                attributes[int(a["id"])] = str(a["name"])
        return cls(names, attributes)

    def name(self, label_id: object) -> str:
        if not isinstance(label_id, int) or label_id not in self.names:
            raise Unsupported(f"label id {label_id!r} is not among the job's labels")
        return self.names[label_id]

    def attrs(self, values: Sequence[Mapping[str, Any]]) -> dict[str, s.AttributeValue]:
        out = {}
        for v in values:
            if v.get("spec_id") not in self.attributes:
                raise Unsupported(f"attribute spec id {v.get('spec_id')!r} is not among the job's labels")
            out[self.attributes[v["spec_id"]]] = attribute_value(str(v.get("value", "")))
        return out


def _pairs(flat: Sequence[float]) -> list[tuple[float, float]]:
    return [(float(flat[i]), float(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def api_objects(shape: Mapping[str, Any], labels: Labels, criteria: s.ProjectCriteria) -> list[s.AnnotatedObject]:
    """The objects of one shape of `GET /api/jobs/{id}/annotations` (pixels, task frames)."""
    kind, label, points = shape.get("type"), labels.name(shape.get("label_id")), shape.get("points") or []
    sid = str(shape.get("id") if shape.get("id") is not None else f"{kind}-{len(points)}")
    attrs = labels.attrs(shape.get("attributes") or [])
    geometry: s.Shape
    if kind == "rectangle":
        geometry = box(*(float(v) for v in points[:4]), float(shape.get("rotation") or 0.0))
    elif kind == "polygon":
        geometry = s.Polygon(points=_pairs(points))
    elif kind == "polyline":
        geometry = s.Polyline(points=_pairs(points))
    elif kind == "points":
        return [s.AnnotatedObject(id=f"{sid}.{k}", label=label, shape=s.Point(x=x, y=y), attributes=attrs)
                for k, (x, y) in enumerate(_pairs(points))]  # fmt: skip
    elif kind == "skeleton":
        named = {}
        for el in shape.get("elements") or []:
            ((x, y),) = _pairs(el.get("points") or [0, 0])
            named[labels.name(el.get("label_id"))] = _visible(x, y, bool(el.get("outside")), bool(el.get("occluded")))
        geometry = skeleton(label, named, criteria)
    else:
        raise Unsupported(f"{kind} shape {sid} (label {label!r}) is not supported")
    return [s.AnnotatedObject(id=sid, label=label, shape=geometry, attributes=attrs)]


def frame_contents(
    job: Mapping[str, Any],
    annotations: Mapping[str, Any],
    labels: Labels,
    meta: Mapping[str, Any],
    criteria: s.ProjectCriteria,
) -> dict[int, tuple[str, s.Content | Unsupported]]:
    """Each frame of a job: its image name and content, or why it cannot be converted. Frames are
    task-absolute; `data/meta`'s frames are the job's own, from its start frame. A frame without
    shapes is an answer too (nothing there). Tracks (video) are refused: their in-between frames
    are CVAT's interpolation, which goldstream does not redo."""
    start, stop = int(job["start_frame"]), int(job["stop_frame"])
    frames = meta.get("frames") or []
    deleted = set(meta.get("deleted_frames") or [])
    included = meta.get("included_frames")
    shapes: dict[int, list[Mapping[str, Any]]] = {}
    for shape in annotations.get("shapes") or []:
        shapes.setdefault(int(shape["frame"]), []).append(shape)
    tags: dict[int, list[str]] = {}
    out: dict[int, tuple[str, s.Content | Unsupported]] = {}
    for tag in annotations.get("tags") or []:
        tags.setdefault(int(tag["frame"]), []).append(labels.name(tag.get("label_id")))
    tracked = {int(x["frame"]) for track in annotations.get("tracks") or [] for x in track.get("shapes") or []}
    for frame in range(start, stop + 1):
        if frame in deleted or (included is not None and frame not in included) or frame - start >= len(frames):
            continue
        info = frames[frame - start]
        name = str(info["name"])
        try:
            if tracked:
                raise Unsupported("the job has tracks (video): annotate images with shapes, or load an export")
            objects = [o for shape in shapes.get(frame, []) for o in api_objects(shape, labels, criteria)]
            content = s.validate(
                s.Content,
                {
                    "objects": [o.model_dump(mode="json", by_alias=True) for o in objects],
                    "classifications": {"tag": sorted(set(tags[frame]))} if frame in tags else {},
                    "image": {"width": int(info["width"]), "height": int(info["height"])},
                },
            )
            out[frame] = (name, content)
        except Unsupported as exc:
            out[frame] = (name, exc)
        except (s.SchemaError, KeyError, TypeError, ValueError) as exc:
            out[frame] = (name, Unsupported(f"{type(exc).__name__}: {exc}"))
    return out


@dataclass(frozen=True)
class CvatProjects:
    """Which goldstream project a CVAT project feeds: mapped, else `cvat-<id>` (`cvat-task-<id>`
    for a task in no project)."""

    mapping: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, job: Mapping[str, Any]) -> str:
        if job.get("project_id") is None:
            return f"cvat-task-{job.get('task_id')}"
        return self.mapping.get(str(job["project_id"]), f"cvat-{job['project_id']}")


def submitted(job: Mapping[str, Any]) -> bool:
    """Whether the annotator is done with the job: CVAT's state `completed` in the annotation
    stage. Every save also fires `update:job`; those are ignored until then."""
    return job.get("state") == "completed" and job.get("stage", "annotation") == "annotation"


def job_annotations(
    job: Mapping[str, Any],
    worker: str,
    contents: Mapping[int, tuple[str, s.Content | Unsupported]],
    project_id: str,
    submitted_at: datetime,
) -> tuple[list[s.AnnotationSubmitted], list[tuple[int, str, Unsupported]]]:
    """One AnnotationSubmitted per converted frame, and the frames that could not be. An id
    depends on the job, the frame and the content: a repeated delivery, or a save that left the
    frame unchanged, is the same event (applied once); a changed frame is a resubmission."""
    out, refused = [], []
    for frame, (name, content) in sorted(contents.items()):
        if isinstance(content, Unsupported):
            refused.append((frame, name, content))
            continue
        out.append(
            s.AnnotationSubmitted(
                event_id=s.derive_id("cvat", project_id, str(job["id"]), str(frame), content.model_dump_json()),
                project_id=project_id,
                item_id=item_id(name),
                worker_id=worker,
                content=content,
                submitted_at=submitted_at,
                source="cvat",
                external_id=f"job/{job['id']}/frame/{frame}",
            )
        )
    return out, refused


__all__ = [
    "CvatProjects",
    "Labels",
    "Unsupported",
    "api_objects",
    "content_of",
    "frame_contents",
    "gold_from_xml",
    "imported_gold",
    "is_cvat_xml",
    "item_id",
    "job_annotations",
    "submitted",
]
