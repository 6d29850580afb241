"""Two-pass Hungarian assignment of annotation objects to reference objects (metrics spec §2).

Pass 1 pairs same-label objects; pass 2 pairs the leftovers regardless of label (a label
mismatch). Each pass maximises total similarity, which beats COCO's greedy order when objects
overlap. Crowd references (COCO `iscrowd`) never count as missed, and an annotation object that
falls on one is ignored instead of counted extra, as in COCOeval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

# Eligible pairs get this bonus so that a pair at similarity exactly 0 (a point at the tolerance)
# still outweighs "no pair"; it is far below any real difference in similarity.
_ELIGIBLE_BONUS = 1e-9


@dataclass
class Assignment:
    """Index pairs (annotation i, reference j, similarity) and the leftovers of each side."""

    matches: list[tuple[int, int, float]] = field(default_factory=list)
    mismatches: list[tuple[int, int, float]] = field(default_factory=list)
    missed: list[int] = field(default_factory=list)  # reference indices (Ug)
    extra: list[int] = field(default_factory=list)  # annotation indices (Ud)
    ignored: list[int] = field(default_factory=list)  # annotation indices on crowd regions


def _solve(weights: np.ndarray, eligible: np.ndarray) -> list[tuple[int, int]]:
    if weights.size == 0:
        return []
    w = np.where(eligible, weights + _ELIGIBLE_BONUS, 0.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if eligible[r, c]]


def assign(
    sim: np.ndarray,
    ann_labels: np.ndarray | list[str],
    ref_labels: np.ndarray | list[str],
    thresholds: np.ndarray | float,
    crowd: np.ndarray | None = None,
) -> Assignment:
    """Assign annotation objects (rows of `sim`) to reference objects (columns).

    `sim` may hold NaN for pairs that cannot match (a point beyond its tolerance, gold keypoints
    with nothing labeled). `thresholds` (one per reference, its label's) are inclusive.
    """
    sim = np.asarray(sim, dtype=np.float64)
    n, m = sim.shape
    al = np.asarray(ann_labels, dtype=object).reshape(n)
    rl = np.asarray(ref_labels, dtype=object).reshape(m)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (m,))
    is_crowd = np.zeros(m, dtype=bool) if crowd is None else np.asarray(crowd, dtype=bool)
    finite = ~np.isnan(sim)
    ok = finite & (np.where(finite, sim, -1.0) >= thr[None, :]) & ~is_crowd[None, :]
    same = al[:, None] == rl[None, :]
    out = Assignment()

    for i, j in _solve(sim, ok & same):
        out.matches.append((i, j, float(sim[i, j])))
    used_r = {i for i, _, _ in out.matches}
    used_c = {j for _, j, _ in out.matches}
    rows = np.array([i for i in range(n) if i not in used_r], dtype=int)
    cols = np.array([j for j in range(m) if j not in used_c and not is_crowd[j]], dtype=int)
    if len(rows) and len(cols):
        for a, b in _solve(sim[np.ix_(rows, cols)], ok[np.ix_(rows, cols)]):
            i, j = int(rows[a]), int(cols[b])
            out.mismatches.append((i, j, float(sim[i, j])))
    used_r |= {i for i, _, _ in out.mismatches}
    used_c |= {j for _, j, _ in out.mismatches}
    out.missed = [j for j in range(m) if j not in used_c and not is_crowd[j]]
    on_crowd = finite & (np.where(finite, sim, -1.0) >= thr[None, :]) & is_crowd[None, :]
    for i in range(n):
        if i in used_r:
            continue
        (out.ignored if on_crowd[i].any() else out.extra).append(i)
    return out
