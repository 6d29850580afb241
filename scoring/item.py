"""Compare one annotation with one reference (gold, a correction, or a peer): metrics spec §1-§4.

Objects are grouped by shape family (and keypoint schema), each family's similarity matrix is
computed in one vectorised call, the two-pass Hungarian assignment pairs them, and the counts,
metrics, components and item score follow. Everything returned is an `schemas.ItemScore`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from goldstream.schemas.base import LABEL_MAX_LENGTH
from goldstream.schemas.content import (
    AnnotatedObject,
    AttributeValue,
    BBox,
    Content,
    Keypoints,
    Mask,
    Point,
    Polygon,
    RotatedBBox,
)
from goldstream.schemas.criteria import AttributeSpec, ProjectCriteria
from goldstream.schemas.messages import (
    AnnotationSubmitted,
    Components,
    Family,
    GoldAnswer,
    ItemScore,
    KeypointFigures,
    LabelCounts,
    Metrics,
    ObjectCounts,
    ObjectMatch,
    Outcome,
    ReviewResult,
)
from goldstream.schemas.validation import content_errors, keypoint_schema_name
from goldstream.scoring import geometry, keypoints, points, rle
from goldstream.scoring.errors import InvalidGeometry, KeypointMismatch, ScoringError, UnknownLabel
from goldstream.scoring.matching import Assignment, assign, assign_batch
from goldstream.scoring.text import normalized_edit_distance

FAMILY_OF = {
    "bbox": Family.BOX,
    "rotated_bbox": Family.BOX,
    "polygon": Family.REGION,
    "mask": Family.REGION,
    "keypoints": Family.KEYPOINTS,
    "point": Family.POINT,
    "polyline": Family.POLYLINE,
}
DEFAULT_CRITERIA = ProjectCriteria(project_id="default")

Answer = Content | AnnotationSubmitted | GoldAnswer | ReviewResult


def content_of(answer: Answer) -> Content:
    """The Content inside any message that carries one (a review: its correction)."""
    if isinstance(answer, Content):
        return answer
    if isinstance(answer, ReviewResult):
        if answer.corrected is None:
            raise ScoringError("a review without a correction carries no answer to compare with")
        return answer.corrected
    return answer.content


def check(content: Content, criteria: ProjectCriteria, where: str) -> None:
    """Raise the typed error for content that does not fit the project (schemas.validation)."""
    errors = content_errors(content, criteria, where)
    if not errors:
        return
    first = errors[0]
    kind = {"unknown_label": UnknownLabel, "keypoint_count": KeypointMismatch}.get(first.type, ScoringError)
    raise kind(first.msg, where=first.loc)


# --------------------------------------------------------------------------- similarity


def _box_sim(ann: list[AnnotatedObject], ref: list[AnnotatedObject], crowd: np.ndarray) -> np.ndarray:
    shapes_a = [o.shape for o in ann]
    shapes_r = [o.shape for o in ref]
    if all(type(s) is BBox for s in shapes_a) and all(type(s) is BBox for s in shapes_r):
        # validated messages: finite, non-negative sizes, so the unchecked (faster) kernel is safe
        a = np.array([(s.x, s.y, s.w, s.h) for s in shapes_a], dtype=np.float64).reshape(-1, 4)
        b = np.array([(s.x, s.y, s.w, s.h) for s in shapes_r], dtype=np.float64).reshape(-1, 4)
        return geometry.box_iou_unchecked(a, b, crowd)

    def rot(s: BBox | RotatedBBox) -> list[float]:
        if isinstance(s, BBox):
            return [s.x + s.w / 2, s.y + s.h / 2, s.w, s.h, 0.0]
        return [s.cx, s.cy, s.w, s.h, s.angle]

    a = np.array([rot(o.shape) for o in ann]).reshape(-1, 5)  # type: ignore[arg-type]
    b = np.array([rot(o.shape) for o in ref]).reshape(-1, 5)  # type: ignore[arg-type]
    return geometry.rotated_box_iou(a, b, crowd)


Regions = dict[tuple[int, tuple[int, int] | None], Any]


def _region_sim(
    ann: list[AnnotatedObject],
    ref: list[AnnotatedObject],
    crowd: np.ndarray,
    image: tuple[int, int] | None,
    regions: Regions,
) -> np.ndarray:
    """`regions`: the shapely regions built so far in this `score_items` call, by polygon (an
    answer takes part in several pairs of a round, gold in one pair per annotation: building a
    valid, clipped region is most of what a polygon costs)."""
    masks = [o.shape for o in ann + ref if isinstance(o.shape, Mask)]
    if not masks:

        def region(o: AnnotatedObject) -> Any:
            key = (id(o.shape), image)
            found = regions.get(key)
            if found is None:
                found = regions[key] = geometry.region(o.shape.points, o.shape.holes, image)  # type: ignore[union-attr]
            return found

        return geometry.region_iou([region(o) for o in ann], [region(o) for o in ref], crowd)
    size = masks[0].size
    if any(m.size != size for m in masks):
        raise InvalidGeometry(f"masks of one item have different sizes: {sorted({m.size for m in masks})}")

    def as_rle(o: AnnotatedObject) -> rle.Rle:
        s = o.shape
        if isinstance(s, Mask):
            return rle.rle(s.size, s.counts)
        assert isinstance(s, Polygon)
        return rle.rasterize(geometry.region(s.points, s.holes, (size[1], size[0])), size)

    return rle.rle_iou([as_rle(o) for o in ann], [as_rle(o) for o in ref], crowd)


def _keypoint_arrays(objs: list[AnnotatedObject], k: int) -> np.ndarray:
    out = np.zeros((len(objs), k, 3))
    for n, o in enumerate(objs):
        assert isinstance(o.shape, Keypoints)
        out[n] = keypoints.as_keypoints(o.shape.points, k, where=f"object {o.id}")
    return out


def _gold_area(o: AnnotatedObject, arr: np.ndarray) -> float:
    s = o.shape
    assert isinstance(s, Keypoints)
    if s.area is not None:
        return s.area
    if s.bbox is not None:
        return s.bbox[2] * s.bbox[3]
    return keypoints.default_area(arr)


@dataclass
class _FamilyResult:
    family: Family
    ann: list[AnnotatedObject]
    ref: list[AnnotatedObject]
    assignment: Assignment
    kp_ann: np.ndarray | None = None
    kp_ref: np.ndarray | None = None


def _similarity(
    key: tuple[Family, str],
    ann: list[AnnotatedObject],
    ref: list[AnnotatedObject],
    criteria: ProjectCriteria,
    image: tuple[int, int] | None,
    regions: Regions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    family, schema_name = key
    crowd = np.array([o.iscrowd for o in ref], dtype=bool)
    if family is Family.BOX:
        return _box_sim(ann, ref, crowd), crowd, None, None
    if family is Family.REGION:
        return _region_sim(ann, ref, crowd, image, regions), crowd, None, None
    if family is Family.KEYPOINTS:
        schema = criteria.keypoint_schemas.get(schema_name)
        if schema is None:
            raise KeypointMismatch(f"no keypoint schema {schema_name!r} in the project")
        k = len(schema.sigmas)
        da, dr = _keypoint_arrays(ann, k), _keypoint_arrays(ref, k)
        areas = np.array([_gold_area(o, dr[n]) for n, o in enumerate(ref)])
        visible_only = criteria.keypoint_visibility == "visible_only"
        return keypoints.oks_matrix(da, dr, np.array(schema.sigmas), areas, visible_only), crowd, da, dr
    if family is Family.POINT:

        def xy(o: AnnotatedObject) -> tuple[float, float]:
            assert isinstance(o.shape, Point)
            return o.shape.x, o.shape.y

        tol = np.array([criteria.point_tolerance_of(o.label) for o in ref])
        return points.point_similarity([xy(o) for o in ann], [xy(o) for o in ref], tol), crowd, None, None
    lines_a = [np.asarray(o.shape.points) for o in ann]  # type: ignore[union-attr]
    lines_b = [np.asarray(o.shape.points) for o in ref]  # type: ignore[union-attr]
    tol = [criteria.line_tolerance_of(o.label) for o in ref]
    oriented = [bool((spec := criteria.label(o.label)) and spec.orientation_matters) for o in ref]
    return points.polyline_similarity_matrix(lines_a, lines_b, tol, oriented), crowd, None, None


# --------------------------------------------------------------------------- counting


def ratio(num: float, den: float) -> float | None:
    """num / den, or None where the denominator is zero (undefined, not 0: spec §3)."""
    return num / den if den > 0 else None


def metrics_of(tp: int, fp: int, fn: int, sim_sum: float, empty_correct: bool, mismatches: int = 0) -> Metrics:
    """precision, recall, F1, accuracy and mean similarity from counts (None where undefined).

    accuracy = M / (M + X + Ug + Ud); with mismatches X counted in both fp and fn,
    M + X + Ug + Ud = tp + fp + fn - X."""
    return Metrics(**_metric_values(tp, fp, fn, sim_sum, empty_correct, mismatches))


def _metric_values(
    tp: int, fp: int, fn: int, sim_sum: float, empty_correct: bool, mismatches: int
) -> dict[str, float | None]:
    total = tp + fp + fn - mismatches
    if total == 0 and empty_correct:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0, "mean_similarity": None}
    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp, total),
        "mean_similarity": ratio(sim_sum, tp),
    }


def _attribute_equal(a: AttributeValue | None, b: AttributeValue | None, spec: AttributeSpec) -> bool:
    if a is None or b is None:
        return False
    if spec.compare == "numeric":
        if (
            isinstance(a, bool)
            or isinstance(b, bool)
            or not isinstance(a, int | float)
            or not isinstance(b, int | float)
        ):
            return a == b
        return abs(float(a) - float(b)) <= spec.tolerance
    if spec.compare == "text" and isinstance(a, str) and isinstance(b, str):
        return normalized_edit_distance(a, b) <= spec.tolerance
    if isinstance(a, list) and isinstance(b, list):
        return sorted(a) == sorted(b)
    return a == b and type(a) is type(b)


def _attributes(pairs: list[tuple[AnnotatedObject, AnnotatedObject]], criteria: ProjectCriteria) -> tuple[int, int]:
    compared = correct = 0
    declares = criteria.has_attributes
    for a, r in pairs:
        if not declares and not r.attributes:
            continue
        spec = criteria.label(r.label)
        declared = spec.attributes if spec is not None else {}
        if not r.attributes and not declared:
            continue  # nothing the reference asks for
        for name in sorted(set(r.attributes) | set(declared)):
            va, vr = a.attributes.get(name), r.attributes.get(name)
            if va is None and vr is None:
                continue
            compared += 1
            correct += _attribute_equal(va, vr, declared.get(name) or _EXACT)
    return compared, correct


_EXACT = AttributeSpec()


def _classifications(ann: Content, ref: Content) -> tuple[int, int, dict[str, dict[str, int]]]:
    if not ann.classifications and not ref.classifications:
        return 0, 0, {}
    compared = correct = 0
    per_label: dict[str, dict[str, int]] = {}
    for taxonomy in sorted(set(ann.classifications) | set(ref.classifications)):
        a, r = set(ann.classifications.get(taxonomy, [])), set(ref.classifications.get(taxonomy, []))
        compared += 1
        correct += a == r
        for label in sorted(a | r):
            per_label[f"{taxonomy}/{label}"] = {
                "tp": int(label in a and label in r),
                "fp": int(label in a and label not in r),
                "fn": int(label in r and label not in a),
            }
    return compared, correct, per_label


def _relationships(
    ann: Content, ref: Content, matched: list[tuple[AnnotatedObject, AnnotatedObject]]
) -> tuple[int, int, int]:
    if not ann.relationships and not ref.relationships:
        return 0, 0, 0
    id_map = {a.id: r.id for a, r in matched}
    gold = Counter((r.subject, r.predicate, r.object) for r in ref.relationships)
    mapped = Counter((id_map.get(r.subject), r.predicate, id_map.get(r.object)) for r in ann.relationships)
    tp = sum((gold & mapped).values())
    return tp, len(ann.relationships) - tp, len(ref.relationships) - tp


@dataclass
class _Tally:
    """Plain counts and match rows; turned into one ItemScore by a single validation at the end
    (one pydantic call for the whole result is several times cheaper than one per row)."""

    matches: list[ObjectMatch] = field(default_factory=list)
    labels: dict[str, list[float]] = field(default_factory=dict)  # label -> [tp, fp, fn, sim]
    m: int = 0
    x: int = 0
    ug: int = 0
    ud: int = 0
    ignored: int = 0
    sim_sum: float = 0.0


def _tally(results: list[_FamilyResult]) -> _Tally:
    """Rows and per-label counts of an item's assignments. Rows are built without validation
    (`Model.trusted`): their ids and labels come from validated objects, their similarity from a
    kernel bounded to [0, 1]; the ItemScore that holds them is validated as a whole. Locals, not
    attributes, in the loops: this runs once per object of every item."""
    t = _Tally()
    rows = t.matches
    labels = t.labels
    row = ObjectMatch.trusted
    sim_sum = 0.0
    for fr in results:
        asg, fam, ann, ref = fr.assignment, fr.family, fr.ann, fr.ref
        for i, j, sim in asg.matches:
            a, r = ann[i], ref[j]
            rl = r.label
            rows.append(row({"outcome": _MATCH, "family": fam, "annotation_object_id": a.id,
                             "reference_object_id": r.id, "annotation_label": a.label,
                             "reference_label": rl, "similarity": sim}))  # fmt: skip
            c = labels.get(rl) or labels.setdefault(rl, [0, 0, 0, 0.0])
            c[0] += 1
            c[3] += sim
            sim_sum += sim
        for i, j, sim in asg.mismatches:
            a, r = ann[i], ref[j]
            rows.append(row({"outcome": _MISMATCH, "family": fam, "annotation_object_id": a.id,
                             "reference_object_id": r.id, "annotation_label": a.label,
                             "reference_label": r.label, "similarity": sim}))  # fmt: skip
            (labels.get(a.label) or labels.setdefault(a.label, [0, 0, 0, 0.0]))[1] += 1
            (labels.get(r.label) or labels.setdefault(r.label, [0, 0, 0, 0.0]))[2] += 1
        for j in asg.missed:
            r = ref[j]
            rows.append(row({"outcome": _MISSED, "family": fam, "annotation_object_id": None,
                             "reference_object_id": r.id, "annotation_label": None,
                             "reference_label": r.label, "similarity": None}))  # fmt: skip
            (labels.get(r.label) or labels.setdefault(r.label, [0, 0, 0, 0.0]))[2] += 1
        for i in asg.extra:
            a = ann[i]
            rows.append(row({"outcome": _EXTRA, "family": fam, "annotation_object_id": a.id,
                             "reference_object_id": None, "annotation_label": a.label,
                             "reference_label": None, "similarity": None}))  # fmt: skip
            (labels.get(a.label) or labels.setdefault(a.label, [0, 0, 0, 0.0]))[1] += 1
        t.m += len(asg.matches)
        t.x += len(asg.mismatches)
        t.ug += len(asg.missed)
        t.ud += len(asg.extra)
        t.ignored += len(asg.ignored)
    t.sim_sum = sim_sum
    return t


def _matched(results: list[_FamilyResult], criteria: ProjectCriteria, ann: Content, ref: Content) -> list[Pair]:
    """The matched (annotation, reference) objects, for attributes and relationships; empty
    where neither can count, as in most detection projects (a tuple per match is a fifth of
    the containers a 10-box item would allocate otherwise)."""
    if not (criteria.has_attributes or ann.relationships or ref.relationships or _has_attributes(ref)):
        return []
    return [(fr.ann[i], fr.ref[j]) for fr in results for i, j, _ in fr.assignment.matches]


def _has_attributes(content: Content) -> bool:
    for o in content.objects:
        if o.attributes:
            return True
    return False


Pair = tuple[AnnotatedObject, AnnotatedObject]


_MATCH, _MISMATCH, _MISSED, _EXTRA = Outcome.MATCH, Outcome.MISMATCH, Outcome.MISSED, Outcome.EXTRA


def _keypoint_figures(results: list[_FamilyResult], criteria: ProjectCriteria) -> KeypointFigures | None:
    kp = [fr for fr in results if fr.family is Family.KEYPOINTS]
    if not kp:
        return None
    visible_only = criteria.keypoint_visibility == "visible_only"
    pairs = oks_sum = sq = 0.0
    both = within = gold = missing = extra = 0
    for fr in kp:
        assert fr.kp_ann is not None and fr.kp_ref is not None
        for i, j, s in fr.assignment.matches:
            f = keypoints.pair_figures(
                fr.kp_ann[i], fr.kp_ref[j], criteria.point_tolerance_of(fr.ref[j].label), visible_only
            )
            pairs += 1
            oks_sum += s
            sq += f.sq_err_sum
            both += f.both
            within += f.within
            gold += f.gold_labeled
            missing += f.missing
            extra += f.extra
    return keypoint_figures(int(pairs), oks_sum, sq, both, within, gold, missing, extra)


def keypoint_figures(
    pairs: int, oks_sum: float, sq_err_sum: float, both: int, within: int, gold: int, missing: int, extra: int
) -> KeypointFigures:
    """KeypointFigures with its ratios derived from the sums (used per item and when merged)."""
    rmse = ratio(sq_err_sum, both)
    return KeypointFigures(
        pairs=pairs,
        oks_sum=oks_sum,
        sq_err_sum=sq_err_sum,
        both=both,
        within=within,
        gold_labeled=gold,
        missing=missing,
        extra=extra,
        oks_mean=ratio(oks_sum, pairs),
        rmse=math.sqrt(rmse) if rmse is not None else None,
        pck=ratio(within, gold),
    )


# --------------------------------------------------------------------------- the item


def _scorable_reference(o: AnnotatedObject, criteria: ProjectCriteria) -> bool:
    """Gold keypoint sets with no labeled keypoint are not scored (spec §1), as COCO ignores them."""
    if not isinstance(o.shape, Keypoints):
        return True
    threshold = 2 if criteria.keypoint_visibility == "visible_only" else 1
    return any(v >= threshold for _, _, v in o.shape.points)


def score_item(annotation: Answer, reference: Answer, criteria: ProjectCriteria | None = None) -> ItemScore:
    """Compare an annotation with a reference under a project's criteria (metrics spec §1-§4).

    Raises a ScoringError subclass (InvalidGeometry, UnknownLabel, KeypointMismatch) for input
    that cannot be scored; the score is never NaN.
    """
    return score_items([(annotation, reference)], criteria)[0]


_BOX_KEY = (Family.BOX, "")


@dataclass
class _Item:
    """One comparison on its way through `score_items`."""

    ann: Content
    ref: Content
    image: tuple[int, int] | None
    groups: dict[tuple[Family, str], tuple[list[AnnotatedObject], list[AnnotatedObject]]]
    results: dict[tuple[Family, str], _FamilyResult] = field(default_factory=dict)
    plain_boxes: bool = True  # its box family is axis-aligned boxes without crowd gold


def _check(ann: Content, ref: Content, criteria: ProjectCriteria, checked: set[int]) -> None:
    """Both sides of a pair against the project, each content once per call (`checked`)."""
    for content, where in ((ann, "annotation"), (ref, "reference")):
        if id(content) not in checked:
            check(content, criteria, where)
            checked.add(id(content))


def _prepare(annotation: Answer, reference: Answer, criteria: ProjectCriteria, checked: set[int]) -> _Item:
    """`checked`: ids of the contents this call has checked already (in a round of n annotators
    each answer takes part in n - 1 pairs; it is checked once)."""
    ann, ref = content_of(annotation), content_of(reference)
    # an open project (no taxonomy) can only reject keypoints: check only what can fail, once the
    # grouping below meets keypoints (a pass of its own over the objects was 3 % of the
    # instructions scoring a batch of 10-box items takes, counted by callgrind)
    must_check = bool(criteria.labels or criteria.classifications)
    if must_check:
        _check(ann, ref, criteria, checked)
    img = ref.image or ann.image
    groups: dict[tuple[Family, str], tuple[list[AnnotatedObject], list[AnnotatedObject]]] = {}
    plain = True
    for side, objs in ((0, ann.objects), (1, ref.objects)):
        for o in objs:
            shape = o.shape
            if type(shape) is BBox:
                key = _BOX_KEY
                plain = plain and not (side == 1 and o.iscrowd)
            else:
                family = FAMILY_OF[shape.type]
                if family is Family.KEYPOINTS:
                    if not must_check:  # before the keypoints are read: they may not fit
                        _check(ann, ref, criteria, checked)
                        must_check = True
                    if side == 1 and not _scorable_reference(o, criteria):
                        continue
                    key = (family, keypoint_schema_name(o, criteria) or "")
                else:
                    key = (family, "")
                    plain = plain and family is not Family.BOX
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [])
            group[side].append(o)
    return _Item(ann, ref, (img.width, img.height) if img is not None else None, groups, plain_boxes=plain)


# Above this many pairs an item's own (N, M) kernel beats joining a batch's padded blocks.
_BATCH_PAIRS_MAX = 1024


def _batch_boxes(items: list[_Item], criteria: ProjectCriteria) -> None:
    """Score the axis-aligned box family of many items in one vectorised pass (the common case
    of detection projects); items with rotated boxes or crowd gold take the per-item path.
    Items of similar size share one padded (items x N x M) block, so the kernel and the
    assignment are whole-array operations with no per-pair index arithmetic."""
    batch = []
    for it in items:
        group = it.groups.get(_BOX_KEY)
        if group is not None and it.plain_boxes and len(group[0]) * len(group[1]) <= _BATCH_PAIRS_MAX:
            batch.append((it, *group))
    batch.sort(key=lambda b: len(b[1]) * len(b[2]))
    for chunk in _similar_sizes(batch):
        for (it, a_objs, r_objs), asg in zip(chunk, _assign_chunk(chunk, criteria), strict=True):
            it.results[_BOX_KEY] = _FamilyResult(Family.BOX, a_objs, r_objs, asg)


Chunk = list[tuple[_Item, list[AnnotatedObject], list[AnnotatedObject]]]


def _similar_sizes(batch: Chunk) -> list[Chunk]:
    """Cut items sorted by size into runs whose padded block wastes at most about half of it."""
    chunks: list[Chunk] = []
    chunk: Chunk = []
    big_n = big_m = pairs = 0
    for entry in batch:
        n, m = len(entry[1]), len(entry[2])
        bn, bm = max(big_n, n), max(big_m, m)
        if chunk and (len(chunk) + 1) * bn * bm > 2 * (pairs + n * m) + 256:
            chunks.append(chunk)
            chunk, bn, bm, pairs = [], n, m, 0
        chunk.append(entry)
        big_n, big_m, pairs = bn, bm, pairs + n * m
    if chunk:
        chunks.append(chunk)
    return chunks


def _assign_chunk(chunk: Chunk, criteria: ProjectCriteria) -> list[Assignment]:
    """One padded block: coordinates, labels and thresholds gathered in one loop over objects
    (per object, not per pair, is where a batch of small items spends its Python time)."""
    k = len(chunk)
    big_n = max(len(a) for _, a, _ in chunk)
    big_m = max(len(r) for _, _, r in chunk)
    a_planes = np.zeros((4, k, big_n))
    r_planes = np.zeros((4, k, big_m))
    a_codes = np.full((k, big_n), -1, dtype=np.int64)
    r_codes = np.full((k, big_m), -1, dtype=np.int64)
    codes: dict[str, int] = {}
    a_at: list[int] = []
    r_at: list[int] = []
    a_xywh: list[float] = []
    r_xywh: list[float] = []
    a_lab: list[int] = []
    r_lab: list[int] = []
    for t, (_, a_objs, r_objs) in enumerate(chunk):
        base_a, base_r = t * big_n, t * big_m
        for j, o in enumerate(r_objs):
            b = o.shape
            r_xywh += (b.x, b.y, b.w, b.h)  # type: ignore[union-attr]
            r_lab.append(codes.setdefault(o.label, len(codes)))
            r_at.append(base_r + j)
        for i, o in enumerate(a_objs):
            b = o.shape
            a_xywh += (b.x, b.y, b.w, b.h)  # type: ignore[union-attr]
            a_lab.append(codes.get(o.label, -1))
            a_at.append(base_a + i)
    a_planes.reshape(4, -1)[:, a_at] = np.array(a_xywh).reshape(-1, 4).T
    r_planes.reshape(4, -1)[:, r_at] = np.array(r_xywh).reshape(-1, 4).T
    a_codes.reshape(-1)[a_at] = a_lab
    r_codes.reshape(-1)[r_at] = r_lab
    by_code = np.array([criteria.threshold(label, "box") for label in codes] + [np.inf])
    thresholds = by_code[r_codes]  # padding (code -1) reads inf: never eligible
    n = np.array([len(a) for _, a, _ in chunk], dtype=np.int64)
    m = np.array([len(r) for _, _, r in chunk], dtype=np.int64)
    return assign_batch(geometry.box_iou_blocks(a_planes, r_planes), n, m, a_codes, r_codes, thresholds)


def score_items(
    pairs: Sequence[tuple[Answer, Answer]],
    criteria: ProjectCriteria | None = None,
    checked: Iterable[Content] = (),
) -> list[ItemScore]:
    """`score_item` for many (annotation, reference) pairs of one project at once.

    The same results as one call per pair, faster: the box family of every item is computed and
    matched in one vectorised pass, which is what a stream agent scoring a batch of events wants.
    `checked`: contents the caller has already checked against these same criteria
    (`schemas.validation.content_errors`), as a stream agent does on arrival; not checked again.
    """
    criteria = criteria or DEFAULT_CRITERIA
    checked_ids = {id(c) for c in checked}  # the caller holds them: their ids cannot be reused meanwhile
    items = [_prepare(a, r, criteria, checked_ids) for a, r in pairs]
    _batch_boxes(items, criteria)
    regions = _bulk_regions(items)
    region_sims = _batch_region_sims(items, regions)
    for it in items:
        for key, (a_objs, r_objs) in it.groups.items():
            if key in it.results:
                continue
            known = region_sims.get(id(it)) if key == _REGION_KEY else None
            if known is not None:
                (sim, crowd), kp_a, kp_r = known, None, None
            else:
                sim, crowd, kp_a, kp_r = _similarity(key, a_objs, r_objs, criteria, it.image, regions)
            thresholds = np.array([criteria.threshold(o.label, key[0].value) for o in r_objs])
            asg = assign(sim, [o.label for o in a_objs], [o.label for o in r_objs], thresholds, crowd)
            it.results[key] = _FamilyResult(key[0], a_objs, r_objs, asg, kp_a, kp_r)
    return [_finish(it, criteria) for it in items]


def _bulk_regions(items: list[_Item]) -> Regions:
    """The regions of every polygon this call will compare, built in one `geometry.regions`
    call per image size; a polygon it leaves out (holes, a ring it would reject) is built, or
    rejected, alone when its pair is scored. Families with masks are rasterised instead."""
    todo: dict[tuple[int, int] | None, dict[int, Polygon]] = {}
    for it in items:
        group = it.groups.get(_REGION_KEY)
        if group is None:
            continue
        shapes = [o.shape for side in group for o in side]
        if all(type(s) is Polygon for s in shapes):
            todo.setdefault(it.image, {}).update((id(s), s) for s in shapes)  # type: ignore[misc]
    regions: Regions = {}
    for image, shapes in todo.items():
        built = geometry.regions([(s.points, s.holes) for s in shapes.values()], image)
        for key, geom in zip(shapes, built, strict=True):
            if geom is not None:
                regions[(key, image)] = geom
    return regions


_REGION_KEY = (Family.REGION, "")


def _batch_region_sims(items: list[_Item], regions: Regions) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The region family's (similarity, crowd flags) of every item whose polygons were all built
    in bulk, in one `geometry.region_iou_blocks` pass (by id of the item); the others go through
    `_similarity`, which builds, or rejects, their regions one by one."""
    blocks, ids = [], []
    for it in items:
        group = it.groups.get(_REGION_KEY)
        if group is None:
            continue
        a_objs, r_objs = group
        a = [regions.get((id(o.shape), it.image)) for o in a_objs]
        b = [regions.get((id(o.shape), it.image)) for o in r_objs]
        if None in a or None in b:
            continue
        blocks.append((a, b, np.array([o.iscrowd for o in r_objs], dtype=bool)))
        ids.append(id(it))
    if not blocks:
        return {}
    sims = geometry.region_iou_blocks(blocks)
    return {i: (sim, crowd) for i, sim, (_, _, crowd) in zip(ids, sims, blocks, strict=True)}


