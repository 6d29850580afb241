"""Label Studio annotation results -> goldstream `Content`, with exact geometry (issue #12).

Label Studio stores an image region in percent of the image's `original_width` and
`original_height`, anchored at the region's top-left corner, and a rectangle's `rotation` in
degrees clockwise on screen about that same corner. goldstream stores pixels, and a rotated box
by its centre (`RotatedBBox`), so the corner's rotation has to be carried to the centre here, once;
a reviewer comparing the two tools must see the same box. Keypoints are one region per point in
Label Studio, tied into an instance by `relation` results; goldstream wants one keypoint set per
instance in the order of the project's keypoint schema. Per-region classifications (a `choices`,
`textarea`, `number` or `rating` result carrying a region's id) become that object's attributes;
the others become the item's classifications.

Anything this cannot convert faithfully raises `Unsupported`, naming the result: the bridge
answers 4xx and dead-letters the delivery with its raw body rather than score something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from goldstream import schemas as s

REGION_TYPES = ("rectanglelabels", "polygonlabels", "keypointlabels")
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ATTRIBUTE_TYPES = ("choices", "textarea", "number", "rating")


class Unsupported(ValueError):
    """A result that cannot be converted faithfully; the message says which and why."""


def _size(results: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    sizes = {(r["original_width"], r["original_height"]) for r in results if "original_width" in r}
    if len(sizes) > 1:
        raise Unsupported(f"results give different image sizes: {sorted(sizes)}")
    if not sizes:
        return None
    ((w, h),) = sizes
    if not (isinstance(w, int | float) and isinstance(h, int | float) and w > 0 and h > 0):
        raise Unsupported(f"image size {w} x {h} is not positive")
    return float(w), float(h)


def _label(r: Mapping[str, Any]) -> str:
    labels = r.get("value", {}).get(r["type"])
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise Unsupported(f"region {r.get('id')!r} ({r['type']}) must carry exactly one label, not {labels!r}")
    return labels[0]


def rectangle(value: Mapping[str, Any], width: float, height: float) -> s.BBox | s.RotatedBBox:
    """A Label Studio rectangle in pixels: rotated about its top-left corner there, about its
    centre here (the same box on screen)."""
    x, y = value["x"] / 100 * width, value["y"] / 100 * height
    w, h = value["width"] / 100 * width, value["height"] / 100 * height
    angle = float(value.get("rotation") or 0.0) % 360
    if angle == 0:
        return s.BBox(x=x, y=y, w=w, h=h)
    t = math.radians(angle)  # clockwise on screen (y down): (dx, dy) -> (dx cos - dy sin, dx sin + dy cos)
    cx = x + w / 2 * math.cos(t) - h / 2 * math.sin(t)
    cy = y + w / 2 * math.sin(t) + h / 2 * math.cos(t)
    return s.RotatedBBox(cx=cx, cy=cy, w=w, h=h, angle=angle if angle <= 180 else angle - 360)


def polygon(value: Mapping[str, Any], width: float, height: float) -> s.Polygon:
    return s.Polygon(points=[(px / 100 * width, py / 100 * height) for px, py in value["points"]])


def _attribute(r: Mapping[str, Any]) -> s.AttributeValue:
    v = r.get("value", {})
    kind = r["type"]
    if kind == "choices":
        choices = v.get("choices")
        if not isinstance(choices, list) or not choices:
            raise Unsupported(f"result {r.get('id')!r}: choices must be a non-empty list")
        return choices[0] if len(choices) == 1 else list(choices)
    if kind == "textarea":
        text = v.get("text")
        return text[0] if isinstance(text, list) and len(text) == 1 else list(text or [])
    return v[kind]  # number, rating


def _keypoint_sets(
    points: Sequence[Mapping[str, Any]],
    links: Sequence[tuple[str, str]],
    criteria: s.ProjectCriteria,
    width: float,
    height: float,
) -> list[s.AnnotatedObject]:
    """Group keypoint regions joined by relations into instances, each laid out in the order of
    the keypoint schema holding all its names; unlabeled schema points are (0, 0, 0)."""
    parent = {p["id"]: p["id"] for p in points}

    def root(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(root(p["id"]), []).append(p)
    out = []
    for members in groups.values():
        names = [_label(p) for p in members]
        if len(set(names)) != len(names):
            raise Unsupported(f"keypoint instance {sorted(p['id'] for p in members)} names a point twice: {names}")
        schema = next((k for k, sch in sorted(criteria.keypoint_schemas.items()) if set(names) <= set(sch.names)), None)
        if schema is None:
            raise Unsupported(f"no keypoint schema of the project holds all of {sorted(names)}")
        spec = next((lab for lab in criteria.labels if lab.keypoint_schema == schema), None)
        at = {n: p for n, p in zip(names, members, strict=True)}
        xyv = [
            (at[n]["value"]["x"] / 100 * width, at[n]["value"]["y"] / 100 * height, 2) if n in at else (0.0, 0.0, 0)
            for n in criteria.keypoint_schemas[schema].names
        ]
        first = min(p["id"] for p in members)
        out.append(
            s.AnnotatedObject(
                id=first, label=spec.name if spec else schema, shape=s.Keypoints(points=xyv, schema_name=schema)
            )
        )
    return out


def content_of(results: Sequence[Mapping[str, Any]], criteria: s.ProjectCriteria | None = None) -> s.Content:
    """The `Content` of a Label Studio annotation's (or prediction's) `result` list."""
    criteria = criteria or s.ProjectCriteria(project_id="label-studio")
    size = _size(results)
    regions = {r["id"]: r for r in results if r.get("type") in REGION_TYPES and "id" in r}
    if regions and size is None:
        raise Unsupported("regions without original_width / original_height cannot be placed in pixels")
    width, height = size or (1.0, 1.0)
    objects: dict[str, s.AnnotatedObject] = {}
    attributes: dict[str, dict[str, s.AttributeValue]] = {}
    classifications: dict[str, list[str]] = {}
    relations: list[tuple[str, str, str]] = []
    keypoints = []
    for r in results:
        kind = r.get("type")
        if kind == "rectanglelabels":
            shape: s.BBox | s.RotatedBBox | s.Polygon = rectangle(r["value"], width, height)
            objects[r["id"]] = s.AnnotatedObject(id=r["id"], label=_label(r), shape=shape)
        elif kind == "polygonlabels":
            objects[r["id"]] = s.AnnotatedObject(id=r["id"], label=_label(r), shape=polygon(r["value"], width, height))
        elif kind == "keypointlabels":
            keypoints.append(r)
        elif kind in ATTRIBUTE_TYPES and r.get("id") in regions:
            attributes.setdefault(r["id"], {})[r["from_name"]] = _attribute(r)
        elif kind == "choices":
            value = _attribute(r)
            classifications[r["from_name"]] = value if isinstance(value, list) else [value]  # type: ignore[list-item]
        elif kind == "relation":
            labels = r.get("labels") or []
            relations.append((r["from_id"], r["to_id"], labels[0] if labels else "related"))
        else:
            raise Unsupported(f"result {r.get('id')!r} of type {kind!r} is not supported")
    kp_ids = {p["id"] for p in keypoints}
    links = [(a, b) for a, b, _ in relations if a in kp_ids and b in kp_ids]
    kept = [obj.model_copy(update={"attributes": attributes.get(i, {})}) for i, obj in objects.items()]
    kept += _keypoint_sets(keypoints, links, criteria, width, height)
    rels = [s.Relationship(subject=a, predicate=p, object=b) for a, b, p in relations if a in objects and b in objects]
    image = s.ImageSize(width=round(width), height=round(height)) if size else None
    return s.validate(
        s.Content,
        {
            "objects": [o.model_dump(mode="json", by_alias=True) for o in kept],
            "classifications": classifications,
            "relationships": [x.model_dump(mode="json") for x in rels],
            "image": image.model_dump(mode="json") if image else None,
        },
    )


def task_item_id(task_id: int | str) -> str:
    """goldstream's item id of a Label Studio task: the bridge and the gold loader must agree."""
    return f"ls-{task_id}"


