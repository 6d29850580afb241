"""Two-pass Hungarian assignment of annotation objects to reference objects (metrics spec §2).

Pass 1 pairs same-label objects; pass 2 pairs the leftovers regardless of label (a label
mismatch). Each pass maximises total similarity, which beats COCO's greedy order when objects
overlap. Crowd references (COCO `iscrowd`) never count as missed, and an annotation object that
falls on one is ignored instead of counted extra, as in COCOeval.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _solve(sim: np.ndarray, eligible: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-similarity pairs among eligible ones. Most items have no conflict (each object
    overlaps one object of the other side): those take the eligible pairs as they are."""
    ii, jj = np.nonzero(eligible)
    rows, cols = ii.tolist(), jj.tolist()
    if len(set(rows)) == len(rows) and len(set(cols)) == len(cols):
        return list(zip(rows, cols, strict=True))
    w = np.where(eligible, sim + _ELIGIBLE_BONUS, 0.0)
    r, c = linear_sum_assignment(w, maximize=True)
    return [(i, j) for i, j in zip(r.tolist(), c.tolist(), strict=True) if eligible[i, j]]


def assign(
    sim: np.ndarray,
    ann_labels: Sequence[str],
    ref_labels: Sequence[str],
    thresholds: np.ndarray | float,
    crowd: np.ndarray | None = None,
) -> Assignment:
    """Assign annotation objects (rows of `sim`) to reference objects (columns).

    `sim` may hold NaN for pairs that cannot match (a point beyond its tolerance, gold keypoints
    with nothing labeled). `thresholds` (one per reference, its label's) are inclusive.
    """
    sim = np.asarray(sim, dtype=np.float64)
    n, m = sim.shape
    out = Assignment()
    if n == 0 or m == 0:
        out.missed = [j for j in range(m) if crowd is None or not crowd[j]]
        out.extra = list(range(n))
        return out
    with np.errstate(invalid="ignore"):
        ok = sim >= thresholds  # NaN compares False: "cannot match"
    on_crowd = None
    if crowd is not None and crowd.any():
        on_crowd = ok & crowd
        ok = ok & ~crowd
    codes: dict[str, int] = {}
    rl = np.fromiter((codes.setdefault(x, len(codes)) for x in ref_labels), dtype=np.int64, count=m)
    al = np.fromiter((codes.get(x, -1) for x in ann_labels), dtype=np.int64, count=n)

    for i, j in _solve(sim, ok & (al[:, None] == rl)):
        out.matches.append((i, j, float(sim[i, j])))
    used_r = [i for i, _, _ in out.matches]
    used_c = [j for _, j, _ in out.matches]
    if len(used_r) < n and len(used_c) < m:
        left = ok.copy()
        left[used_r, :] = False
        left[:, used_c] = False
        for i, j in _solve(sim, left):
            out.mismatches.append((i, j, float(sim[i, j])))
            used_r.append(i)
            used_c.append(j)
    taken_r, taken_c = set(used_r), set(used_c)
    out.missed = [j for j in range(m) if j not in taken_c and (crowd is None or not crowd[j])]
    for i in range(n):
        if i not in taken_r:
            (out.ignored if on_crowd is not None and on_crowd[i].any() else out.extra).append(i)
    return out
