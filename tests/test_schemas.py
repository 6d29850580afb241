"""Message contracts: every model round-trips through bytes; every invalid input is rejected
with a SchemaError that names the field, and nothing else escapes `decode`."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from goldstream import schemas as s
from tests.strategies import MESSAGES, annotations

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("model", list(MESSAGES), ids=lambda m: m.__name__)
def test_every_message_round_trips_through_bytes(model: type[s.Message]) -> None:
    @SETTINGS
    @given(MESSAGES[model])
    def check(message: s.Message) -> None:
        raw = message.to_bytes()
        back = model.from_bytes(raw)
        assert back == message
        assert back.to_bytes() == raw  # stable bytes: re-emitting a message changes nothing
        assert orjson.loads(raw)["schema_version"] == s.SCHEMA_VERSION

    check()


def test_all_design_messages_have_a_model_and_a_topic() -> None:
    names = {m.__name__: m.topic for m in s.MESSAGES}
    assert names == {
        "AnnotationSubmitted": "annotations",
        "GoldAnswer": "gold",
        "ReviewResult": "reviews",
        "ScoreRecord": "scores",
        "Escalation": "escalations",
        "QualityAlert": "alerts",
        "ProjectCriteria": "projects",
        "DeadLetter": "deadletter",
        "RoundTimeout": "control",
    }


# ----------------------------------------------------------------------------- invalid input

Path = tuple[str | int, ...]
UNION_MEMBERS = set(s.SHAPE_TYPES) | {"str", "int", "float", "bool"}


def _norm(path: Path) -> Path:
    """Drop the union-member segments pydantic inserts (shape tags, 'list[int]', ...)."""
    return tuple(p for p in path if not (isinstance(p, str) and (p in UNION_MEMBERS or "[" in p)))


def _walk(model: BaseModel, path: Path = ()) -> Any:
    """Yield ('model', path, model) and ('number' | 'string', path, value) for each leaf."""
    yield "model", path, model
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        yield from _walk_value(getattr(model, name), (*path, key))


def _walk_value(value: Any, path: Path) -> Any:
    if isinstance(value, BaseModel):
        yield from _walk(value, path)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _walk_value(v, (*path, i))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_value(v, (*path, k))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield "number", path, value
    elif isinstance(value, str):
        yield "string", path, value


def _set(doc: Any, path: Path, value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _get(doc: Any, path: Path) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def invalid_messages(draw: st.DrawFn) -> tuple[type[s.Message], bytes, Path, str]:
    """A valid message broken in one place: (model, bytes, path of the break, mutation)."""
    model = draw(st.sampled_from(list(MESSAGES)))
    message = draw(MESSAGES[model])
    doc = message.model_dump(mode="json", by_alias=True)
    nodes = list(_walk(message))
    kind = draw(st.sampled_from(["not_finite", "unknown_field", "missing", "wrong_type", "negative_size"]))
    if kind == "not_finite":
        numbers = [n for n in nodes if n[0] == "number"]
        if numbers:
            _, path, _ = draw(st.sampled_from(numbers))
            _set(doc, path, "__NOT_FINITE__")
            literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]))
            return model, orjson.dumps(doc).replace(b'"__NOT_FINITE__"', literal), path, kind
        kind = "unknown_field"
    if kind == "negative_size":
        boxes = [n for n in nodes if n[0] == "model" and isinstance(n[2], s.BBox | s.RotatedBBox)]
        if boxes:
            _, path, _ = draw(st.sampled_from(boxes))
            field = draw(st.sampled_from(["w", "h"]))
            _set(doc, (*path, field), -draw(st.floats(1e-6, 1e6)))
            return model, orjson.dumps(doc), (*path, field), kind
        kind = "unknown_field"
    models = [n for n in nodes if n[0] == "model"]
    _, path, node = draw(st.sampled_from(models))
    if kind == "missing":
        required = [f.alias or n for n, f in type(node).model_fields.items() if f.is_required()]
        if required:
            field = draw(st.sampled_from(required))
            del _get(doc, path)[field]
            return model, orjson.dumps(doc), (*path, field), kind
        kind = "unknown_field"
    if kind == "wrong_type":
        strings = [n for n in nodes if n[0] == "string" and not _in_free_dict(n[1])]
        if strings:
            _, spath, _ = draw(st.sampled_from(strings))
            _set(doc, spath, draw(st.sampled_from([12345, True, {"x": 1}])))
            return model, orjson.dumps(doc), spath, kind
        kind = "unknown_field"
    _get(doc, path)["zz_unknown_field"] = draw(st.integers(-(2**53), 2**53) | st.text(max_size=5))
    return model, orjson.dumps(doc), (*path, "zz_unknown_field"), "unknown_field"


FREE_DICTS = {"attributes", "classifications", "labels", "errors", "keypoint_schemas"}


def _in_free_dict(path: Path) -> bool:
    """Strings inside free-form dicts (attribute values...) accept other types by design."""
    return any(p in FREE_DICTS for p in path if isinstance(p, str))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_messages())
def test_invalid_messages_are_rejected_with_the_field_named(case: tuple) -> None:
    model, raw, path, kind = case
    with pytest.raises(s.SchemaError) as info:
        model.from_bytes(raw)
    err = info.value
    assert err.errors, "a SchemaError always carries at least one field error"
    located = [_norm(e.path) for e in err.errors]
    # the break is named: an error at the broken field (a broken shape tag: at the shape)
    target = _norm(path[:-1] if path[-1] == "type" else path)
    assert target in located, f"{kind} at {path}: got {located}"
    assert str(err).startswith(f"invalid {model.__name__}: ")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_raise_only_schema_error(raw: bytes) -> None:
    for model in s.MESSAGES:
        try:
            model.from_bytes(raw)
        except s.SchemaError as exc:
            assert exc.errors and exc.reason
        else:  # pragma: no cover - random bytes are never a valid message
            pytest.fail(f"{raw!r} decoded as {model.__name__}")


def _annotation(**content: Any) -> dict:
    return {
        "event_id": "e1",
        "project_id": "p1",
        "item_id": "i1",
        "worker_id": "w1",
        "submitted_at": "2026-01-02T03:04:05Z",
        "content": content,
    }


def _errors(raw: dict | bytes, model: type[s.Message] = s.AnnotationSubmitted, **kw: Any) -> list[s.FieldError]:
    with pytest.raises(s.SchemaError) as info:
        model.from_bytes(raw if isinstance(raw, bytes) else orjson.dumps(raw), **kw)
    return info.value.errors


def test_polygon_needs_three_points() -> None:
    doc = _annotation(objects=[{"id": "a", "label": "x", "shape": {"type": "polygon", "points": [[0, 0], [1, 1]]}}])
    (err,) = _errors(doc)
    assert err.loc == "content.objects.0.shape.polygon.points"
    assert "at least 3 points" in err.msg


def test_polyline_needs_two_points_and_keypoints_a_valid_visibility() -> None:
    doc = _annotation(
        objects=[
            {"id": "a", "label": "x", "shape": {"type": "polyline", "points": [[0, 0]]}},
            {"id": "b", "label": "x", "shape": {"type": "keypoints", "points": [[0, 0, 3]]}},
        ]
    )
    locs = {e.loc for e in _errors(doc)}
    assert "content.objects.0.shape.polyline.points" in locs
    assert "content.objects.1.shape.keypoints.points.0.2" in locs


def test_mask_counts_must_cover_the_image() -> None:
    doc = _annotation(objects=[{"id": "a", "label": "x", "shape": {"type": "mask", "size": [2, 2], "counts": [1, 2]}}])
    (err,) = _errors(doc)
    assert "sum to 3, expected h*w = 4" in err.msg


def test_duplicate_object_ids_and_dangling_relationships_are_rejected() -> None:
    box = {"type": "bbox", "x": 0, "y": 0, "w": 1, "h": 1}
    dup = _annotation(objects=[{"id": "a", "label": "x", "shape": box}, {"id": "a", "label": "y", "shape": box}])
    assert "appears more than once" in _errors(dup)[0].msg
    dangling = _annotation(
        objects=[{"id": "a", "label": "x", "shape": box}],
        relationships=[{"subject": "a", "predicate": "on", "object": "b"}],
    )
    assert "unknown object id 'b'" in _errors(dangling)[0].msg


def test_ids_refuse_spaces_and_braces_that_would_break_redis_hash_tags() -> None:
    for bad in ("has space", "{tag}", ""):
        doc = _annotation()
        doc["worker_id"] = bad
        assert _errors(doc)[0].loc == "worker_id"


def test_started_after_submitted_is_rejected() -> None:
    doc = _annotation()
    doc["started_at"] = "2026-01-02T03:05:00Z"
    assert "started_at is after submitted_at" in _errors(doc)[0].msg


def test_naive_datetimes_are_rejected() -> None:
    doc = _annotation()
    doc["submitted_at"] = "2026-01-02T03:04:05"
    assert _errors(doc)[0].loc == "submitted_at"


def test_review_verdicts_and_corrections_must_agree() -> None:
    base = {
        "event_id": "r1",
        "project_id": "p",
        "item_id": "i",
        "annotation_event_id": "e1",
        "worker_id": "w",
        "reviewer_id": "x",
        "reviewed_at": "2026-01-02T03:04:05Z",
    }
    assert "needs the corrected content" in _errors({**base, "verdict": "correct"}, s.ReviewResult)[0].msg
    assert (
        "cannot be promoted" in _errors({**base, "verdict": "reject", "promote_to_gold": True}, s.ReviewResult)[0].msg
    )
    ok = s.ReviewResult.from_bytes(
        orjson.dumps({**base, "verdict": "correct", "corrected": {"objects": []}, "promote_to_gold": True})
    )
    assert ok.verdict is s.Verdict.CORRECT and ok.promote_to_gold


# ----------------------------------------------------------------------------- versions


def test_a_newer_major_version_is_rejected_with_a_clear_error() -> None:
    doc = _annotation()
    doc["schema_version"] = "2.0"
    (err,) = _errors(doc)
    assert err.loc == "schema_version"
    assert "newer than this goldstream reads (1.x)" in err.msg


@pytest.mark.parametrize("version", ["0.9", "1.0", "1.7"])
def test_older_and_same_major_versions_are_accepted(version: str) -> None:
    doc = _annotation()
    doc["schema_version"] = version
    assert s.AnnotationSubmitted.from_bytes(orjson.dumps(doc)).schema_version == version


def test_a_malformed_version_is_rejected() -> None:
    doc = _annotation()
    doc["schema_version"] = "one"
    assert _errors(doc)[0].loc == "schema_version"


# ----------------------------------------------------------------------------- limits


def test_size_limits_are_configurable() -> None:
    box = {"type": "bbox", "x": 0, "y": 0, "w": 1, "h": 1}
    doc = _annotation(objects=[{"id": f"o{i}", "label": "x", "shape": box} for i in range(5)])
    raw = orjson.dumps(doc)
    assert s.AnnotationSubmitted.from_bytes(raw, s.Limits(max_objects=5)).content.objects
    (err,) = _errors(raw, limits=s.Limits(max_objects=4))
    assert err.loc == "content.objects" and "over the limit of 4" in err.msg
    (err,) = _errors(raw, limits=s.Limits(max_message_bytes=len(raw) - 1))
    assert err.type == "too_large"
    poly = _annotation(
        objects=[{"id": "a", "label": "x", "shape": {"type": "polygon", "points": [[i, i * i] for i in range(10)]}}]
    )
    (err,) = _errors(poly, limits=s.Limits(max_vertices=9))
    assert "10 vertices in a polygon, over the limit of 9" in err.msg


# ----------------------------------------------------------------------------- criteria


def _criteria() -> s.ProjectCriteria:
    return s.ProjectCriteria(
        project_id="p1",
        labels=[
            s.LabelSpec(name="person", shape_types=["keypoints", "bbox"], keypoint_schema="coco_person"),
            s.LabelSpec(name="car", shape_types=["bbox"], attributes={"color": s.AttributeSpec()}),
        ],
        classifications={"weather": s.ClassificationSpec(labels=["sun", "rain"])},
    )


def test_content_is_checked_against_the_project() -> None:
    kp = s.Keypoints(points=[(1.0, 2.0, 2)] * 15)
    content = s.Content(
        objects=[
            s.AnnotatedObject(id="a", label="person", shape=kp),
            s.AnnotatedObject(id="b", label="truck", shape=s.BBox(x=0, y=0, w=1, h=1)),
            s.AnnotatedObject(id="c", label="car", shape=s.Point(x=1, y=1), attributes={"size": "big"}),
        ],
        classifications={"weather": ["sun", "rain"], "time": ["day"]},
    )
    errors = {e.loc: e for e in s.content_errors(content, _criteria())}
    assert errors["content.objects.0.shape.points"].type == "keypoint_count"
    assert "15 keypoints, schema 'coco_person' has 17" in errors["content.objects.0.shape.points"].msg
    assert errors["content.objects.1.label"].type == "unknown_label"
    assert errors["content.objects.2.shape.type"].type == "shape_type"
    assert errors["content.objects.2.attributes.size"].type == "unknown_attribute"
    assert errors["content.classifications.weather"].type == "single_label"
    assert errors["content.classifications.time"].type == "unknown_taxonomy"
    with pytest.raises(s.SchemaError):
        s.check_content(content, _criteria())


def test_fitting_content_passes_and_an_open_taxonomy_accepts_any_label() -> None:
    kp = s.Keypoints(points=[(1.0, 2.0, 2)] * 17)
    content = s.Content(
        objects=[s.AnnotatedObject(id="a", label="person", shape=kp)], classifications={"weather": ["rain"]}
    )
    assert s.content_errors(content, _criteria()) == []
    anything = s.Content(objects=[s.AnnotatedObject(id="a", label="zebra", shape=s.Point(x=1, y=1))])
    assert s.content_errors(anything, s.ProjectCriteria(project_id="open")) == []


def test_criteria_defaults_and_a_derived_event_id() -> None:
    c = s.ProjectCriteria.from_bytes(b'{"project_id": "p9"}')
    assert c.event_id.startswith("criteria:p9:")
    assert c.pass_threshold == 0.7 and c.point_tolerance == 5.0
    assert c.keypoint_schemas["coco_person"].sigmas[0] == 0.026
    from pycocotools.cocoeval import Params  # the field's reference sigmas

    assert np.allclose(c.keypoint_schemas["coco_person"].sigmas, Params(iouType="keypoints").kpt_oks_sigmas)
    assert s.ProjectCriteria.from_bytes(b'{"project_id": "p9"}').event_id == c.event_id
    (err,) = _errors(b'{"project_id": "p9", "labels": [{"name": "a", "keypoint_schema": "nope"}]}', s.ProjectCriteria)
    assert "unknown keypoint schema 'nope'" in err.msg


def test_dead_letter_keeps_raw_bytes_and_a_deterministic_id() -> None:
    raw = b"\x00\xffnot json"
    a = s.DeadLetter.of(
        raw, topic="annotations", partition=2, offset=17, reason="undecodable", error="bad", received_at=NOW
    )
    b = s.DeadLetter.of(
        raw, topic="annotations", partition=2, offset=17, reason="undecodable", error="bad", received_at=NOW
    )
    assert a.raw == raw and a.event_id == b.event_id
    assert s.DeadLetter.from_bytes(a.to_bytes()).raw == raw


@SETTINGS
@given(annotations())
def test_derived_ids_are_deterministic_and_distinct_per_reason(a: s.AnnotationSubmitted) -> None:
    ids = {s.Escalation.make_id(a.event_id, r) for r in s.EscalationReason}
    assert len(ids) == len(s.EscalationReason)
    assert s.Escalation.make_id(a.event_id, s.EscalationReason.AUDIT_SAMPLE) == s.Escalation.make_id(
        a.event_id, s.EscalationReason.AUDIT_SAMPLE
    )


# ----------------------------------------------------------------------------- bounds


def _one(shape: dict, image: dict | None = None) -> bytes:
    content: dict[str, Any] = {"objects": [{"id": "a", "label": "car", "shape": shape}]}
    if image is not None:
        content["image"] = image
    return orjson.dumps(_annotation(**content))


IMAGE = {"width": 640, "height": 480}  # the window: x in [-640, 1280], y in [-480, 960]


def test_a_box_at_1e308_is_rejected_by_the_schema() -> None:
    errors = _errors(_one({"type": "bbox", "x": 1e308, "y": 1e308, "w": 1e308, "h": 1e308}))
    assert {e.loc.rsplit(".", 1)[1] for e in errors} == {"x", "y", "w", "h"}
    assert all(e.type == "less_than_equal" for e in errors)
    assert "less than or equal to 2000000" in errors[0].msg


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"1" + b"0" * 400, b"NaN", b"Infinity"])
def test_numbers_that_overflow_a_double_are_not_finite_and_rejected(literal: bytes) -> None:
    raw = _one({"type": "point", "x": 0, "y": 0}).replace(b'"x":0', b'"x":' + literal)
    (err,) = _errors(raw)
    assert err.loc == "content.objects.0.shape.point.x" and err.type == "finite_number"


@pytest.mark.parametrize(
    ("shape", "where"),
    [
        ({"type": "bbox", "x": 10, "y": 10, "w": 2000, "h": 5}, "bottom-right corner (2010, 15)"),
        ({"type": "bbox", "x": -641, "y": 0, "w": 5, "h": 5}, "top-left corner (-641, 0)"),
        ({"type": "rotated_bbox", "cx": 600, "cy": 400, "w": 3000, "h": 10, "angle": 30}, "corner 0"),
        ({"type": "polygon", "points": [[0, 0], [10, 0], [5, 1500]]}, "vertex 2 (5, 1500)"),
        (
            {"type": "polygon", "points": [[0, 0], [99, 0], [0, 99]], "holes": [[[1, 1], [2, 1], [1, -500]]]},
            "hole 0 vertex 2",
        ),
        ({"type": "polyline", "points": [[0, 0], [1300, 0]]}, "vertex 1 (1300, 0)"),
        ({"type": "point", "x": 0, "y": 961}, "point (0, 961)"),
        ({"type": "keypoints", "points": [[1, 1, 2], [2000, 1, 0]]}, "keypoint 1 (2000, 1)"),
        ({"type": "keypoints", "points": [[1, 1, 2]], "bbox": [0, 0, 5000, 5]}, "bbox bottom-right corner"),
        ({"type": "keypoints", "points": [[1, 1, 2]], "area": 1e7}, "area 1e+07 is larger"),
    ],
)
def test_shapes_more_than_one_image_size_outside_their_image_are_rejected(shape: dict, where: str) -> None:
    (err,) = _errors(_one(shape, IMAGE))
    assert err.type == "outside_image" and err.loc == "content"
    assert err.msg.startswith("objects.0.shape") and where in err.msg
    assert "[-640, 1280] x [-480, 960]" in err.msg or "area" in where


@pytest.mark.parametrize(
    "shape",
    [
        {"type": "bbox", "x": -640, "y": -480, "w": 1920, "h": 1440},  # exactly the window
        {"type": "rotated_bbox", "cx": 320, "cy": 240, "w": 1000, "h": 400, "angle": 45},
        {"type": "polygon", "points": [[-640, -480], [1280, -480], [1280, 960]]},
        {"type": "point", "x": 1280, "y": 960},
        {"type": "keypoints", "points": [[0, 0, 0], [700, 500, 2]], "bbox": [-10, -10, 700, 500], "area": 1e5},
    ],
)
def test_shapes_up_to_one_image_size_outside_their_image_are_accepted(shape: dict) -> None:
    a = s.AnnotationSubmitted.from_bytes(_one(shape, IMAGE))
    assert a.content.objects[0].shape.type == shape["type"]


def test_without_an_image_size_the_largest_image_bounds_coordinates() -> None:
    assert s.AnnotationSubmitted.from_bytes(_one({"type": "bbox", "x": -1e6, "y": 0, "w": 3e6, "h": 1}))
    (err,) = _errors(_one({"type": "bbox", "x": 0, "y": 0, "w": 2e6 + 1, "h": 1}))
    assert err.type == "outside_image" and "bottom-right corner (2e+06, 1)" in err.msg
    (err,) = _errors(_one({"type": "polyline", "points": [[0, 0], [0, -1e6 - 1]]}))
    assert err.loc == "content.objects.0.shape.polyline.points.1.1" and err.type == "greater_than_equal"
    (err,) = _errors(_one({"type": "rotated_bbox", "cx": 0, "cy": 0, "w": 3e6, "h": 1, "angle": 0}))
    assert err.type == "outside_image" and "corner 0 (-1.5e+06" in err.msg


def test_a_mask_must_be_the_size_of_its_image_and_at_most_134_megapixels() -> None:
    assert s.AnnotationSubmitted.from_bytes(_one({"type": "mask", "size": [480, 640], "counts": [480 * 640]}, IMAGE))
    (err,) = _errors(_one({"type": "mask", "size": [20, 20], "counts": [400]}, IMAGE))
    assert err.type == "outside_image" and "mask size [20, 20] is not the image's [height, width] [480, 640]" in err.msg
    (err,) = _errors(_one({"type": "mask", "size": [100_000, 100_000], "counts": [10**10]}))
    assert "10000000000 pixels, over the limit of 134217728" in err.msg


# ----------------------------------------------------------------------------- dead letters of any size


def test_the_size_limit_is_under_kafkas_message_size_and_escalations_may_exceed_it() -> None:
    assert s.DEFAULT_LIMITS.max_message_bytes == s.LimitsSpec().max_message_bytes == 512 * 1024
    box = {"type": "bbox", "x": 0, "y": 0, "w": 1, "h": 1}
    objects = [{"id": f"o{i}", "label": "car", "shape": box} for i in range(5000)]
    raw = orjson.dumps(_annotation(objects=objects))
    assert len(raw) <= s.DEFAULT_LIMITS.max_message_bytes
    a = s.AnnotationSubmitted.from_bytes(raw)  # re-encoded with its defaults, it is larger than it came
    snap = s.WorkerSnapshot(state=s.QualificationState.QUALIFYING)
    esc = s.Escalation(
        event_id="e",
        project_id="p1",
        item_id="i1",
        worker_id="w1",
        reasons=[s.EscalationReason.AUDIT_SAMPLE],
        priority=10,
        worker=snap,
        annotation=a,
        created_at=NOW,
    )
    assert len(esc.to_bytes()) > s.DEFAULT_LIMITS.max_message_bytes
    assert s.Escalation.from_bytes(esc.to_bytes()) == esc  # an output embedding an accepted input is readable


def _letter(raw: bytes, **kw: Any) -> s.DeadLetter:
    return s.DeadLetter.of(
        raw, topic="annotations", partition=1, offset=9, reason="too_large", error="big", received_at=NOW, **kw
    )


def test_a_dead_letter_holding_its_input_whole_keeps_the_1_0_layout() -> None:
    letter = _letter(b'{"event_id": 1}')
    assert letter.raw_encoding == "plain" and letter.complete
    assert b"raw_encoding" not in letter.to_bytes() and b"raw_size" not in letter.to_bytes()
    assert s.DeadLetter.from_bytes(letter.to_bytes()) == letter


def test_a_dead_letter_of_any_input_kafka_delivers_can_itself_be_published() -> None:
    """Kafka carries ~1 MB; base64 makes a third more. Over 600 kB an input is kept zlib-compressed,
    or, incompressible, as its first 600 kB with its size and sha256."""
    json_like = orjson.dumps({"event_id": "e", "padding": "ab" * 490_000})
    letter = _letter(json_like)
    assert letter.raw_encoding == "zlib" and letter.complete and letter.raw == json_like
    assert letter.raw_size == len(json_like) and letter.raw_sha256 == hashlib.sha256(json_like).hexdigest()
    noise = np.random.default_rng(0).bytes(1_040_000)
    letter = _letter(noise, key=b"k" * 100_000, errors=[{"loc": "x", "msg": "m" * 5000, "type": "t"}] * 30_000)
    assert letter.raw_encoding == "head" and not letter.complete
    assert letter.raw == noise[:600_000] and letter.raw_size == len(noise)
    assert letter.raw_sha256 == hashlib.sha256(noise).hexdigest()
    assert len(letter.errors) == 51 and letter.errors[-1] == {"loc": "", "msg": "and 29950 more", "type": "more"}
    assert "key of 100000 bytes" in letter.error
    assert len(letter.to_bytes()) < 1_000_000  # Faust's default max_request_size
    assert s.DeadLetter.from_bytes(letter.to_bytes()) == letter


def test_criteria_an_earlier_goldstream_published_still_load() -> None:
    """Every criteria message of the first version carried the fields the reliability model
    retired: on the compacted topic they must still decode (else a project silently falls back
    to the defaults), and they are not written again."""
    import orjson

    new = orjson.loads(s.ProjectCriteria(project_id="p").to_bytes())
    new["proficiency"].update(
        {"ewma_half_life_s": 86400.0, "windows_s": [3600, 86400], "prior_passes": 1.0, "prior_fails": 1.0}
    )
    new["alerts"]["worker_scores"] = "reference"
    old = s.decode(s.ProjectCriteria, orjson.dumps(new))
    assert old.project_id == "p" and old.proficiency.prior_weight == 2.0
    assert b"windows_s" not in old.to_bytes() and b"worker_scores" not in old.to_bytes()
