"""Area similarity of boxes, rotated boxes and polygons, as (N, M) matrices.

Boxes are pure numpy (the same numbers as pycocotools' `bbIou`); rotated boxes and polygons are
exact areas through shapely's vectorised operations, after a cheap bounding-box test so that
pairs that cannot overlap never reach GEOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import shapely
from goldstream.scoring.errors import InvalidGeometry
from shapely.geometry.base import BaseGeometry


def unit(sim: np.ndarray) -> np.ndarray:
    """Clip similarities (in place) to [0, 1] and snap rounding noise next to 1 (an object against itself
    computes I and U through different float operations; it must still score exactly 1)."""
    np.clip(sim, 0.0, 1.0, out=sim)
    sim[sim > 1.0 - 1e-12] = 1.0
    return sim


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise InvalidGeometry(f"{what} has NaN or infinite coordinates")
    return a


def as_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """A (N, 4) float64 array of `[x, y, w, h]`, checked finite with non-negative sizes."""
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    _finite(a, "box")
    if np.any(a[:, 2:] < 0):
        raise InvalidGeometry("box has a negative width or height")
    return a


def box_iou(
    a: np.ndarray | Sequence, b: np.ndarray | Sequence, iscrowd: np.ndarray | Sequence | None = None
) -> np.ndarray:
    """IoU matrix (N, M) of boxes `a` (N, 4) against `b` (M, 4), `[x, y, w, h]`.

    `iscrowd` (M,) marks crowd regions in `b`: their similarity is I / area(a), as in COCO.
    Zero-area and touching boxes give 0, never NaN. Matches pycocotools `mask.iou(a, b, iscrowd)`.
    """
    return box_iou_unchecked(as_boxes(a), as_boxes(b), iscrowd)


def box_iou_unchecked(a: np.ndarray, b: np.ndarray, iscrowd: np.ndarray | Sequence | None = None) -> np.ndarray:
    """box_iou of float64 arrays already known to be finite with non-negative sizes (validated
    messages): every numpy call costs microseconds on 10 x 10 matrices, so none is spared."""
    return _xywh_iou(a[:, 0:1], a[:, 1:2], a[:, 2:3], a[:, 3:4], b[:, 0], b[:, 1], b[:, 2], b[:, 3], iscrowd)


def box_iou_blocks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrices of many items in one pass: `a` (4, k, N) and `b` (4, k, M) hold x, y, w, h
    planes of k items' boxes (padded); the result is (k, N, M). Planes, not (k, N, 4) rows:
    contiguous columns are what the element-wise kernel reads fastest."""
    ax, ay, aw, ah = (p[:, :, None] for p in a)
    bx, by, bw, bh = (p[:, None, :] for p in b)
    return _xywh_iou(ax, ay, aw, ah, bx, by, bw, bh, None)


def _xywh_iou(
    ax: np.ndarray,
    ay: np.ndarray,
    aw: np.ndarray,
    ah: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
    bw: np.ndarray,
    bh: np.ndarray,
    iscrowd: np.ndarray | Sequence | None,
) -> np.ndarray:
    # In place wherever possible: on 100 x 100 matrices the temporaries cost more than the maths.
    iw = np.minimum(ax + aw, bx + bw)
    iw -= np.maximum(ax, bx)
    np.maximum(iw, 0.0, out=iw)
    ih = np.minimum(ay + ah, by + bh)
    ih -= np.maximum(ay, by)
    np.maximum(ih, 0.0, out=ih)
    inter = np.multiply(iw, ih, out=iw)
    area_a = aw * ah
    union = area_a + bw * bh
    union -= inter
    if iscrowd is not None:
        crowd = np.asarray(iscrowd, dtype=bool)
        if crowd.any():
            union = np.where(crowd, np.broadcast_to(area_a, union.shape), union)
    # union is 0 only where inter is 0 (two empty boxes): divide by a tiny number to get 0, not NaN
    np.maximum(union, np.finfo(np.float64).tiny, out=union)
    return unit(np.divide(inter, union, out=inter))


