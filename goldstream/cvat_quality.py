"""CVAT quality settings -> goldstream criteria (`goldstream criteria import-cvat`, issue #12).

A team moving from CVAT's quality reports wants goldstream to judge as CVAT did before it judges
better. CVAT matches shapes on similarity against one `iou_threshold` (IoU for boxes and
polygons, OKS for points and skeletons, its line similarity for polylines), counts a match whole
(`accuracy = valid / (matched + mismatched + missing + extra)`), scores keypoints with one
`oks_sigma` for every point, and passes a job on one `target_metric` above
`target_metric_threshold`. Attribute mismatches are only warnings there. The import maps each of
these onto its goldstream equivalent and says, setting by setting, what it could not mirror.

Settings come as `GET /api/quality/settings/{id}` returns them (the flat layout, CVAT 2.x); the
job's labels (`GET /api/labels?job_id=` or `?task_id=`), when given, add the taxonomy: label
names, skeletons as keypoint schemas, attribute value lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from goldstream import schemas as s

IGNORED = {
    "low_overlap_threshold": "CVAT only warns on low overlap; goldstream's similarity already lowers the score",
    "point_size_base": "goldstream scales OKS by the gold object's area (COCO), not CVAT's group box",
    "compare_groups": "groups are not compared",
    "group_match_threshold": "groups are not compared",
    "check_covered_annotations": "covered annotations are not checked",
    "object_visibility_threshold": "covered annotations are not checked",
    "panoptic_comparison": "regions are compared whole, not by their visible part",
    "line_orientation_threshold": "orientation is all or nothing per label (orientation_matters)",
    "max_validations_per_job": "a review workflow setting, not a scoring one",
    "job_filter": "every job's annotations are scored",
}
KNOWN = {"id", "task_id", "project_id", "inherit", "created_date", "updated_date", "iou_threshold", "oks_sigma",
         "line_thickness", "compare_line_orientation", "compare_attributes", "empty_is_annotated", "target_metric",
         "target_metric_threshold", *IGNORED}  # fmt: skip


class Unsupported(ValueError):
    """Settings this import cannot read; the message says why."""


def _schema(label: Mapping[str, Any], sigma: float) -> s.KeypointSchema:
    names = [str(x["name"]) for x in label.get("sublabels") or []]
    if not names:
        raise Unsupported(f"skeleton label {label.get('name')!r} has no points (sublabels)")
    return s.KeypointSchema(names=names, sigmas=[sigma] * len(names))


def _attribute(a: Mapping[str, Any]) -> s.AttributeSpec:
    kind = a.get("input_type")
    if kind == "number":
        return s.AttributeSpec(compare="numeric", tolerance=0.0)
    if kind in ("select", "radio"):
        return s.AttributeSpec(values=[str(v) for v in a.get("values") or []] or None)
    return s.AttributeSpec(compare="exact")


def criteria_from_cvat(
    settings: Mapping[str, Any],
    project_id: str,
    labels: Sequence[Mapping[str, Any]] | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[s.ProjectCriteria, list[str]]:
    """The criteria that judge as CVAT's settings do, and a note per setting not mirrored."""
    if "iou_threshold" not in settings:
        raise Unsupported(
            "no iou_threshold: not CVAT 2.x quality settings (GET /api/quality/settings/{id}); newer CVAT keeps "
            "them per shape type in /api/quality/settings/requirements, which this import does not read yet"
        )
    notes: list[str] = []
    iou = float(settings["iou_threshold"])
    sigma = float(settings.get("oks_sigma", 0.09))
    data: dict[str, Any] = {
        "project_id": project_id,
        # one threshold on each family's similarity, as CVAT's matcher; points keep their pixel tolerance
        "default_threshold": {"box": iou, "region": iou, "keypoints": iou, "polyline": iou, "point": 0.0},
        "object_metric": "f1",  # a match counts whole, as CVAT's accuracy counts it
        "empty_item_correct": bool(settings.get("empty_is_annotated", False)),
    }
    metric = str(settings.get("target_metric", "accuracy"))
    if metric not in ("accuracy", "precision", "recall"):
        raise Unsupported(f"target_metric {metric!r} is not accuracy, precision or recall")
    threshold = float(settings.get("target_metric_threshold", 0.7))
    data["pass_threshold"] = threshold
    data["targets"] = {"accuracy": None, "precision": None, "recall": None, "f1": None, "item_score": threshold,
                       metric: threshold}  # fmt: skip
    if not settings.get("compare_attributes", True):
        data["weights"] = {"attributes": 0.0}
    else:
        notes.append("compare_attributes: goldstream scores attributes (CVAT only warns); set weights.attributes "
                     "to 0 to leave them out of the item score")  # fmt: skip
    thickness = settings.get("line_thickness")
    if thickness is not None and image_size is not None:
        # CVAT's line similarity spreads 2 * line_thickness * sqrt(image area) pixels
        data["line_tolerance"] = max(2 * float(thickness) * (image_size[0] * image_size[1]) ** 0.5, 1e-6)
    elif thickness is not None:
        notes.append("line_thickness: relative to the image size; give --image-size WxH to convert it to pixels")
    orientation = bool(settings.get("compare_line_orientation", True))
    if labels is not None:
        specs, schemas = [], {}
        for label in labels:
            name = str(label["name"])
            spec: dict[str, Any] = {"name": name}
            if label.get("type") == "skeleton":
                schemas[name] = _schema(label, sigma).model_dump(mode="json")
                spec["keypoint_schema"] = name
            if label.get("type") == "polyline":
                spec["orientation_matters"] = orientation
            attributes = {str(a["name"]): _attribute(a).model_dump(mode="json") for a in label.get("attributes") or []}
            if attributes:
                spec["attributes"] = attributes
            specs.append(spec)
        data["labels"] = specs
        data["keypoint_schemas"] = schemas
    else:
        notes.append(f"oks_sigma {sigma}: give the labels (--labels) to make each skeleton a keypoint schema with it")
        if orientation:
            notes.append("compare_line_orientation: give the labels (--labels) to set it on polyline labels")
    for key, why in IGNORED.items():
        if key in settings:
            notes.append(f"{key} not mirrored: {why}")
    unknown = sorted(set(settings) - KNOWN)
    if unknown:
        notes.append(f"not read (unknown to this import): {', '.join(unknown)}")
    return s.validate(s.ProjectCriteria, data), notes


def criteria_yaml(criteria: s.ProjectCriteria) -> str:
    """The criteria as a file for `goldstream criteria set`: only what differs from the defaults."""
    import yaml

    data = criteria.model_dump(mode="json", exclude_defaults=True, exclude={"event_id"}, by_alias=True)
    return yaml.safe_dump({"project_id": criteria.project_id, **data}, sort_keys=False)


__all__ = ["Unsupported", "criteria_from_cvat", "criteria_yaml"]
