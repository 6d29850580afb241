"""Properties that hold for every input: bounds, symmetry, identity, exact order-free merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from goldstream.scoring import Counters, score_item
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from goldstream import schemas as s
from goldstream import scoring

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

coord = st.floats(-50, 150, allow_nan=False)
size = st.floats(0, 80, allow_nan=False)
pos_size = st.floats(1, 80, allow_nan=False)
box_arrays = st.lists(st.tuples(coord, coord, size, size), min_size=1, max_size=8).map(np.array)
labels = st.sampled_from(["car", "bus", "person"])


@SETTINGS
@given(box_arrays, box_arrays)
def test_box_iou_is_bounded_and_symmetric(a: np.ndarray, b: np.ndarray) -> None:
    m = scoring.box_iou(a, b)
    assert m.shape == (len(a), len(b))
    assert np.all((m >= 0) & (m <= 1)) and not np.isnan(m).any()
    np.testing.assert_allclose(m, scoring.box_iou(b, a).T, atol=1e-12)
    crowd = scoring.box_iou(a, b, np.ones(len(b), dtype=bool))
    assert np.all(crowd >= m - 1e-12)  # I / area(a) >= I / union


@SETTINGS
@given(st.lists(st.tuples(coord, coord, pos_size, pos_size), min_size=1, max_size=8).map(np.array))
def test_a_box_matches_itself_exactly(a: np.ndarray) -> None:
    np.testing.assert_allclose(np.diag(scoring.box_iou(a, a)), 1.0)


rboxes = st.tuples(coord, coord, pos_size, pos_size, st.floats(-180, 180, allow_nan=False))


@SETTINGS
@given(st.lists(rboxes, min_size=1, max_size=5), st.lists(rboxes, min_size=1, max_size=5))
def test_rotated_box_iou_is_bounded_symmetric_and_one_on_itself(a: list, b: list) -> None:
    m = scoring.rotated_box_iou(a, b)
    assert np.all((m >= 0) & (m <= 1 + 1e-12))
    np.testing.assert_allclose(m, scoring.rotated_box_iou(b, a).T, atol=1e-9)
    np.testing.assert_allclose(np.diag(scoring.rotated_box_iou(a, a)), 1.0, atol=1e-9)


@st.composite
def objects(draw: st.DrawFn, prefix: str, n_max: int = 6) -> list[s.AnnotatedObject]:
    """Objects with distinct positions (identical duplicates would make identity ambiguous)."""
    n = draw(st.integers(0, n_max))
    out = []
    for i in range(n):
        x, y = 200.0 * i + draw(st.floats(0, 50)), draw(st.floats(0, 50))
        kind = draw(st.sampled_from(["bbox", "rotated", "polygon", "point", "polyline", "keypoints"]))
        if kind == "bbox":
            shape: s.Shape = s.BBox(x=x, y=y, w=draw(pos_size), h=draw(pos_size))
        elif kind == "rotated":
            shape = s.RotatedBBox(cx=x, cy=y, w=draw(pos_size), h=draw(pos_size), angle=draw(st.floats(-90, 90)))
        elif kind == "polygon":
            r = draw(st.floats(5, 40))
            k = draw(st.integers(3, 8))
            shape = s.Polygon(
                points=[
                    (x + r * math.cos(2 * math.pi * j / k), y + r * math.sin(2 * math.pi * j / k)) for j in range(k)
                ]
            )
        elif kind == "point":
            shape = s.Point(x=x, y=y)
        elif kind == "polyline":
            shape = s.Polyline(points=[(x, y), (x + draw(pos_size), y + draw(size))])
        else:
            shape = s.Keypoints(
                points=[(x + 3.0 * j, y + 2.0 * j, 2) for j in range(17)], area=draw(st.floats(10, 5000))
            )
        out.append(
            s.AnnotatedObject(
                id=f"{prefix}{i}",
                label=draw(labels),
                shape=shape,
                attributes={"color": draw(st.sampled_from(["red", "blue"]))},
            )
        )
    return out


def _jitter(objs: list[s.AnnotatedObject], rnd: np.random.Generator, scale: float) -> list[s.AnnotatedObject]:
    out = []
    for o in objs:
        sh = o.shape
        if isinstance(sh, s.BBox):
            sh = sh.model_copy(update={"x": sh.x + rnd.normal(0, scale), "w": abs(sh.w + rnd.normal(0, scale))})
        elif isinstance(sh, s.Point):
            sh = sh.model_copy(update={"x": sh.x + rnd.normal(0, scale)})
        out.append(o.model_copy(update={"id": "j" + o.id, "shape": sh}))
    return out


@SETTINGS
@given(objects("a"))
def test_identical_answers_score_one(objs: list[s.AnnotatedObject]) -> None:
    c = s.Content(objects=objs)
    r = score_item(c, c)
    assert r.score == 1.0 and r.passed
    assert r.objects.matches == len(objs) and r.objects.missed == r.objects.extra == 0
    assert r.metrics.accuracy == 1.0


def _check_bounds(r: s.ItemScore) -> None:
    for v in (r.score, *r.metrics.model_dump().values(), *r.components.model_dump().values()):
        assert v is None or (0.0 <= v <= 1.0 and not math.isnan(v))
    for m in r.matches:
        assert m.similarity is None or 0.0 <= m.similarity <= 1.0


@SETTINGS
@given(objects("a"), objects("g"), st.integers(0, 2**32 - 1))
def test_scores_are_bounded_and_never_nan(ann: list, gold: list, seed: int) -> None:
    rnd = np.random.default_rng(seed)
    _check_bounds(score_item(s.Content(objects=ann), s.Content(objects=gold)))
    _check_bounds(score_item(s.Content(objects=_jitter(gold, rnd, 3.0)), s.Content(objects=gold)))


@SETTINGS
@given(objects("a"), st.integers(0, 2**32 - 1))
def test_object_agreement_is_symmetric_for_symmetric_similarities(objs: list, seed: int) -> None:
    # OKS depends on the gold side's area and visibility, so keypoints are left out here
    objs = [o for o in objs if not isinstance(o.shape, s.Keypoints)]
    a = s.Content(objects=objs)
    b = s.Content(objects=_jitter(objs, np.random.default_rng(seed), 4.0))
    ab, ba = score_item(a, b), score_item(b, a)
    assert ab.objects.matches == ba.objects.matches
    assert (ab.components.objects is None) == (ba.components.objects is None)
    if ab.components.objects is not None:
        assert math.isclose(ab.components.objects, ba.components.objects, abs_tol=1e-12)


@st.composite
def item_scores(draw: st.DrawFn) -> s.ItemScore:
    gold = draw(objects("g", 4))
    ann = _jitter(gold, np.random.default_rng(draw(st.integers(0, 2**32 - 1))), draw(st.floats(0, 30)))
    ann = ann[: draw(st.integers(0, len(ann)))] + draw(objects("x", 2))
    return score_item(s.Content(objects=ann), s.Content(objects=gold))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(item_scores(), min_size=1, max_size=9), st.randoms(use_true_random=False))
def test_counters_merge_exactly_in_any_order_and_grouping(scores: list[s.ItemScore], rnd) -> None:
    whole = Counters.of(scores)
    shuffled = scores[:]
    rnd.shuffle(shuffled)
    cut1 = rnd.randint(0, len(scores))
    cut2 = rnd.randint(cut1, len(scores))
    a, b, c = (Counters.of(shuffled[:cut1]), Counters.of(shuffled[cut1:cut2]), Counters.of(shuffled[cut2:]))
    assert a.merge(b).merge(c) == whole
    assert a.merge(b.merge(c)) == whole
    assert c.merge(a).merge(b) == whole
    assert Counters().merge(whole) == whole  # the empty counters are the identity
    assert a.merge(b).merge(c).compute() == whole.compute()
    assume(whole.matches > 0)
    f = whole.compute()
    assert f.precision is not None and 0 < f.precision <= 1


dense_boxes = st.lists(
    st.tuples(st.floats(0, 30), st.floats(0, 30), st.floats(1, 25), st.floats(1, 25), st.sampled_from(["a", "b"])),
    max_size=7,
)


@SETTINGS
@given(st.lists(st.tuples(dense_boxes, dense_boxes), min_size=1, max_size=8), st.sampled_from([0.1, 0.3, 0.5]))
def test_batch_assignment_equals_item_by_item_hungarian(items: list, threshold: float) -> None:
    """Crowded boxes make conflicting pairs common, so both paths of assign_batch are exercised;
    items of different sizes share one padded block, whose padding must never match."""
    from goldstream.scoring.geometry import box_iou_blocks
    from goldstream.scoring.matching import assign, assign_batch

    codes = {"a": 0, "b": 1}
    k = len(items)
    big_n = max(len(a) for a, _ in items)
    big_m = max(len(g) for _, g in items)
    a_planes, r_planes = np.zeros((4, k, big_n)), np.zeros((4, k, big_m))
    a_codes, r_codes = np.full((k, big_n), -1), np.full((k, big_m), -1)
    expected = []
    for t, (a, g) in enumerate(items):
        aa = np.array([x[:4] for x in a]).reshape(-1, 4)
        gg = np.array([x[:4] for x in g]).reshape(-1, 4)
        a_planes[:, t, : len(a)], r_planes[:, t, : len(g)] = aa.T, gg.T
        la, lg = [x[4] for x in a], [x[4] for x in g]
        a_codes[t, : len(a)] = [codes[x] for x in la]
        r_codes[t, : len(g)] = [codes[x] for x in lg]
        expected.append(assign(scoring.box_iou(aa, gg), la, lg, threshold))
    sim = box_iou_blocks(a_planes, r_planes)
    for t, (a, g) in enumerate(items):  # the blocks kernel agrees with the matrix kernel
        aa, gg = (np.array([x[:4] for x in side]).reshape(-1, 4) for side in (a, g))
        block = scoring.box_iou(aa, gg)
        np.testing.assert_allclose(sim[t, : len(a), : len(g)], block, atol=1e-12)
    got = assign_batch(
        sim,
        np.array([len(a) for a, _ in items]),
        np.array([len(g) for _, g in items]),
        a_codes,
        r_codes,
        np.full((k, big_m), threshold),
    )
    assert got == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(objects("a", 4), objects("g", 4)), min_size=1, max_size=6))
def test_score_items_equals_score_item_one_by_one(pairs: list) -> None:
    contents = [(s.Content(objects=a), s.Content(objects=g)) for a, g in pairs]
    assert scoring.score_items(contents) == [score_item(a, g) for a, g in contents]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(objects("a", 5), objects("g", 5)), min_size=1, max_size=5))
def test_a_score_built_without_validation_is_the_one_validation_builds(pairs: list) -> None:
    """Scoring builds its result rows with `Model.trusted`: each must be exactly what strict
    validation makes of the same values (every field present, the right types and ranges)."""
    for r in scoring.score_items([(s.Content(objects=a), s.Content(objects=g)) for a, g in pairs]):
        for part in [r, *r.matches, *r.labels.values(), r.objects, r.metrics, r.components]:
            again = type(part).model_validate(part.model_dump())
            assert again == part and again.model_fields_set == part.model_fields_set
            assert again.model_dump_json() == part.model_dump_json()


_NAMES = st.text(alphabet="abcxyz/ -", min_size=1, max_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(_NAMES, st.lists(_NAMES, max_size=3), max_size=3),
    st.dictionaries(_NAMES, st.lists(_NAMES, max_size=3), max_size=3),
)
@example({"t" * 100: ["x" * 28]}, {})  # 129 characters joined
@example({"t" * 100: ["x" * 27]}, {"t" * 100: ["x" * 27, "y"]})  # 128
def test_classification_rows_are_trusted_only_where_their_joined_names_fit_a_label(a: dict, g: dict) -> None:
    """A classification row is named 'taxonomy/label', two valid names joined, which can outgrow
    a label: such a result is validated and fails as a message would; any other is built
    unvalidated and must be exactly what validation makes of it."""
    pair = (s.Content(classifications=a), s.Content(classifications=g))
    joined = [f"{t}/{x}" for side in (a, g) for t, xs in side.items() for x in xs]
    if any(len(n) > 128 for n in joined):
        with pytest.raises(ValidationError, match="classification_labels"):
            scoring.score_items([pair])
        return
    (r,) = scoring.score_items([pair])
    again = s.ItemScore.model_validate(r.model_dump())
    assert again == r and again.model_dump_json() == r.model_dump_json()
    expected = {}  # each 'taxonomy/label' counted from the two answers' sets (in name order, as
    for t in sorted(set(a) | set(g)):  # two joined names can coincide: 'a/b' + 'c', 'a' + 'b/c')
        mine, truth = set(a.get(t, [])), set(g.get(t, []))
        for x in sorted(mine | truth):
            expected[f"{t}/{x}"] = s.LabelCounts(
                tp=int(x in mine & truth), fp=int(x in mine - truth), fn=int(x in truth - mine)
            )
    assert r.classification_labels == expected


def test_trusted_instances_share_a_field_set_that_refuses_change_and_their_copies_own_one() -> None:
    """`Model.trusted` gives every instance of a class one shared field set (one container less
    per result row): changing it would reach every row, so it refuses, and a copy that pydantic
    updates gets a set of its own."""
    boxes = [s.AnnotatedObject(id=f"o{i}", label="car", shape=s.BBox(x=10 * i, y=0, w=8, h=8)) for i in range(2)]
    first, second = scoring.score_items([(s.Content(objects=boxes), s.Content(objects=boxes))] * 2)
    row, other = first.matches[0], second.matches[1]
    assert row.model_fields_set is other.model_fields_set == set(s.ObjectMatch.model_fields)
    with pytest.raises(TypeError):
        row.model_fields_set.add("similarity")
    for copied in (row.model_copy(update={"similarity": 0.5}), row.model_copy(deep=True, update={"similarity": 0.5})):
        assert copied.similarity == 0.5 and row.similarity == 1.0
        assert copied.model_fields_set is not row.model_fields_set
    assert row.model_dump(exclude_unset=True) == row.model_dump()