def rotated_corners(rboxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Corners (N, 4, 2) of `[cx, cy, w, h, angle]` boxes, angle in degrees clockwise on screen.

    With y pointing down, a clockwise turn on screen is the usual rotation matrix applied to
    screen coordinates, so no sign flip is needed.
    """
    r = np.asarray(rboxes, dtype=np.float64).reshape(-1, 5)
    _finite(r, "rotated box")
    if np.any(r[:, 2:4] < 0):
        raise InvalidGeometry("rotated box has a negative width or height")
    cx, cy, w, h, ang = (r[:, i] for i in range(5))
    t = np.deg2rad(ang)
    cos, sin = np.cos(t), np.sin(t)
    half = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    local = half[None, :, :] * np.stack([w, h], axis=1)[:, None, :]
    x = local[..., 0] * cos[:, None] - local[..., 1] * sin[:, None] + cx[:, None]
    y = local[..., 0] * sin[:, None] + local[..., 1] * cos[:, None] + cy[:, None]
    return np.stack([x, y], axis=-1)


def _iou_of_geometries(
    ga: np.ndarray, gb: np.ndarray, bounds_a: np.ndarray, bounds_b: np.ndarray, crowd: np.ndarray | None = None
) -> np.ndarray:
    """Exact IoU matrix of shapely geometries, computing intersections only where bounds overlap.

    `crowd` (M,) marks crowd regions in `gb`, whose similarity is I / area(a) (COCO)."""
    n, m = len(ga), len(gb)
    out = np.zeros((n, m))
    if n == 0 or m == 0:
        return out
    overlap = (
        (bounds_a[:, None, 0] < bounds_b[None, :, 2])
        & (bounds_b[None, :, 0] < bounds_a[:, None, 2])
        & (bounds_a[:, None, 1] < bounds_b[None, :, 3])
        & (bounds_b[None, :, 1] < bounds_a[:, None, 3])
    )
    ii, jj = np.nonzero(overlap)
    if len(ii) == 0:
        return out
    scale = max(1.0, float(np.abs(bounds_a).max()), float(np.abs(bounds_b).max()))
    crowd_b = None if crowd is None else np.asarray(crowd, dtype=bool)
    out[ii, jj] = _pair_ious(ga, gb, ii, jj, crowd_b, lambda empty: np.full(len(empty), scale * 1e-12))
    return out


def _pair_ious(
    ga: np.ndarray,
    gb: np.ndarray,
    ia: np.ndarray,
    jb: np.ndarray,
    crowd: np.ndarray | None,
    grids: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """IoU of the pairs (ga[ia], gb[jb]); crowd `gb` (bool per geometry): I / area(a).

    GEOS' floating overlay can return an empty intersection for shapes sharing collinear edges,
    in one argument order only (found by the symmetry property test): those pairs are redone
    with snap-rounding on a grid 1e-12 of the coordinates' magnitude (3x the cost); `grids`
    gives each such pair's grid from its position among the pairs."""
    inter = shapely.area(shapely.intersection(ga[ia], gb[jb]))
    empty = np.flatnonzero(inter == 0)
    if len(empty):
        grid = grids(empty)
        for g in np.unique(grid).tolist():  # grid_size takes one value per call
            e = empty[grid == g]
            inter[e] = shapely.area(shapely.intersection(ga[ia[e]], gb[jb[e]], grid_size=g))
    area_a = shapely.area(ga)[ia]
    union = area_a + shapely.area(gb)[jb] - inter
    if crowd is not None:
        union = np.where(crowd[jb], area_a, union)
    vals = np.zeros_like(inter)
    np.divide(inter, union, out=vals, where=(inter > 0) & (union > 0))
    return unit(vals)


def rotated_box_iou(
    a: np.ndarray | Sequence, b: np.ndarray | Sequence, iscrowd: np.ndarray | None = None
) -> np.ndarray:
    """Exact IoU matrix of rotated boxes `[cx, cy, w, h, angle]` (never the equal-angle shortcut)."""
    ca, cb = rotated_corners(a), rotated_corners(b)
    ga, gb = shapely.polygons(ca), shapely.polygons(cb)
    ba = np.concatenate([ca.min(axis=1), ca.max(axis=1)], axis=1)
    bb = np.concatenate([cb.min(axis=1), cb.max(axis=1)], axis=1)
    return _iou_of_geometries(ga, gb, ba, bb, iscrowd)


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Keep only the polygonal parts of a geometry (make_valid may add lines and points)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def region(
    points: np.ndarray | Sequence[Sequence[float]],
    holes: Sequence[Sequence[Sequence[float]]] = (),
    image: tuple[float, float] | None = None,
) -> BaseGeometry:
    """A valid shapely region from a ring of (x, y) vertices (+ holes), clipped to the image.

    Invalid rings (a bowtie, a self-touching ring) are repaired with `make_valid`, which follows
    the even-odd rule, keeping polygonal parts. Fewer than 3 distinct vertices is invalid input.
    `image` is (width, height); a region outside the image becomes empty (area 0).
    """
    ring, hole_rings = checked_rings(points, holes)
    geom = shapely.Polygon(ring, hole_rings)
    if not geom.is_valid:
        geom = _polygonal(shapely.make_valid(geom))
    if image is not None and _outside(geom.bounds, image):
        # only a region reaching outside the image needs the clip (an overlay per region otherwise)
        geom = _polygonal(shapely.intersection(geom, shapely.box(0, 0, image[0], image[1])))
    return geom


def regions(
    polygons: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[Sequence[float]]]]],
    image: tuple[float, float] | None = None,
) -> list[BaseGeometry | None]:
    """`region` of many (points, holes) polygons at once, or None for each one this bulk path
    leaves to `region` (holes, or a ring `region` would reject: it raises the error then).

    Why: a polygon built alone pays a dozen numpy and shapely calls of a few microseconds each;
    here the checks, the rings, the validity test, the repair and the clip are one vectorised
    call each over all of them. The geometry is the same as `region`'s (a test compares them)."""
    out: list[BaseGeometry | None] = [None] * len(polygons)
    todo = [n for n, (points, holes) in enumerate(polygons) if not holes and len(points) >= 3]
    if not todo:
        return out
    lengths = np.array([len(polygons[n][0]) for n in todo])
    coords = np.array([xy for n in todo for xy in polygons[n][0]], dtype=np.float64).reshape(-1, 2)
    ring_of = np.repeat(np.arange(len(todo)), lengths)
    finite = np.isfinite(coords).all(axis=1)
    order = np.lexsort((coords[:, 1], coords[:, 0], ring_of))
    c, r = coords[order], ring_of[order]
    new = np.ones(len(r), dtype=bool)
    new[1:] = (r[1:] != r[:-1]) | (c[1:, 0] != c[:-1, 0]) | (c[1:, 1] != c[:-1, 1])
    distinct = np.bincount(r[new], minlength=len(todo))
    bad = np.bincount(ring_of[~finite], minlength=len(todo)) > 0
    keep = np.flatnonzero((distinct >= 3) & ~bad)
    if len(keep) == 0:
        return out
    mask = np.isin(ring_of, keep)
    _, indices = np.unique(ring_of[mask], return_inverse=True)
    geoms = shapely.polygons(shapely.linearrings(coords[mask], indices=indices))
    invalid = np.flatnonzero(~shapely.is_valid(geoms))
    if len(invalid):
        geoms[invalid] = [_polygonal(g) for g in shapely.make_valid(geoms[invalid])]
    if image is not None:
        b = shapely.bounds(geoms)
        past = np.flatnonzero((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > image[0]) | (b[:, 3] > image[1]))
        if len(past):
            frame = shapely.box(0, 0, image[0], image[1])
            geoms[past] = [_polygonal(g) for g in shapely.intersection(geoms[past], frame)]
    for k, g in zip(keep.tolist(), geoms.tolist(), strict=True):
        out[todo[k]] = g
    return out