def _finish(it: _Item, criteria: ProjectCriteria) -> ItemScore:
    ann, ref = it.ann, it.ref
    results = [it.results[k] for k in sorted(it.results, key=lambda k: (k[0].value, k[1]))]
    t = _tally(results)
    matched = _matched(results, criteria, ann, ref)
    has_objects = bool(ann.objects or ref.objects)
    has_other = bool(ann.classifications or ref.classifications or ann.relationships or ref.relationships)
    # An item with no objects on either side is an "empty item" only where objects are the task.
    objects_task = has_objects or bool(criteria.labels) or not has_other
    empty_correct = criteria.empty_item_correct and objects_task

    metrics = Metrics.trusted(_metric_values(t.m, t.x + t.ud, t.x + t.ug, t.sim_sum, empty_correct, t.x))
    pq_den = t.m + t.x + 0.5 * (t.ud + t.ug)
    if criteria.object_metric == "f1":  # matches at the threshold count whole, as CVAT's quality report
        objects_component = metrics.f1 if metrics.f1 is not None else (1.0 if empty_correct else None)
    else:
        objects_component = t.sim_sum / pq_den if pq_den > 0 else (1.0 if empty_correct else None)
    attr_compared, attr_correct = _attributes(matched, criteria)
    cls_compared, cls_correct, cls_labels = _classifications(ann, ref)
    rel_tp, rel_fp, rel_fn = _relationships(ann, ref, matched)
    components = {
        "objects": min(objects_component, 1.0) if objects_component is not None else None,
        "classifications": ratio(cls_correct, cls_compared),
        "attributes": ratio(attr_correct, attr_compared),
        "relationships": ratio(2 * rel_tp, 2 * rel_tp + rel_fp + rel_fn),
    }
    score, passed = _item_score(components, criteria)
    counts = LabelCounts.trusted
    values = {
        "matches": t.matches,
        "labels": {k: counts({"tp": v[0], "fp": v[1], "fn": v[2], "sim_sum": v[3]}) for k, v in t.labels.items()},
        "objects": ObjectCounts.trusted(
            {"matches": t.m, "mismatches": t.x, "missed": t.ug, "extra": t.ud, "sim_sum": t.sim_sum}
        ),
        "metrics": metrics,
        "components": Components.trusted(components),
        "keypoints": _keypoint_figures(results, criteria),
        "attributes_compared": attr_compared,
        "attributes_correct": attr_correct,
        "classifications_compared": cls_compared,
        "classifications_correct": cls_correct,
        "classification_labels": cls_labels,
        "relationships_tp": rel_tp,
        "relationships_fp": rel_fp,
        "relationships_fn": rel_fn,
        "ignored": t.ignored,
        "score": score,
        "passed": passed,
    }
    # Every figure follows from counts of validated objects (non-negative, ratios clamped to
    # [0, 1]) and is trusted like the rows. A classification label joins two valid names (no
    # control characters) into one that can only break a label's length: a result with a longer
    # one is validated, to fail as a message would.
    if any(len(k) > LABEL_MAX_LENGTH for k in cls_labels):
        return ItemScore.model_validate(values)
    values["classification_labels"] = {k: counts({**v, "sim_sum": 0.0}) for k, v in cls_labels.items()}
    return ItemScore.trusted(values)


