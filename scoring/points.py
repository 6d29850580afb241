"""Similarity of points (pixel tolerance) and polylines (resampled distance with a tolerance)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from goldstream.scoring.errors import InvalidGeometry


def point_similarity(a: np.ndarray | Sequence, b: np.ndarray | Sequence, tolerance: float | np.ndarray) -> np.ndarray:
    """(N, M) similarity 1 - d/τ of points `a` (N, 2) and `b` (M, 2); NaN where d > τ (no match).

    `tolerance` is a scalar or one τ per `b` point (per-label tolerances). A point matches only
    within τ, so pairs beyond it are marked unmatchable rather than given a similarity of 0.
    """
    pa = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    pb = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(pb))):
        raise InvalidGeometry("point has NaN or infinite coordinates")
    tau = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), (len(pb),))[None, :]
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    sim = 1.0 - d / tau
    return np.where(d <= tau, np.clip(sim, 0.0, 1.0), np.nan)


def _arc_positions(line: np.ndarray) -> np.ndarray:
    seg = np.sqrt((np.diff(line, axis=0) ** 2).sum(-1))
    total = seg.sum()
    if total == 0:
        return np.linspace(0.0, 1.0, len(line))
    return np.concatenate([[0.0], np.cumsum(seg) / total])


def _at(line: np.ndarray, pos: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(u, pos, line[:, 0]), np.interp(u, pos, line[:, 1])], axis=1)


def polyline_similarity(
    a: np.ndarray | Sequence, b: np.ndarray | Sequence, tolerance: float, oriented: bool = False
) -> float:
    """Mean of exp(-d²/(2t²)) over both lines resampled at the union of their normalised
    arc-length breakpoints; the better of forward and reversed unless `oriented`."""
    la = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    lb = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if len(la) < 2 or len(lb) < 2:
        raise InvalidGeometry("a polyline needs at least 2 points")
    if not (np.all(np.isfinite(la)) and np.all(np.isfinite(lb))):
        raise InvalidGeometry("polyline has NaN or infinite coordinates")
    pa = _arc_positions(la)
    best = 0.0
    for lbb in (lb,) if oriented else (lb, lb[::-1]):
        pb = _arc_positions(lbb)
        u = np.union1d(pa, pb)
        d2 = ((_at(la, pa, u) - _at(lbb, pb, u)) ** 2).sum(-1)
        best = max(best, float(np.exp(-d2 / (2 * tolerance**2)).mean()))
    return best


def polyline_similarity_matrix(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], tolerance: Sequence[float], oriented: Sequence[bool]
) -> np.ndarray:
    """(N, M) polyline similarities; tolerance and orientation per `b` line (its label's)."""
    out = np.zeros((len(a), len(b)))
    for j, lb in enumerate(b):
        for i, la in enumerate(a):
            out[i, j] = polyline_similarity(la, lb, tolerance[j], oriented[j])
    return out
