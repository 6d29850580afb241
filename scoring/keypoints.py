"""Keypoint similarity: OKS (as COCOeval.computeOks), and RMSE, PCK, missing and extra counts.

Visibility v: 0 not labeled, 1 occluded, 2 visible. By default v=1 counts like v=2 (COCO); a
project may count only v=2 ("visible_only", as CVAT). A keypoint the annotation omits (v=0)
contributes 0 to OKS, where pycocotools would still use its coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from goldstream.scoring.errors import InvalidGeometry, KeypointMismatch

EPS = np.spacing(1)  # pycocotools adds it to the area, so area 0 scores 0 unless exact


def as_keypoints(points: np.ndarray | Sequence, k: int | None = None, where: str = "keypoints") -> np.ndarray:
    """A (K, 3) float array of (x, y, v); a (K, 2) input is taken as all labeled (v=2)."""
    a = np.asarray(points, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise KeypointMismatch(f"expected (K, 2) or (K, 3) keypoints, got shape {a.shape}", where=where)
    if a.shape[1] == 2:
        a = np.concatenate([a, np.full((len(a), 1), 2.0)], axis=1)
    if not np.all(np.isfinite(a)):
        raise InvalidGeometry("keypoints have NaN or infinite coordinates", where=where)
    if k is not None and len(a) != k:
        raise KeypointMismatch(f"{len(a)} keypoints, expected {k}", where=where)
    return a


def labeled(v: np.ndarray, visible_only: bool = False) -> np.ndarray:
    return v >= 2 if visible_only else v > 0


def oks_matrix(
    dt: np.ndarray, gt: np.ndarray, sigmas: np.ndarray, areas: np.ndarray, visible_only: bool = False
) -> np.ndarray:
    """OKS of every annotation set (N, K, 3) against every gold set (M, K, 3) with areas (M,).

    Gold sets with no labeled keypoint are not scored: their column is NaN, which the matcher
    treats as "cannot match" and the item score never sees.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n, m = len(dt), len(gt)
    if n == 0 or m == 0:
        return np.zeros((n, m))
    var = (2 * sigmas) ** 2  # (K,)
    d2 = ((dt[:, None, :, :2] - gt[None, :, :, :2]) ** 2).sum(-1)  # (N, M, K)
    e = d2 / var / (np.asarray(areas, dtype=np.float64)[None, :, None] + EPS) / 2
    sim = np.exp(-e)
    vis_g = labeled(gt[:, :, 2], visible_only)  # (M, K)
    present = labeled(dt[:, :, 2], visible_only)  # (N, K) annotation omitted -> 0
    sim = sim * present[:, None, :]
    counted = vis_g.sum(axis=1)  # (M,)
    total = (sim * vis_g[None, :, :]).sum(-1)
    out = np.full((n, m), np.nan)
    np.divide(total, counted[None, :], out=out, where=counted[None, :] > 0)
    return out


def oks(dt: np.ndarray | Sequence, gt: np.ndarray | Sequence, sigmas: np.ndarray | Sequence, area: float) -> float:
    """OKS of one annotation keypoint set `dt` (K, 2 or 3) against gold `gt` (K, 3).

    The same number as pycocotools' `COCOeval.computeOks` for one pair whose gold has a labeled
    keypoint and whose annotation labels every keypoint. Gold with no labeled keypoint: NaN.
    """
    g = as_keypoints(gt)
    d = as_keypoints(dt, len(g))
    s = np.asarray(sigmas, dtype=np.float64)
    if len(s) != len(g):
        raise KeypointMismatch(f"{len(s)} sigmas for {len(g)} keypoints")
    return float(oks_matrix(d[None], g[None], s, np.array([area]))[0, 0])


def default_area(gt: np.ndarray) -> float:
    """Scale when gold gives neither area nor box: the box around its labeled keypoints."""
    pts = gt[gt[:, 2] > 0, :2]
    if len(pts) == 0:
        return 0.0
    w, h = pts.max(axis=0) - pts.min(axis=0)
    return float(w * h)


@dataclass(frozen=True)
class KeypointPairFigures:
    """RMSE / PCK inputs of one matched pair, kept as sums so they merge across items."""

    sq_err_sum: float  # over gold-labeled keypoints present on both sides
    both: int  # keypoints labeled on both sides
    within: int  # of the gold-labeled ones, annotated within the pixel tolerance
    gold_labeled: int
    missing: int  # gold-labeled, annotation did not label
    extra: int  # annotation labeled, gold did not


def pair_figures(dt: np.ndarray, gt: np.ndarray, tolerance: float, visible_only: bool = False) -> KeypointPairFigures:
    vg, vd = labeled(gt[:, 2], visible_only), labeled(dt[:, 2], visible_only)
    both = vg & vd
    d2 = ((dt[:, :2] - gt[:, :2]) ** 2).sum(-1)
    return KeypointPairFigures(
        sq_err_sum=float(d2[both].sum()),
        both=int(both.sum()),
        within=int((both & (d2 <= tolerance**2)).sum()),
        gold_labeled=int(vg.sum()),
        missing=int((vg & ~vd).sum()),
        extra=int((vd & ~vg).sum()),
    )