def is_export(doc: object) -> bool:
    """Whether parsed JSON looks like a Label Studio JSON export (a list of tasks)."""
    return (
        isinstance(doc, list)
        and bool(doc)
        and all(isinstance(t, dict) and "data" in t and "annotations" in t for t in doc)
    )


Published = tuple[str, str | None, s.Message]  # (logical topic, key, message)


class BadDelivery(ValueError):
    """A delivery that cannot become goldstream messages; `reason` is the dead letter's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LabelStudioProjects:
    """Which goldstream project a Label Studio project feeds: mapped, else `ls-<id>`."""

    mapping: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, ls_project: object) -> str:
        return self.mapping.get(str(ls_project), f"ls-{ls_project}")


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise BadDelivery("schema", f"annotation.{what} is missing")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadDelivery("schema", f"annotation.{what} {value!r} is not an ISO 8601 time") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _id_of(value: object, what: str) -> str:
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise BadDelivery("schema", f"{what} is missing")
    return str(value)


def delivery_project(payload: Mapping[str, Any], projects: Callable[[object], str]) -> str | None:
    """The goldstream project a delivery feeds, when it names its Label Studio project."""
    a = payload.get("annotation")
    value = a.get("project", payload.get("project")) if isinstance(a, dict) else payload.get("project")
    try:
        return projects(_id_of(value, "project"))
    except BadDelivery:
        return None


def label_studio_messages(
    payload: Mapping[str, Any], projects: Callable[[object], str], criteria: s.ProjectCriteria | None = None
) -> tuple[list[Published], str | None]:
    """The messages a Label Studio delivery stands for, or none and why it is ignored.

    A submitted annotation becomes an `AnnotationSubmitted`; one marked ground truth (the star)
    a `GoldAnswer` of its task; a skipped task (`was_cancelled`) and other actions nothing."""
    action = payload.get("action")
    if action not in ANNOTATION_ACTIONS:
        return [], f"action {action!r} carries no annotation to score"
    a = payload.get("annotation")
    if not isinstance(a, dict):
        raise BadDelivery("schema", f"{action} without an annotation object")
    if a.get("was_cancelled"):
        return [], "a skipped task (was_cancelled)"
    task = _id_of(a.get("task", payload.get("task")), "annotation.task")
    ls_project = _id_of(a.get("project", payload.get("project")), "annotation.project")
    ann_id = _id_of(a.get("id"), "annotation.id")
    updated = _time(a.get("updated_at") or a.get("created_at"), "updated_at")
    result = a.get("result")
    if not isinstance(result, list):
        raise BadDelivery("schema", "annotation.result is not a list")
    data = _task_data(payload)
    review = REVIEW_FIELD in data
    try:
        content = content_of([r for r in result if not _is_review_control(r)] if review else result, criteria)
    except Unsupported as exc:
        raise BadDelivery("unsupported", str(exc)) from None
    except s.SchemaError as exc:
        raise BadDelivery("schema", str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BadDelivery("schema", f"annotation.result: {type(exc).__name__}: {exc}") from None
    try:
        if review:
            return _review_messages(a, data, ann_id, updated, content, result)
        return _messages(a, projects(ls_project), task, ann_id, updated, content)
    except ValidationError as exc:  # a mapped project id or a user id that is not an id
        raise BadDelivery("schema", str(s.SchemaError.from_validation(exc, "message"))) from None


def _messages(
    a: Mapping[str, Any], project: str, task: str, ann_id: str, updated: datetime, content: s.Content
) -> tuple[list[Published], str | None]:
    item = task_item_id(task)
    if a.get("ground_truth"):
        gold = s.GoldAnswer(
            event_id=s.derive_id("label-studio-gold", project, task, ann_id, updated.isoformat()),
            project_id=project,
            item_id=item,
            content=content,
            created_at=updated,
            source="import",
        )
        return [("gold", item, gold)], None
    lead = a.get("lead_time")
    started = updated - timedelta(seconds=lead) if isinstance(lead, int | float) and 0 <= lead < 1e7 else None
    ann = s.AnnotationSubmitted(
        event_id=s.derive_id("label-studio", project, ann_id, updated.isoformat()),
        project_id=project,
        item_id=item,
        worker_id=f"ls-user-{_id_of(a.get('completed_by'), 'annotation.completed_by')}",
        content=content,
        submitted_at=updated,
        started_at=started,
        source="label_studio",
        external_id=ann_id,
    )
    return [("annotations", item, ann)], None


# ----------------------------------------------------------------------------- reviews back in the tool

REVIEW_FIELD = "goldstream_annotation"
"""The task data field that makes a Label Studio task a goldstream review task: the reviewed
annotation's event id. The other `goldstream_*` fields say whose it is and why it is there."""
VERDICT = "goldstream_verdict"
GOLD = "goldstream_gold"
COMMENT = "goldstream_comment"
SUMMARY = "goldstream_summary"
PROMOTE_CHOICE = "promote to gold"


