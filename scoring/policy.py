"""The decision rules, as pure functions: proficiency from counters, qualification, escalation
reasons and priority, audit sampling, alert hysteresis.

Everything here is a function of integer counters and the project's criteria, so that the
stream worker and `goldstream replay` decide alike, and a proficiency rebuilt from the scores
topic reads back the same. Randomness (audit sampling) is a hash of the event id and a seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

from schemas.criteria import ProjectCriteria
from schemas.messages import EscalationReason, ItemScore, QualificationState

SCALE = 10**9  # fixed point of sums kept in Redis (see scoring.counters)


def wilson_lower_bound(passes: float, total: float, confidence: float = 0.95) -> float | None:
    """Lower bound of the pass rate: the conservative proficiency. None without evidence."""
    if total <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = min(max(passes / total, 0.0), 1.0)
    denom = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return min(max((centre - margin) / denom, 0.0), 1.0)


@dataclass(frozen=True)
class Proficiency:
    """A worker's standing, derived from its counters (never stored itself)."""

    items: int
    gold_items: int
    passes: float  # confidence-weighted, plus the prior
    fails: float
    mean_score: float | None
    lower_bound: float | None
    upper_bound: float | None
    state: QualificationState

    def below(self, target: float) -> bool:
        """Confidently below target: on probation or suspended, or even the upper bound is below it."""
        flagged = self.state in (QualificationState.PROBATION, QualificationState.SUSPENDED)
        return flagged or (self.upper_bound is not None and self.upper_bound < target)


def proficiency(totals: Mapping[str, int], criteria: ProjectCriteria) -> Proficiency:
    """Proficiency from a worker's totals hash (`Counters.to_fields` plus `evidence_increments`)."""
    pol = criteria.proficiency
    passes = totals.get("pass_w", 0) / SCALE + pol.prior_passes
    fails = totals.get("fail_w", 0) / SCALE + pol.prior_fails
    scored = totals.get("scored", 0)
    evidence = totals.get("pass_w", 0) + totals.get("fail_w", 0)
    lb = wilson_lower_bound(passes, passes + fails, pol.confidence) if evidence > 0 else None
    ub = wilson_upper_bound(passes, passes + fails, pol.confidence) if evidence > 0 else None
    mean = totals.get("score", 0) / SCALE / scored if scored else None
    gold = totals.get("gold_items", 0)
    return Proficiency(
        items=totals.get("items", 0),
        gold_items=gold,
        passes=passes,
        fails=fails,
        mean_score=mean,
        lower_bound=lb,
        upper_bound=ub,
        state=qualification(gold, passes, fails, criteria),
    )


def wilson_upper_bound(passes: float, total: float, confidence: float = 0.95) -> float | None:
    """Upper bound of the pass rate (the other end of the interval)."""
    lb = wilson_lower_bound(total - passes, total, confidence)
    return None if lb is None else 1.0 - lb


def qualification(gold_items: int, passes: float, fails: float, criteria: ProjectCriteria) -> QualificationState:
    """A function of the counters alone, so every driver and every rebuild agrees on it.

    A worker is decided once the evidence is clear, as in a sequential test: qualified when the
    lower bound of its pass rate reaches `qualify_at`; suspended when even the upper bound is
    below `suspend_below`; on probation when its estimated rate is below `probation_below`;
    qualifying (not yet proven either way) otherwise, and always before `min_gold_items`.
    """
    pol = criteria.proficiency
    q = pol.qualification
    total = passes + fails
    if gold_items < q.min_gold_items or total <= 0:
        return QualificationState.QUALIFYING
    lb = wilson_lower_bound(passes, total, pol.confidence) or 0.0
    ub = wilson_upper_bound(passes, total, pol.confidence) or 0.0
    if lb >= q.qualify_at:
        return QualificationState.QUALIFIED
    if ub < q.suspend_below:
        return QualificationState.SUSPENDED
    if passes / total < q.probation_below:
        return QualificationState.PROBATION
    return QualificationState.QUALIFYING


def evidence_increments(score: ItemScore, kind: str, confidence: float) -> dict[str, int]:
    """Counter changes, beyond `scoring.Counters`' own, that one scored annotation makes to its
    worker: items by kind, and the confidence-weighted passes and fails of the Beta posterior."""
    inc = {f"{kind}_items": 1}
    if score.score is not None:
        inc["pass_w" if score.passed else "fail_w"] = round(confidence * SCALE)
    return inc


