"""Mergeable counters of item scores (metrics spec §5), in the update / merge / compute style.

Batch, worker, label and project figures are sums of per-item counts, so partitions, workers
and time buckets each keep their own counters and merging adds them. Similarities are summed as
integers in units of 1e-9 so that merging is exact and independent of order (float addition is
not associative); the same integers can live in Redis hashes (HINCRBY).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from goldstream.schemas.messages import Figures, ItemScore, Metrics, Outcome
from goldstream.scoring.item import keypoint_figures, metrics_of, ratio

SCALE = 10**9


def fixed(x: float) -> int:
    """A value in fixed point (1e-9 units): exact, associative sums."""
    return round(x * SCALE)


@dataclass
class LabelTotals:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    sim: int = 0  # fixed point, over matches

    def add(self, other: LabelTotals) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.sim += other.sim


@dataclass
class Counters:
    """Sums over scored items. `update` adds one ItemScore; `merge` adds another Counters."""

    items: int = 0
    scored: int = 0
    passed: int = 0
    score: int = 0  # fixed point
    matches: int = 0
    mismatches: int = 0
    missed: int = 0
    extra: int = 0
    sim: int = 0  # fixed point, over matches
    attributes_compared: int = 0
    attributes_correct: int = 0
    classifications_compared: int = 0
    classifications_correct: int = 0
    relationships_tp: int = 0
    relationships_fp: int = 0
    relationships_fn: int = 0
    kp_pairs: int = 0
    kp_oks: int = 0  # fixed point
    kp_sq_err: int = 0  # fixed point (pixels²)
    kp_both: int = 0
    kp_within: int = 0
    kp_gold: int = 0
    kp_missing: int = 0
    kp_extra: int = 0
    labels: dict[str, LabelTotals] = field(default_factory=dict)

    def update(self, s: ItemScore) -> Counters:
        """Add one item's score (in place); returns self for chaining."""
        self.items += 1
        if s.score is not None:
            self.scored += 1
            self.score += fixed(s.score)
            self.passed += bool(s.passed)
        per_label: dict[str, LabelTotals] = {}
        for m in s.matches:
            if m.outcome is Outcome.MATCH:
                self.matches += 1
                sim = fixed(m.similarity or 0.0)
                self.sim += sim
                t = per_label.setdefault(m.reference_label or "", LabelTotals())
                t.tp += 1
                t.sim += sim
            elif m.outcome is Outcome.MISMATCH:
                self.mismatches += 1
                per_label.setdefault(m.annotation_label or "", LabelTotals()).fp += 1
                per_label.setdefault(m.reference_label or "", LabelTotals()).fn += 1
            elif m.outcome is Outcome.MISSED:
                self.missed += 1
                per_label.setdefault(m.reference_label or "", LabelTotals()).fn += 1
            else:
                self.extra += 1
                per_label.setdefault(m.annotation_label or "", LabelTotals()).fp += 1
        for name, t in per_label.items():
            self.labels.setdefault(name, LabelTotals()).add(t)
        self.attributes_compared += s.attributes_compared
        self.attributes_correct += s.attributes_correct
        self.classifications_compared += s.classifications_compared
        self.classifications_correct += s.classifications_correct
        self.relationships_tp += s.relationships_tp
        self.relationships_fp += s.relationships_fp
        self.relationships_fn += s.relationships_fn
        if s.keypoints is not None:
            k = s.keypoints
            self.kp_pairs += k.pairs
            self.kp_oks += fixed(k.oks_sum)
            self.kp_sq_err += fixed(k.sq_err_sum)
            self.kp_both += k.both
            self.kp_within += k.within
            self.kp_gold += k.gold_labeled
            self.kp_missing += k.missing
            self.kp_extra += k.extra
        return self

    def merge(self, other: Counters) -> Counters:
        """A new Counters holding the sum of both (exact, commutative, associative)."""
        out = Counters()
        for f in fields(Counters):
            if f.name != "labels":
                setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        for src in (self.labels, other.labels):
            for name, t in src.items():
                out.labels.setdefault(name, LabelTotals()).add(t)
        return out

    @classmethod
    def of(cls, scores: Iterable[ItemScore]) -> Counters:
        c = cls()
        for s in scores:
            c.update(s)
        return c

    def compute(self, empty_item_correct: bool = True) -> Figures:
        """Figures of the merged counts; ratios with a zero denominator are None."""
        tp, fp, fn = self.matches, self.mismatches + self.extra, self.mismatches + self.missed
        objects = metrics_of(tp, fp, fn, self.sim / SCALE, empty_item_correct and self.scored > 0, self.mismatches)
        pq_den = self.matches + self.mismatches + 0.5 * (self.missed + self.extra)
        rel_den = 2 * self.relationships_tp + self.relationships_fp + self.relationships_fn
        kp = None
        if self.kp_pairs or self.kp_gold:
            kp = keypoint_figures(
                self.kp_pairs,
                self.kp_oks / SCALE,
                self.kp_sq_err / SCALE,
                self.kp_both,
                self.kp_within,
                self.kp_gold,
                self.kp_missing,
                self.kp_extra,
            )
        return Figures(
            items=self.items,
            scored=self.scored,
            passed=self.passed,
            pass_rate=ratio(self.passed, self.scored),
            mean_score=ratio(self.score / SCALE, self.scored),
            precision=objects.precision,
            recall=objects.recall,
            f1=objects.f1,
            accuracy=objects.accuracy,
            mean_similarity=objects.mean_similarity,
            panoptic_quality=ratio(self.sim / SCALE, pq_den),
            attribute_accuracy=ratio(self.attributes_correct, self.attributes_compared),
            classification_accuracy=ratio(self.classifications_correct, self.classifications_compared),
            relationship_f1=ratio(2 * self.relationships_tp, rel_den),
            keypoints=kp,
            labels={name: _label_metrics(t) for name, t in sorted(self.labels.items())},
        )

    def to_fields(self) -> dict[str, int]:
        """Flat integer fields (a Redis hash): label counts as 'label:<name>:tp' and so on."""
        out = {f.name: getattr(self, f.name) for f in fields(Counters) if f.name != "labels"}
        for name, t in self.labels.items():
            for k in ("tp", "fp", "fn", "sim"):
                out[f"label:{name}:{k}"] = getattr(t, k)
        return out

    @classmethod
    def from_fields(cls, data: Mapping[str, int | str | bytes]) -> Counters:
        c = cls()
        for key, raw in data.items():
            k = key.decode() if isinstance(key, bytes) else key
            value = int(raw)
            if k.startswith("label:"):
                name, _, part = k[len("label:") :].rpartition(":")
                setattr(c.labels.setdefault(name, LabelTotals()), part, value)
            elif k in _SCALAR_FIELDS:
                setattr(c, k, value)
        return c


_SCALAR_FIELDS = {f.name for f in fields(Counters) if f.name != "labels"}


def _label_metrics(t: LabelTotals) -> Metrics:
    return Metrics(
        precision=ratio(t.tp, t.tp + t.fp),
        recall=ratio(t.tp, t.tp + t.fn),
        f1=ratio(2 * t.tp, 2 * t.tp + t.fp + t.fn),
        mean_similarity=ratio(t.sim / SCALE, t.tp),
    )
