"""COCO run-length encoded masks: the compressed-string codec, areas, IoU, polygon rasterisation.

A COCO RLE lists alternating runs of 0s and 1s over the pixels in column-major order, starting
with 0s. IoU is computed on the runs themselves (no dense decode), so a 4K mask costs what its
number of runs costs. Written to agree bit for bit with pycocotools' maskApi (tested against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from goldstream.scoring.errors import InvalidGeometry
from shapely.geometry.base import BaseGeometry


@dataclass(frozen=True)
class Rle:
    """Run lengths (uint64) of a mask of `size` (height, width)."""

    size: tuple[int, int]
    counts: np.ndarray

    @property
    def area(self) -> int:
        return int(self.counts[1::2].sum())

    @property
    def ends(self) -> np.ndarray:
        return np.cumsum(self.counts)


def decode_counts(s: str) -> np.ndarray:
    """Run lengths from COCO's compressed string (maskApi.c `rleFrString`)."""
    out: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise InvalidGeometry("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    counts = np.asarray(out, dtype=np.int64)
    if np.any(counts < 0):
        raise InvalidGeometry("compressed RLE decodes to a negative run length")
    return counts


def encode_counts(counts: Sequence[int] | np.ndarray) -> str:
    """COCO's compressed string of run lengths (maskApi.c `rleToString`)."""
    cnts = [int(c) for c in counts]
    chars = []
    for i, c in enumerate(cnts):
        x = c - cnts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            chars.append(chr(ch + 48))
    return "".join(chars)


def rle(size: Sequence[int], counts: str | Sequence[int]) -> Rle:
    """An Rle from a schemas Mask's fields; checks that the runs cover the image exactly."""
    h, w = int(size[0]), int(size[1])
    runs = decode_counts(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    if runs.sum() != h * w:
        raise InvalidGeometry(f"RLE runs cover {int(runs.sum())} pixels, the mask has {h * w}")
    return Rle((h, w), runs)


def from_dense(mask: np.ndarray) -> Rle:
    """Encode a (height, width) boolean mask."""
    m = np.asarray(mask, dtype=bool)
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return Rle(m.shape, runs.astype(np.int64))


def to_dense(r: Rle) -> np.ndarray:
    h, w = r.size
    values = np.arange(len(r.counts)) % 2
    return np.repeat(values.astype(bool), r.counts).reshape((h, w), order="F")


def rle_intersection(a: Rle, b: Rle) -> int:
    """Pixels set in both masks, from the runs: split the pixel line at every run end of either."""
    ea, eb = a.ends, b.ends
    cuts = np.union1d(ea, eb)
    starts = np.concatenate([[0], cuts[:-1]])
    lengths = cuts - starts
    in_a = np.searchsorted(ea, starts, side="right") % 2 == 1
    in_b = np.searchsorted(eb, starts, side="right") % 2 == 1
    return int(lengths[in_a & in_b].sum())


def rle_iou(a: Sequence[Rle], b: Sequence[Rle], iscrowd: Sequence[bool] | None = None) -> np.ndarray:
    """IoU matrix of masks (pycocotools `mask.iou` for RLEs); crowd `b`: I / area(a)."""
    out = np.zeros((len(a), len(b)))
    crowd = list(iscrowd) if iscrowd is not None else [False] * len(b)
    for i, ra in enumerate(a):
        for j, rb in enumerate(b):
            if ra.size != rb.size:
                raise InvalidGeometry(f"masks of different sizes {ra.size} and {rb.size}")
            inter = rle_intersection(ra, rb)
            union = ra.area if crowd[j] else ra.area + rb.area - inter
            out[i, j] = inter / union if inter > 0 and union > 0 else 0.0
    return out


RASTER_CHUNK = 1 << 20
"""Pixel centres tested per step of `rasterize`: bounds its memory whatever the mask's size."""


def rasterize(geom: BaseGeometry, size: tuple[int, int]) -> Rle:
    """Mask of the pixels whose centre lies inside `geom` (to compare polygons with masks).

    Only the pixels under the region's bounding box are tested, a block of columns at a time, and
    the runs are built from where the columns enter and leave the region: time grows with the
    region, memory with neither it nor the mask (a dense mask of the mask's size cost gigabytes)."""
    h, w = int(size[0]), int(size[1])
    c0 = c1 = r0 = r1 = 0
    if not geom.is_empty:
        x0, y0, x1, y1 = geom.bounds
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), w)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h)
    if c1 <= c0 or r1 <= r0:
        return Rle((h, w), np.asarray([h * w], dtype=np.int64))
    rows = r1 - r0
    step = max(1, RASTER_CHUNK // rows)
    centres = np.arange(r0, r1, dtype=np.float64) + 0.5
    bounds: list[np.ndarray] = []  # flat (column-major) positions where runs of 1s start and end
    for cs in range(c0, c1, step):
        ce = min(cs + step, c1)
        xs = np.repeat(np.arange(cs, ce, dtype=np.float64) + 0.5, rows)
        inside = shapely.contains_xy(geom, xs, np.tile(centres, ce - cs)).reshape(ce - cs, rows)
        edges = np.diff(np.pad(inside.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # +1 enter, -1 leave
        col, at = np.nonzero(edges)
        bounds.append((cs + col).astype(np.int64) * h + r0 + at)
    flat = np.concatenate(bounds)
    # a run that ends where the next begins (a column filled to its last row, the next from its
    # first) is one run: drop both boundaries, as a dense encoding would have
    if len(flat):
        ends, starts = flat[1:-1:2], flat[2::2]
        joined = np.flatnonzero(ends == starts)
        if len(joined):
            flat = np.delete(flat, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    runs = np.diff(np.concatenate([[0], flat, [h * w]]))
    if len(runs) > 1 and runs[-1] == 0:
        runs = runs[:-1]  # the mask ends inside the region: no trailing run of 0s
    return Rle((h, w), runs.astype(np.int64))
