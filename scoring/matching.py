"""Two-pass Hungarian assignment of annotation objects to reference objects (metrics spec §2).

Pass 1 pairs same-label objects; pass 2 pairs the leftovers regardless of label (a label
mismatch). Each pass maximises total similarity, which beats COCO's greedy order when objects
overlap. Crowd references (COCO `iscrowd`) never count as missed, and an annotation object that
falls on one is ignored instead of counted extra, as in COCOeval.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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

    `sim` concatenates each item's row-major (n_k, m_k) similarity block; `ann_codes` (sum n)
    and `ref_codes` (sum m) are integer labels; `thresholds` (sum m) one per reference. Items
    whose eligible pairs conflict (an object that could pair with two) go through the Hungarian
    `assign`; the rest, most items, take their eligible pairs in a few vectorised operations.
    """
    k = len(n)
    n = np.asarray(n, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    c = n * m
    off_a, off_b, off_p = np.cumsum(n) - n, np.cumsum(m) - m, np.cumsum(c) - c
    item = np.repeat(np.arange(k), c)
    local = np.arange(len(sim)) - off_p[item]
    mm = np.maximum(m[item], 1)
    gi = off_a[item] + local // mm
    gj = off_b[item] + local % mm
    with np.errstate(invalid="ignore"):
        ok = sim >= thresholds[gj]
    same = ann_codes[gi] == ref_codes[gj]
    total_a, total_b = int(n.sum()), int(m.sum())

    def conflicted(mask: np.ndarray) -> np.ndarray:
        ci, cj = gi[mask], gj[mask]
        rows = np.bincount(ci, minlength=total_a)[ci] > 1
        cols = np.bincount(cj, minlength=total_b)[cj] > 1
        bad = np.zeros(k, dtype=bool)
        bad[item[mask][rows | cols]] = True
        return bad

    first = ok & same
    slow = conflicted(first)
    first &= ~slow[item]
    used_a = np.zeros(total_a, dtype=bool)
    used_b = np.zeros(total_b, dtype=bool)
    used_a[gi[first]] = True
    used_b[gj[first]] = True
    second = ok & ~same & ~used_a[gi] & ~used_b[gj] & ~slow[item]
    slow |= conflicted(second)
    first &= ~slow[item]
    second &= ~slow[item]
    used_a[:] = False
    used_b[:] = False
    used_a[gi[first | second]] = True
    used_b[gj[first | second]] = True

    out = [Assignment() for _ in range(k)]
    for mask, kind in ((first, "matches"), (second, "mismatches")):
        idx = np.flatnonzero(mask)
        for it, i, j, s in zip(
            item[idx].tolist(),
            (gi[idx] - off_a[item[idx]]).tolist(),
            (gj[idx] - off_b[item[idx]]).tolist(),
            sim[idx].tolist(),
            strict=True,
        ):
            getattr(out[it], kind).append((i, j, s))
    for it, (na, nb, oa, ob, op) in enumerate(
        zip(n.tolist(), m.tolist(), off_a.tolist(), off_b.tolist(), off_p.tolist(), strict=True)
    ):
        if slow[it]:
            block = sim[op : op + na * nb].reshape(na, nb)
            out[it] = assign(
                block, ann_codes[oa : oa + na].tolist(), ref_codes[ob : ob + nb].tolist(), thresholds[ob : ob + nb]
            )
            continue
        out[it].missed = [j for j in range(nb) if not used_b[ob + j]]
        out[it].extra = [i for i in range(na) if not used_a[oa + i]]
    return out
