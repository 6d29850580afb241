"""scoring against the field's reference implementation (pycocotools) and against shapely,
on thousands of random cases each."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from goldstream.scoring import rle as R
from goldstream.scoring.geometry import region
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval, Params
from shapely import affinity

from goldstream import scoring

RNG_SEEDS = range(5)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(-20, 100, (n, 2))
    wh = rng.uniform(0, 60, (n, 2))
    wh[rng.random(n) < 0.1] = 0.0  # zero-area boxes
    boxes = np.concatenate([xy, wh], axis=1)
    snap = rng.random(n) < 0.3  # integer boxes: touching edges and exact ties happen
    boxes[snap] = np.round(boxes[snap])
    return boxes


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_box_iou_equals_pycocotools_with_and_without_crowd(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = 0
    for _ in range(400):
        a, b = _random_boxes(rng, rng.integers(1, 12)), _random_boxes(rng, rng.integers(1, 12))
        crowd = rng.random(len(b)) < 0.3
        theirs = mask_utils.iou(a.tolist(), b.tolist(), crowd.astype(np.uint8).tolist())
        np.testing.assert_allclose(scoring.box_iou(a, b, crowd), theirs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            scoring.box_iou(a, b), mask_utils.iou(a.tolist(), b.tolist(), [0] * len(b)), rtol=0, atol=1e-12
        )
        cases += a.shape[0] * b.shape[0]
    assert cases > 10_000


def test_box_iou_of_a_large_matrix_equals_pycocotools() -> None:
    rng = np.random.default_rng(42)
    a, b = _random_boxes(rng, 300), _random_boxes(rng, 200)
    np.testing.assert_allclose(scoring.box_iou(a, b), mask_utils.iou(a.tolist(), b.tolist(), [0] * 200), atol=1e-12)


def _coco_oks(dts: np.ndarray, gts: np.ndarray, areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """pycocotools' own computeOks on one image and category."""
    ev = COCOeval(iouType="keypoints")
    ev.params = Params(iouType="keypoints")
    ev.params.kpt_oks_sigmas = sigmas
    ev.params.maxDets = [len(dts)]
    ev._gts = {
        (1, 1): [
            {"keypoints": g.ravel().tolist(), "area": float(a), "bbox": [0.0, 0.0, 1.0, 1.0]}
            for g, a in zip(gts, areas, strict=True)
        ]
    }
    # equal scores keep the detections in input order (mergesort is stable)
    ev._dts = {(1, 1): [{"keypoints": d.ravel().tolist(), "score": 1.0} for d in dts]}
    return np.asarray(ev.computeOks(1, 1))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_oks_equals_pycocotools_compute_oks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigmas = Params(iouType="keypoints").kpt_oks_sigmas
    k = len(sigmas)
    pairs = 0
    for _ in range(200):
        n, m = rng.integers(1, 6), rng.integers(1, 6)
        gts = np.zeros((m, k, 3))
        gts[..., :2] = rng.uniform(0, 200, (m, k, 2))
        gts[..., 2] = rng.choice([0, 1, 2], (m, k), p=[0.2, 0.3, 0.5])
        gts[0, :, 2] = np.maximum(gts[0, :, 2], 1)  # at least one gold set fully labeled
        for g in gts:  # every gold set has a labeled keypoint (the unlabeled case is spec-specific)
            if not (g[:, 2] > 0).any():
                g[rng.integers(k), 2] = 2
        dts = np.zeros((n, k, 3))
        dts[..., :2] = gts[rng.integers(0, m, n)][..., :2] + rng.normal(0, rng.uniform(0.5, 20), (n, k, 2))
        dts[..., 2] = 2  # the annotation labels every keypoint, as COCO detections do
        areas = rng.uniform(0, 20_000, m)
        areas[rng.random(m) < 0.1] = 0.0
        ours = scoring.oks_matrix(dts, gts, sigmas, areas)
        np.testing.assert_allclose(ours, _coco_oks(dts, gts, areas, sigmas), rtol=1e-12, atol=1e-15)
        pairs += n * m
        i, j = rng.integers(n), rng.integers(m)
        assert scoring.oks(dts[i], gts[j], sigmas, areas[j]) == pytest.approx(ours[i, j], abs=1e-15)
    assert pairs > 1_000