def _item_score(c: dict[str, float | None], criteria: ProjectCriteria) -> tuple[float | None, bool | None]:
    """Weighted mean of the components present; pass against the threshold and the minimums."""
    present = []
    for name, w, lo in criteria.component_rules:
        v = c[name]
        if v is not None and w > 0:
            present.append((v, w, lo))
    if not present:
        return None, None
    score = sum(v * w for v, w, _ in present) / sum(w for _, w, _ in present)
    score = min(max(score, 0.0), 1.0)
    passed = score >= criteria.pass_threshold and all(lo is None or v >= lo for v, _, lo in present)
    return score, passed


# --------------------------------------------------------------------------- agreement


def agreement(a: Answer, b: Answer, criteria: ProjectCriteria | None = None) -> float | None:
    """Agreement of two annotators of one item: the item score of comparing them (spec §6)."""
    return score_item(a, b, criteria).score


def pairwise_agreement(answers: Sequence[Answer], criteria: ProjectCriteria | None = None) -> np.ndarray:
    """Symmetric (n, n) matrix of agreements (NaN on the diagonal and where undefined)."""
    n = len(answers)
    out = np.full((n, n), np.nan)
    pairs = list(combinations(range(n), 2))
    # PQ is symmetric, so one comparison per pair serves both directions; all pairs in one batch
    results = score_items([(answers[i], answers[j]) for i, j in pairs], criteria)
    for (i, j), r in zip(pairs, results, strict=True):
        out[i, j] = out[j, i] = np.nan if r.score is None else r.score
    return out


