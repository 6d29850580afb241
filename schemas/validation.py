"""Checks that need the project's criteria, not just the message: labels, shapes, keypoint counts.

A message can be well-formed and still wrong for its project (a label outside the taxonomy, 15
keypoints for a 17-point schema). These checks raise the same SchemaError as decoding, with the
field path, so both kinds of rejection reach the dead-letter topic alike.
"""

from __future__ import annotations

from goldstream.schemas.base import FieldError, SchemaError
from goldstream.schemas.content import AnnotatedObject, Content, Keypoints
from goldstream.schemas.criteria import LabelSpec, ProjectCriteria


def keypoint_schema_name(obj: AnnotatedObject, criteria: ProjectCriteria) -> str | None:
    """Which keypoint schema an object's keypoints follow: its own, its label's, or the only one."""
    assert isinstance(obj.shape, Keypoints)
    if obj.shape.schema_name:
        return obj.shape.schema_name
    spec = criteria.label(obj.label)
    if spec is not None and spec.keypoint_schema:
        return spec.keypoint_schema
    if len(criteria.keypoint_schemas) == 1:
        return next(iter(criteria.keypoint_schemas))
    return None


def content_errors(content: Content, criteria: ProjectCriteria, where: str = "content") -> list[FieldError]:
    """Every way `content` breaks the project's criteria (empty when it fits)."""
    errors: list[FieldError] = []
    closed = bool(criteria.labels)
    if not closed and not criteria.classifications and not any(o.shape.type == "keypoints" for o in content.objects):
        return errors  # an open project: nothing here can be wrong for it
    for i, obj in enumerate(content.objects):
        errors += _object_errors(obj, criteria.label(obj.label), criteria, where, i)
    for taxonomy, chosen in content.classifications.items():
        loc = f"{where}.classifications.{taxonomy}"
        cspec = criteria.classifications.get(taxonomy)
        if cspec is None:
            if criteria.classifications:
                errors.append(FieldError(loc, f"no taxonomy {taxonomy!r} in the project", "unknown_taxonomy"))
            continue
        unknown = [c for c in chosen if c not in cspec.labels]
        if unknown:
            errors.append(FieldError(loc, f"labels {unknown} are not in taxonomy {taxonomy!r}", "unknown_label"))
        if not cspec.multi and len(chosen) > 1:
            errors.append(FieldError(loc, f"taxonomy {taxonomy!r} takes one label, got {len(chosen)}", "single_label"))
    return errors


def _object_errors(
    obj: AnnotatedObject, spec: LabelSpec | None, criteria: ProjectCriteria, where: str, i: int
) -> list[FieldError]:
    """Every way one object breaks the project's criteria, in the order they are reported. The
    location is formatted only for an error: this runs for every object of every input."""
    if spec is None:
        if criteria.labels:
            msg = f"label {obj.label!r} is not in the project's taxonomy"
            return [FieldError(f"{where}.objects.{i}.label", msg, "unknown_label")]
        return _keypoint_errors(obj, criteria, where, i) if type(obj.shape) is Keypoints else []
    errors: list[FieldError] = []
    if spec.shape_types and obj.shape.type not in spec.shape_types:
        msg = f"label {obj.label!r} takes {', '.join(spec.shape_types)}, not {obj.shape.type}"
        errors.append(FieldError(f"{where}.objects.{i}.shape.type", msg, "shape_type"))
    if type(obj.shape) is Keypoints:
        errors += _keypoint_errors(obj, criteria, where, i)
    if spec.attributes:
        for attr in obj.attributes:
            if attr not in spec.attributes:
                msg = f"label {obj.label!r} has no attribute {attr!r}"
                errors.append(FieldError(f"{where}.objects.{i}.attributes.{attr}", msg, "unknown_attribute"))
    return errors


def _keypoint_errors(obj: AnnotatedObject, criteria: ProjectCriteria, where: str, i: int) -> list[FieldError]:
    assert isinstance(obj.shape, Keypoints)
    name = keypoint_schema_name(obj, criteria)
    schema = criteria.keypoint_schemas.get(name) if name else None
    loc = f"{where}.objects.{i}.shape"
    if schema is None:
        return [FieldError(f"{loc}.schema", f"no keypoint schema {name!r} in the project", "unknown_keypoint_schema")]
    if len(obj.shape.points) != len(schema.names):
        msg = f"{len(obj.shape.points)} keypoints, schema {name!r} has {len(schema.names)}"
        return [FieldError(f"{loc}.points", msg, "keypoint_count")]
    return []


def check_content(content: Content, criteria: ProjectCriteria, where: str = "content") -> None:
    """Raise SchemaError when `content` does not fit the project's criteria."""
    errors = content_errors(content, criteria, where)
    if errors:
        raise SchemaError(errors, "Content")