def _random_polygon(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A star-shaped polygon (valid, often concave) well inside an h x w image."""
    k = rng.integers(3, 12)
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(10, 40, k)
    c = rng.uniform(45, min(h, w) - 45, 2)
    return np.stack([c[0] + r * np.cos(angles), c[1] + r * np.sin(angles)], axis=1)


def test_polygon_iou_agrees_with_pycocotools_raster_iou_within_perimeter_over_area() -> None:
    rng = np.random.default_rng(7)
    h = w = 160
    worst = 0.0
    for _ in range(1000):
        pa = _random_polygon(rng, h, w)
        pb = pa + rng.normal(0, 6, pa.shape) if rng.random() < 0.7 else _random_polygon(rng, h, w)
        ga, gb = region(pa), region(pb)
        if ga.area < 50 or gb.area < 50:
            continue
        exact = scoring.polygon_iou(pa, pb)
        ra = mask_utils.merge(mask_utils.frPyObjects([pa.ravel().tolist()], h, w))
        rb = mask_utils.merge(mask_utils.frPyObjects([pb.ravel().tolist()], h, w))
        raster = mask_utils.iou([ra], [rb], [0])[0, 0]
        bound = ga.length / ga.area + gb.length / gb.area  # spec: "within about perimeter/area"
        worst = max(worst, abs(exact - raster) / bound)
        assert abs(exact - raster) <= bound, (exact, raster, bound)
    assert worst > 0  # the two really are different computations


def test_polygon_iou_equals_shapely_exact_areas() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        pa, pb = _random_polygon(rng, 200, 200), _random_polygon(rng, 200, 200)
        a, b = shapely.Polygon(pa), shapely.Polygon(pb)
        if not (a.is_valid and b.is_valid):
            continue
        inter = a.intersection(b).area
        expected = inter / (a.area + b.area - inter)
        assert scoring.polygon_iou(pa, pb) == pytest.approx(expected, abs=1e-12)


def test_rotated_box_iou_equals_shapely_rotated_rectangles() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        a = np.concatenate([rng.uniform(20, 80, 2), rng.uniform(1, 40, 2), rng.uniform(-180, 180, 1)])
        b = a + np.concatenate([rng.normal(0, 8, 2), rng.normal(0, 5, 2), rng.normal(0, 20, 1)])
        b[2:4] = np.abs(b[2:4]) + 0.5

        def poly(r: np.ndarray) -> shapely.Polygon:
            cx, cy, w_, h_, ang = r
            # shapely rotates counter-clockwise with y up, which is clockwise on a y-down screen
            return affinity.rotate(
                shapely.box(cx - w_ / 2, cy - h_ / 2, cx + w_ / 2, cy + h_ / 2), ang, origin=(cx, cy)
            )

        pa, pb = poly(a), poly(b)
        inter = pa.intersection(pb).area
        expected = inter / (pa.area + pb.area - inter)
        assert scoring.rotated_box_iou([a], [b])[0, 0] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_rle_codec_and_iou_equal_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for t in range(200):
        h, w = rng.integers(1, 50, 2)
        ma = rng.random((h, w)) < rng.random()
        mb = rng.random((h, w)) < rng.random()
        ea = mask_utils.encode(np.asfortranarray(ma.astype(np.uint8)))
        eb = mask_utils.encode(np.asfortranarray(mb.astype(np.uint8)))
        ra, rb = R.from_dense(ma), R.from_dense(mb)
        assert R.encode_counts(ra.counts) == ea["counts"].decode()
        np.testing.assert_array_equal(R.decode_counts(ea["counts"].decode()), ra.counts)
        np.testing.assert_array_equal(R.to_dense(R.rle((h, w), ea["counts"].decode())), ma)
        assert ra.area == int(mask_utils.area(ea))
        crowd = [bool(t % 3 == 0)]
        assert scoring.rle_iou([ra], [rb], crowd)[0, 0] == pytest.approx(
            mask_utils.iou([ea], [eb], crowd)[0, 0], abs=1e-12
        )


def test_rasterized_polygon_matches_pycocotools_area_closely() -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        p = _random_polygon(rng, 120, 120)
        ours = R.rasterize(region(p), (120, 120)).area
        theirs = int(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([p.ravel().tolist()], 120, 120))))
        g = region(p)
        assert abs(ours - theirs) <= g.length  # both rasterisers err by at most a pixel along the edge
        assert abs(ours - g.area) <= g.length