def item_agreement(answers: Sequence[Answer], criteria: ProjectCriteria | None = None) -> float | None:
    """An item's agreement: the mean over annotator pairs."""
    m = pairwise_agreement(answers, criteria)
    vals = m[np.triu_indices(len(answers), 1)]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else None


def consensus_scores(
    answers: Sequence[Answer],
    criteria: ProjectCriteria | None = None,
    method: str | None = None,
    agreement: np.ndarray | None = None,
) -> list[float | None]:
    """Each annotator's consensus score: its agreement with the others (spec §6).

    `mean` is the plain mean agreement with the others. `weighted` (the default) weighs each peer
    by its reliability, its mean agreement with everyone: with three annotators of whom one is
    careless, the two who agree then score high and the outlier low, where the plain mean marks
    all three down alike. `agreement`: the `pairwise_agreement` matrix, when the caller has it.
    """
    method = method or (criteria.consensus.method if criteria is not None else "weighted")
    m = pairwise_agreement(answers, criteria) if agreement is None else agreement
    filled = np.where(np.isnan(m), 0.0, m)
    counts = (~np.isnan(m)).sum(axis=1)
    reliability = np.divide(filled.sum(axis=1), counts, out=np.zeros(len(answers)), where=counts > 0)
    out: list[float | None] = []
    for i, row in enumerate(m):
        peers = [j for j in range(len(answers)) if j != i and not np.isnan(row[j])]
        if not peers:
            out.append(None)
            continue
        values = np.array([row[j] for j in peers])
        weights = np.array([reliability[j] for j in peers]) if method == "weighted" else np.ones(len(peers))
        out.append(float(values @ weights / weights.sum()) if weights.sum() > 0 else float(values.mean()))
    return out


def check_geometry(content: Content) -> None:
    """Raise InvalidGeometry for shapes that cannot be scored (checked once, on arrival, so a bad
    annotation is reported at once and never waits in a consensus round)."""
    for n, o in enumerate(content.objects):
        s = o.shape
        try:
            if isinstance(s, Polygon):
                geometry.checked_rings(s.points, s.holes)
            elif isinstance(s, Mask):
                rle.rle(s.size, s.counts)
        except InvalidGeometry as exc:
            raise InvalidGeometry(str(exc), where=f"content.objects.{n}") from None