def _is_review_control(r: Mapping[str, Any]) -> bool:
    return str(r.get("from_name", "")).startswith("goldstream_")


def _task_data(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    task = payload.get("task")
    data = task.get("data") if isinstance(task, dict) else None
    return data if isinstance(data, dict) else {}


def _choice(result: Sequence[Mapping[str, Any]], name: str) -> list[str]:
    for r in result:
        if r.get("from_name") == name and r.get("type") == "choices":
            return [str(c) for c in r.get("value", {}).get("choices", [])]
    return []


def _review_messages(
    a: Mapping[str, Any],
    data: Mapping[str, Any],
    ann_id: str,
    updated: datetime,
    content: s.Content,
    result: Sequence[Mapping[str, Any]],
) -> tuple[list[Published], str | None]:
    """A reviewer's submission on a review task: the verdict, the correction (the regions the
    reviewer left, when the verdict is correct), and whether it becomes gold."""
    verdicts = _choice(result, VERDICT)
    if len(verdicts) != 1 or verdicts[0] not in {v.value for v in s.Verdict}:
        raise BadDelivery("schema", f"a review needs one {VERDICT} of approve / correct / reject, not {verdicts}")
    verdict = s.Verdict(verdicts[0])
    comment = next((r.get("value", {}).get("text") for r in result if r.get("from_name") == COMMENT), None)
    if isinstance(comment, list):
        comment = "\n".join(str(x) for x in comment)
    fields = {k: data.get(f"goldstream_{k}") for k in ("project", "item", "worker")}
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise BadDelivery("schema", "a review task needs goldstream_project, goldstream_item and goldstream_worker")
    review = s.ReviewResult(
        event_id=s.derive_id("label-studio-review", str(data[REVIEW_FIELD]), ann_id, updated.isoformat()),
        project_id=fields["project"],
        item_id=fields["item"],
        annotation_event_id=str(data[REVIEW_FIELD]),
        worker_id=fields["worker"],
        reviewer_id=f"ls-user-{_id_of(a.get('completed_by'), 'annotation.completed_by')}",
        verdict=verdict,
        corrected=content if verdict is s.Verdict.CORRECT else None,
        promote_to_gold=PROMOTE_CHOICE in _choice(result, GOLD) and verdict is not s.Verdict.REJECT,
        comment=comment or None,
        reviewed_at=updated,
    )
    return [("reviews", review.item_id, review)], None


def review_config(label_config: str) -> str:
    """A review project's labeling config: the source project's, plus what the reviewer needs
    (why the annotation is here, a verdict, promote to gold, a comment). The goldstream_*
    controls point at the summary text, so they never mix with the regions being reviewed."""
    block = (
        f'<View style="margin-top: 1em"><Header value="goldstream review"/>'
        f'<Text name="{SUMMARY}" value="${SUMMARY}"/>'
        f'<Choices name="{VERDICT}" toName="{SUMMARY}" choice="single-radio" required="true" showInline="true">'
        '<Choice value="approve"/><Choice value="correct"/><Choice value="reject"/></Choices>'
        f'<Choices name="{GOLD}" toName="{SUMMARY}" choice="multiple"><Choice value="{PROMOTE_CHOICE}"/></Choices>'
        f'<TextArea name="{COMMENT}" toName="{SUMMARY}" placeholder="comment (optional)" maxSubmissions="1"/>'
        "</View>"
    )
    end = label_config.rstrip().rfind("</View>")
    if end < 0:
        raise Unsupported("the labeling config has no closing </View>")
    return label_config[:end] + block + label_config[end:]


@dataclass(frozen=True)
class Controls:
    """The labeling config's control tags that hold regions, by kind: where a prediction's
    results must point (`from_name`, `to_name`) to show on the reviewer's image."""

    by_type: Mapping[str, tuple[str, str]]
    choices: frozenset[str] = frozenset()

    @classmethod
    def of(cls, parsed_label_config: Mapping[str, Any]) -> Controls:
        by_type: dict[str, tuple[str, str]] = {}
        choices = set()
        for name, tag in parsed_label_config.items():
            kind = str(tag.get("type", "")).lower()
            targets = tag.get("to_name") or []
            if not targets or name.startswith("goldstream_"):
                continue
            by_type.setdefault(kind, (name, targets[0]))
            if kind == "choices":
                choices.add(name)
        return cls(by_type, frozenset(choices))


def _region(obj: s.AnnotatedObject, control: tuple[str, str], kind: str, value: dict, size: s.ImageSize) -> dict:
    return {
        "id": obj.id, "type": kind, "from_name": control[0], "to_name": control[1],
        "original_width": size.width, "original_height": size.height, "image_rotation": 0,
        "value": {**value, kind: [obj.label]},
    }  # fmt: skip


def _rect_value(shape: s.BBox | s.RotatedBBox, size: s.ImageSize) -> dict:
    if isinstance(shape, s.BBox):
        x, y, w, h, angle = shape.x, shape.y, shape.w, shape.h, 0.0
    else:  # the top-left corner is the centre less the rotated half-diagonal (the inverse of `rectangle`)
        w, h, t = shape.w, shape.h, math.radians(shape.angle)
        x = shape.cx - (w / 2 * math.cos(t) - h / 2 * math.sin(t))
        y = shape.cy - (w / 2 * math.sin(t) + h / 2 * math.cos(t))
        angle = shape.angle % 360
    W, H = size.width, size.height
    return {"x": x / W * 100, "y": y / H * 100, "width": w / W * 100, "height": h / H * 100, "rotation": angle}


def results_of(
    content: s.Content, controls: Controls, criteria: s.ProjectCriteria | None = None
) -> tuple[list[dict], list[str]]:
    """Label Studio results showing `content` on the review project's image: rectangles,
    polygons, keypoints (one region per labeled point, tied by relations), attributes as
    per-region choices, classifications, relations. The inverse of `content_of`; what it cannot
    show (no control of that kind, no image size, polylines, masks) is listed, not dropped silently."""
    out: list[dict] = []
    skipped: list[str] = []
    size = content.image
    for obj in content.objects:
        shape = obj.shape
        if size is None:
            skipped.append(f"{obj.id} (no image size)")
            continue
        rect, poly, kp = (controls.by_type.get(k) for k in REGION_TYPES)
        if isinstance(shape, s.BBox | s.RotatedBBox) and rect:
            out.append(_region(obj, rect, "rectanglelabels", _rect_value(shape, size), size))
            target = rect[1]
        elif isinstance(shape, s.Polygon) and poly and not shape.holes:
            points = [[x / size.width * 100, y / size.height * 100] for x, y in shape.points]
            out.append(_region(obj, poly, "polygonlabels", {"points": points}, size))
            target = poly[1]
        elif isinstance(shape, s.Keypoints) and kp:
            out += _keypoint_results(obj, shape, kp, criteria, size)
            continue
        else:
            skipped.append(f"{obj.id} ({shape.type} {obj.label})")
            continue
        for name, value in obj.attributes.items():  # per-region choices carry the region's id
            if name in controls.choices:
                choices = value if isinstance(value, list) else [value]
                out.append({"id": obj.id, "type": "choices", "from_name": name, "to_name": target,
                            "value": {"choices": [str(c) for c in choices]}})  # fmt: skip
    for taxonomy, labels in content.classifications.items():
        if taxonomy in controls.choices:
            target = next(iter(controls.by_type.values()))[1]
            out.append({"type": "choices", "from_name": taxonomy, "to_name": target, "value": {"choices": labels}})
    for rel in content.relationships:
        out.append({"type": "relation", "from_id": rel.subject, "to_id": rel.object, "direction": "right",
                    "labels": [rel.predicate]})  # fmt: skip
    return out, skipped


def _keypoint_results(
    obj: s.AnnotatedObject,
    shape: s.Keypoints,
    control: tuple[str, str],
    criteria: s.ProjectCriteria | None,
    size: s.ImageSize,
) -> list[dict]:
    schema = criteria.keypoint_schemas.get(shape.schema_name or "") if criteria else None
    names = schema.names if schema else [str(k) for k in range(len(shape.points))]
    first = next((k for k, (_, _, v) in enumerate(shape.points) if v > 0), -1)
    regions = [  # the first point takes the object's id: `content_of` names an instance by its least id
        {"id": obj.id if k == first else f"{obj.id}-{k}", "type": "keypointlabels",
         "from_name": control[0], "to_name": control[1],
         "original_width": size.width, "original_height": size.height, "image_rotation": 0,
         "value": {"x": x / size.width * 100, "y": y / size.height * 100, "width": 0.5, "keypointlabels": [name]}}
        for k, ((x, y, v), name) in enumerate(zip(shape.points, names, strict=True)) if v > 0
    ]  # fmt: skip
    links = [
        {"type": "relation", "from_id": regions[0]["id"], "to_id": r["id"], "direction": "right"} for r in regions[1:]
    ]
    return regions + links


def gold_from_export(
    tasks: Sequence[Mapping[str, Any]], project_id: str, criteria: s.ProjectCriteria | None = None
) -> Iterator[s.GoldAnswer]:
    """Gold answers from a Label Studio JSON export: each task's ground-truth annotation (the
    star in Label Studio), the latest one where a task has several, converted as the webhook's
    delivery of it is (the same ids). Cancelled (skipped) annotations are never gold."""
    for task in tasks:
        golds = []
        for a in task.get("annotations", []):
            if not a.get("ground_truth") or a.get("was_cancelled"):
                continue
            delivery = {"action": "ANNOTATION_UPDATED", "annotation": {**a, "task": task.get("id"), "project": 0}}
            try:
                messages, _ = label_studio_messages(delivery, lambda _: project_id, criteria)
            except BadDelivery as exc:
                raise Unsupported(f"task {task.get('id')} annotation {a.get('id')}: {exc}") from None
            golds += [m for _, _, m in messages if isinstance(m, s.GoldAnswer)]
        if golds:
            yield max(golds, key=lambda g: g.created_at)


__all__ = [
    "REVIEW_FIELD",
    "BadDelivery",
    "Controls",
    "LabelStudioProjects",
    "Published",
    "Unsupported",
    "content_of",
    "delivery_project",
    "gold_from_export",
    "is_export",
    "label_studio_messages",
    "polygon",
    "rectangle",
    "results_of",
    "review_config",
    "task_item_id",
]