def audit_draw(event_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from the event id: the same on every replay and worker."""
    digest = hashlib.sha256(f"{seed}:{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def audit_rate(lower_bound: float | None, criteria: ProjectCriteria) -> float:
    """Falls linearly from r_max (no evidence yet) to r_min as the worker's lower bound rises."""
    e = criteria.escalation
    lb = 0.0 if lower_bound is None else lower_bound
    return e.audit_rate_max - (e.audit_rate_max - e.audit_rate_min) * lb


REASON_BASE = {
    EscalationReason.INVALID_GEOMETRY: 80,
    EscalationReason.GOLD_BELOW_THRESHOLD: 60,
    EscalationReason.CONSENSUS_BELOW_THRESHOLD: 50,
    EscalationReason.LOW_PROFICIENCY: 40,
    EscalationReason.AUDIT_SAMPLE: 10,
}


def priority(reasons: list[EscalationReason], score: float | None, threshold: float | None) -> int:
    """0-100: the gravest reason's base, plus up to 20 for how far below the threshold it scored."""
    base = max(REASON_BASE[r] for r in reasons)
    gap = 0.0
    if score is not None and threshold:
        gap = min(max((threshold - score) / threshold, 0.0), 1.0)
    extra = len(reasons) - 1  # several reasons at once: a little more urgent
    return min(100, base + round(20 * gap) + 5 * extra)


def gold_threshold(criteria: ProjectCriteria) -> float:
    return (
        criteria.escalation.score_threshold
        if criteria.escalation.score_threshold is not None
        else (criteria.pass_threshold)
    )


def gold_escalates(score: ItemScore, criteria: ProjectCriteria) -> bool:
    """Below the project's threshold, or a label of the item below that label's own minimum."""
    if score.score is not None and score.score < gold_threshold(criteria):
        return True
    for label, c in score.labels.items():
        spec = criteria.label(label)
        if spec is not None and spec.min_score is not None:
            total = c.tp + c.fp + c.fn
            if total and c.tp / total < spec.min_score:
                return True
    return False


@dataclass(frozen=True)
class AlertChange:
    state: str  # "firing" or "resolved"


def alert_transition(current: str | None, value: float | None, target: float | None, margin: float) -> str | None:
    """Hysteresis: fire when the value drops below target; resolve only above target + margin;
    say nothing while the state holds (no repeats while firing)."""
    if value is None or target is None:
        return None
    if current != "firing" and value < target:
        return "firing"
    if current == "firing" and value >= target + margin:
        return "resolved"
    return None


def qualification_flag(current: str | None, state: QualificationState) -> str | None:
    """The next qualification alert flag, or None when there is no news. Fires on probation or
    suspension (again on probation -> suspended); resolves only on qualifying, not on falling
    back to 'qualifying' (which flapped around the probation line); a suspension stands until
    the worker qualifies again."""
    current = current or "resolved"
    if state in (QualificationState.PROBATION, QualificationState.SUSPENDED):
        new = state.value
    elif state == QualificationState.QUALIFIED:
        new = "resolved"
    else:
        return None
    if new == current or (current, new) == ("suspended", "probation"):
        return None
    return new


def window_mean(buckets: Mapping[int, tuple[int, int]], as_of: int, window_s: int) -> tuple[float | None, int]:
    """Mean item score and count over buckets (start -> (count, score sum in fixed point))
    whose start lies within `window_s` before `as_of` (event time, seconds)."""
    n = s = 0
    for start, (count, total) in buckets.items():
        if as_of - window_s < start <= as_of:
            n += count
            s += total
    return (s / SCALE / n if n else None), n


def ewma(buckets: Mapping[int, tuple[int, int]], as_of: int, half_life_s: float) -> float | None:
    """Exponentially weighted mean score by event time, computed from the buckets at read time,
    so it does not depend on the order in which scores arrived."""
    lam = math.log(2) / half_life_s
    num = den = 0.0
    for start, (count, total) in buckets.items():
        w = math.exp(-lam * max(as_of - start, 0))
        num += w * total / SCALE
        den += w * count
    return num / den if den > 0 else None
