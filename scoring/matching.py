"""Two-pass Hungarian assignment of annotation objects to reference objects (metrics spec §2).

Pass 1 pairs same-label objects; pass 2 pairs the leftovers regardless of label (a label
mismatch). Each pass maximises total similarity, which beats COCO's greedy order when objects
overlap. Crowd references (COCO `iscrowd`) never count as missed, and an annotation object that
falls on one is ignored instead of counted extra, as in COCOeval.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

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
    ann_labels: Sequence[Hashable],
    ref_labels: Sequence[Hashable],
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
    codes: dict[Hashable, int] = {}
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


def assign_batch(
    sim: np.ndarray,
    n: np.ndarray,
    m: np.ndarray,
    ann_codes: np.ndarray,
    ref_codes: np.ndarray,
    thresholds: np.ndarray,
) -> list[Assignment]:
    """`assign` for many items at once, with the same result item by item.

    Padded layout: `sim` (k, N, M) holds item t's (n[t], m[t]) similarity block in its top-left
    corner; `ann_codes` (k, N) and `ref_codes` (k, M) are integer labels, `thresholds` (k, M) one
    per reference; what lies outside the blocks is ignored. Items whose eligible pairs conflict
    (an object that could pair with two) go through the Hungarian `assign`; the rest, most items,
    take their eligible pairs in a few vectorised operations over the whole batch.
    """
    k, big_n, big_m = sim.shape
    n = np.asarray(n, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    valid_a = np.arange(big_n) < n[:, None]
    valid_b = np.arange(big_m) < m[:, None]
    with np.errstate(invalid="ignore"):
        ok = sim >= thresholds[:, None, :]
    ok &= valid_a[:, :, None]
    ok &= valid_b[:, None, :]
    same = ann_codes[:, :, None] == ref_codes[:, None, :]

    def conflicted(mask: np.ndarray) -> np.ndarray:
        return (mask.sum(axis=2) > 1).any(axis=1) | (mask.sum(axis=1) > 1).any(axis=1)

    first = ok & same
    slow = conflicted(first)
    first[slow] = False
    used_a, used_b = first.any(axis=2), first.any(axis=1)
    second = ok & ~same
    second &= ~used_a[:, :, None]
    second &= ~used_b[:, None, :]
    second[slow] = False
    late = conflicted(second)
    if late.any():
        slow |= late
        first[late] = False
        second[late] = False
        used_a, used_b = first.any(axis=2), first.any(axis=1)
    used_a |= second.any(axis=2)
    used_b |= second.any(axis=1)

    out = [Assignment() for _ in range(k)]
    for mask, kind in ((first, "matches"), (second, "mismatches")):
        kk, ii, jj = np.nonzero(mask)
        lists = [getattr(a, kind) for a in out]
        for t, i, j, s in zip(kk.tolist(), ii.tolist(), jj.tolist(), sim[kk, ii, jj].tolist(), strict=True):
            lists[t].append((i, j, s))
    missed = _leftovers(valid_b & ~used_b, k)
    extra = _leftovers(valid_a & ~used_a, k)
    for t in range(k):
        if slow[t]:
            na, nb = int(n[t]), int(m[t])
            out[t] = assign(
                sim[t, :na, :nb], ann_codes[t, :na].tolist(), ref_codes[t, :nb].tolist(), thresholds[t, :nb]
            )
        else:
            out[t].missed, out[t].extra = missed[t], extra[t]
    return out


def _leftovers(free: np.ndarray, k: int) -> list[list[int]]:
    """Per item (row of `free`), the indices of its objects left free."""
    rows, cols = np.nonzero(free)
    cuts = np.searchsorted(rows, np.arange(k + 1)).tolist()
    local = cols.tolist()
    return [local[lo:hi] for lo, hi in pairwise(cuts)]