def checked_rings(
    points: np.ndarray | Sequence[Sequence[float]], holes: Sequence[Sequence[Sequence[float]]] = ()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rings of a polygon as (K, 2) arrays, or InvalidGeometry: everything `region` can
    reject, without building the region (GEOS repairs any other ring), so a check on arrival
    does not pay for a region the score builds again."""
    ring = _finite(np.asarray(points, dtype=np.float64).reshape(-1, 2), "polygon")
    if (distinct := _distinct(ring)) < 3:
        raise InvalidGeometry(f"polygon has {distinct} distinct vertices, needs 3")
    hole_rings = []
    for h in holes:
        hr = _finite(np.asarray(h, dtype=np.float64).reshape(-1, 2), "polygon hole")
        if _distinct(hr) < 3:
            raise InvalidGeometry("polygon hole has fewer than 3 distinct vertices")
        hole_rings.append(hr)
    return ring, hole_rings


def _outside(bounds: tuple[float, ...], image: tuple[float, float]) -> bool:
    """Whether bounds (x0, y0, x1, y1) reach past the image (NaN bounds, an empty region: no)."""
    x0, y0, x1, y1 = bounds
    return bool(x0 < 0 or y0 < 0 or x1 > image[0] or y1 > image[1])


def _distinct(ring: np.ndarray) -> int:
    """Distinct vertices of a small ring (a set of tuples: np.unique(axis=0) costs more here)."""
    return len(set(map(tuple, ring.tolist())))


def polygon_iou(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> float:
    """Exact area IoU of two rings of (x, y) vertices (repaired if invalid; see `region`)."""
    return float(region_iou([region(a)], [region(b)])[0, 0])


def region_iou(a: Sequence[BaseGeometry], b: Sequence[BaseGeometry], iscrowd: np.ndarray | None = None) -> np.ndarray:
    """Exact IoU matrix of shapely regions; crowd `b`: I / area(a)."""
    ga = np.empty(len(a), dtype=object)
    ga[:] = list(a)
    gb = np.empty(len(b), dtype=object)
    gb[:] = list(b)
    return _iou_of_geometries(ga, gb, _bounds(ga), _bounds(gb), iscrowd)


def region_iou_blocks(
    blocks: Sequence[tuple[Sequence[BaseGeometry], Sequence[BaseGeometry], np.ndarray | None]],
) -> list[np.ndarray]:
    """`region_iou(a, b, crowd)` of many blocks (one per item) in one pass: the bounds test,
    the intersections and the areas are one vectorised call each over every pair of every
    block, where one call per block paid a dozen numpy and shapely calls for a few pairs."""
    n = np.array([len(a) for a, _, _ in blocks], dtype=np.int64)
    m = np.array([len(b) for _, b, _ in blocks], dtype=np.int64)
    ga = np.empty(int(n.sum()), dtype=object)
    ga[:] = [g for a, _, _ in blocks for g in a]
    gb = np.empty(int(m.sum()), dtype=object)
    gb[:] = [g for _, b, _ in blocks for g in b]
    crowd = np.zeros(len(gb), dtype=bool)
    at = 0
    for (_, _b, c), size in zip(blocks, m.tolist(), strict=True):
        if c is not None:
            crowd[at : at + size] = np.asarray(c, dtype=bool)
        at += size
    ba, bb = _bounds(ga), _bounds(gb)
    counts = n * m
    start = np.concatenate([[0], np.cumsum(counts)])
    local = np.arange(start[-1]) - np.repeat(start[:-1], counts)
    m_rep = np.repeat(m, counts)
    ia = local // np.maximum(m_rep, 1) + np.repeat(np.cumsum(n) - n, counts)
    jb = local % np.maximum(m_rep, 1) + np.repeat(np.cumsum(m) - m, counts)
    sel = np.flatnonzero(
        (ba[ia, 0] < bb[jb, 2]) & (bb[jb, 0] < ba[ia, 2]) & (ba[ia, 1] < bb[jb, 3]) & (bb[jb, 1] < ba[ia, 3])
    )
    vals = np.zeros(len(local))
    if len(sel):

        def grids(empty: np.ndarray) -> np.ndarray:  # each block's own magnitude, as one block alone
            blocks_of = np.searchsorted(start, sel[empty], side="right") - 1
            scale = {t: _scale(ba, bb, n, m, t) * 1e-12 for t in np.unique(blocks_of).tolist()}
            return np.array([scale[t] for t in blocks_of.tolist()])

        vals[sel] = _pair_ious(ga, gb, ia[sel], jb[sel], crowd, grids)
    cuts = zip(start[:-1].tolist(), start[1:].tolist(), n.tolist(), m.tolist(), strict=True)
    return [vals[lo:hi].reshape(a, b) for lo, hi, a, b in cuts]


def _scale(ba: np.ndarray, bb: np.ndarray, n: np.ndarray, m: np.ndarray, t: int) -> float:
    """The coordinates' magnitude of block t, as `_iou_of_geometries` takes it of its inputs."""
    a0, b0 = int(n[:t].sum()), int(m[:t].sum())
    return max(1.0, float(np.abs(ba[a0 : a0 + n[t]]).max()), float(np.abs(bb[b0 : b0 + m[t]]).max()))


def _bounds(geoms: np.ndarray) -> np.ndarray:
    if len(geoms) == 0:
        return np.zeros((0, 4))
    bounds = shapely.bounds(geoms)
    return np.nan_to_num(bounds, nan=0.0)  # empty geometries have NaN bounds and area 0
