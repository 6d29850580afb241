"""goldstream's scoring library: pure functions and counters, no I/O (docs/scoring.md).

Stable primitives other tools call:

- `box_iou(a, b, iscrowd=None)`: (N, M) IoU of `[x, y, w, h]` boxes, as pycocotools `mask.iou`.
- `rotated_box_iou(a, b)`: exact IoU of `[cx, cy, w, h, angle]` boxes.
- `polygon_iou(a, b)`: exact area IoU of two rings (repaired with make_valid when invalid).
- `rle_iou(a, b, iscrowd=None)`: IoU of COCO RLE masks.
- `oks(dt, gt, sigmas, area)`: object keypoint similarity, as pycocotools `COCOeval.computeOks`.
- `point_similarity`, `polyline_similarity`: tolerance-based similarity of points and lines.
- `assign(sim, ann_labels, ref_labels, thresholds)`: the two-pass Hungarian matching.
- `score_item(annotation, reference, criteria)`: the full comparison, an `schemas.ItemScore`;
  `score_items(pairs, criteria)` the same for a batch, vectorised across items.
- `agreement`, `item_agreement`, `consensus_scores`: comparisons between annotators (no gold).
- `Counters`: mergeable batch counters (`update` / `merge` / `compute`).

Bad input raises a `ScoringError` subclass with a `reason`; a score is never NaN.
"""

from goldstream.scoring.counters import Counters
from goldstream.scoring.errors import InvalidGeometry, KeypointMismatch, ScoringError, UnknownLabel
from goldstream.scoring.geometry import box_iou, polygon_iou, region, region_iou, rotated_box_iou
from goldstream.scoring.item import (
    agreement,
    check_geometry,
    consensus_scores,
    content_of,
    item_agreement,
    metrics_of,
    pairwise_agreement,
    score_item,
    score_items,
)
from goldstream.scoring.keypoints import oks, oks_matrix
from goldstream.scoring.matching import Assignment, assign
from goldstream.scoring.points import point_similarity, polyline_similarity
from goldstream.scoring.rle import Rle, rle_iou

__all__ = [
    "Assignment",
    "Counters",
    "InvalidGeometry",
    "KeypointMismatch",
    "Rle",
    "ScoringError",
    "UnknownLabel",
    "agreement",
    "assign",
    "box_iou",
    "check_geometry",
    "consensus_scores",
    "content_of",
    "item_agreement",
    "metrics_of",
    "oks",
    "oks_matrix",
    "pairwise_agreement",
    "point_similarity",
    "polygon_iou",
    "polyline_similarity",
    "region",
    "region_iou",
    "rle_iou",
    "rotated_box_iou",
    "score_item",
    "score_items",
]
