"""The decision rules, as pure functions: a worker's standing and qualification, the risk-based
escalation and its reasons and priority, audit sampling, alert hysteresis, drift alerts.

Everything here is a function of counters (and the reliability model fitted from them,
`scoring.reliability`) and the project's criteria, so that the stream worker and `goldstream
replay` decide alike, and a standing rebuilt from the scores topic reads back the same.
Randomness (audit sampling) is a hash of the event id and a seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from goldstream.schemas.criteria import ProjectCriteria
from goldstream.schemas.messages import EscalationReason, ItemScore, QualificationState
from goldstream.scoring.reliability import Drift, Model, Risks, Worker, budget_threshold, drift, evidence_value

SCALE = 10**9  # fixed point of sums kept in Redis (see scoring.counters)


@dataclass(frozen=True)
class Proficiency:
    """A worker's standing, derived from its counters and its project's model (never stored)."""

    items: int
    gold_items: int
    known: int  # annotations scored against a known answer (gold, review)
    rounds: int  # consensus rounds
    mean_score: float | None  # of every score, consensus agreement included (a raw figure)
    estimate: float | None  # the level from all the evidence (scoring.reliability)
    sd: float | None
    lower_bound: float | None
    upper_bound: float | None
    state: QualificationState

    def below(self, target: float) -> bool:
        """Confidently below target: on probation or suspended, or even the upper bound is below it."""
        flagged = self.state in (QualificationState.PROBATION, QualificationState.SUSPENDED)
        return flagged or (self.upper_bound is not None and self.upper_bound < target)


def proficiency(totals: Mapping[str, int], criteria: ProjectCriteria, level: Worker | None = None) -> Proficiency:
    """A worker's standing from its totals hash and its level in the project's reliability model
    (None: no evidence yet)."""
    pol = criteria.proficiency
    scored = totals.get("scored", 0)
    mean = totals.get("score", 0) / SCALE / scored if scored else None
    known = totals.get("known_n", 0)
    rounds = totals.get("round_n", 0)
    if level is None or known + rounds == 0:
        est = sd = lb = ub = None
        state = QualificationState.QUALIFYING
    else:
        est, sd = level.estimate, level.sd
        lb, ub = level.interval(pol.confidence)
        state = qualification(level, criteria)
    return Proficiency(
        items=totals.get("items", 0),
        gold_items=totals.get("gold_items", 0),
        known=known,
        rounds=rounds,
        mean_score=mean,
        estimate=est,
        sd=sd,
        lower_bound=lb,
        upper_bound=ub,
        state=state,
    )


def qualification(level: Worker, criteria: ProjectCriteria) -> QualificationState:
    """A function of the level's interval, so every driver and every rebuild agrees on it.

    A worker is decided once the evidence is clear, as in a sequential test: suspended when even
    the upper bound of its level is below `suspend_below`, on probation when the upper bound is
    below `probation_below` (from any evidence: a spammer need not wait for gold items);
    qualified when the lower bound reaches `qualify_at` and it has `min_gold_items` known
    answers (trust needs some ground truth); qualifying (not yet proven either way) otherwise."""
    q = criteria.proficiency.qualification
    if level.known + level.rounds == 0:
        return QualificationState.QUALIFYING
    lb, ub = level.interval(criteria.proficiency.confidence)
    if ub < q.suspend_below:
        return QualificationState.SUSPENDED
    if ub < q.probation_below:
        return QualificationState.PROBATION
    if lb >= q.qualify_at and level.known >= q.min_gold_items:
        return QualificationState.QUALIFIED
    return QualificationState.QUALIFYING


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
    EscalationReason.TOO_FAST: 45,
    EscalationReason.LOW_PROFICIENCY: 40,
    EscalationReason.HIGH_RISK: 35,
    EscalationReason.AUDIT_SAMPLE: 10,
}


def priority(
    reasons: list[EscalationReason], score: float | None, threshold: float | None, risk: float | None = None
) -> int:
    """0-100: the gravest reason's base, plus up to 20 for how far below the threshold it scored;
    an escalation chosen for its risk ranks by the risk itself (20 at 0 .. 90 at 1)."""
    base = max(REASON_BASE[r] for r in reasons)
    extra = len(reasons) - 1  # several reasons at once: a little more urgent
    if risk is not None:
        return min(100, max(base if EscalationReason.AUDIT_SAMPLE not in reasons else 0, 20 + round(70 * risk)) + extra)
    gap = 0.0
    if score is not None and threshold:
        gap = min(max((threshold - score) / threshold, 0.0), 1.0)
    return min(100, base + round(20 * gap) + 5 * extra)


BUDGET_HORIZON = 600  # annotations over which the review budget makes up what it under- or overspent


def primary_reason(reasons: list[EscalationReason]) -> EscalationReason:
    """The reason an escalation is filed under (its id derives from it): the gravest one."""
    return max(reasons, key=lambda r: (REASON_BASE[r], r.value))


def peer_confidence(agreement: np.ndarray, i: int) -> float:
    """How far to trust member i's peers as its reference: their mean agreement among themselves
    (NaN pairs left out; 0.5 when there is no pair of peers, as with two annotators)."""
    others = [j for j in range(agreement.shape[0]) if j != i]
    pairs = [agreement[p, q] for p in others for q in others if p < q and not np.isnan(agreement[p, q])]
    return float(sum(pairs) / len(pairs)) if pairs else 0.5


def alert_severity(state: str, value: float | None, target: float | None) -> str:
    """info when resolved; critical below 80 % of the target; warning otherwise."""
    if state == "resolved":
        return "info"
    return "critical" if value is not None and target and value < target * 0.8 else "warning"


def review_threshold(risks: Risks, criteria: ProjectCriteria) -> float:
    """The risk from which a non-gold annotation goes to review: the one that spends
    `review_budget` on the riskiest work, or 0.5 without a budget or before there are enough risks
    to place it. The quantile of past risks alone misses the budget when risks run higher or lower
    than they used to (a drifting team, a model still learning): what was over- or underspent so
    far is made up over the next `BUDGET_HORIZON` annotations, so the share spent converges on the
    budget."""
    budget = criteria.escalation.review_budget
    if budget is None:
        return 0.5
    aim = min(max(budget + (budget * risks.judged - risks.escalated) / BUDGET_HORIZON, 0.0), 1.0)
    return budget_threshold(risks.hist, aim) if aim > 0 else 1.0 + 1e-9


def worker_drift(evidence: Sequence[tuple[str, float]], model: Model, criteria: ProjectCriteria) -> Drift | None:
    """The drift test on a worker's evidence sequence (kind, value) in event-time order."""
    values = [evidence_value(kind, x, model) for kind, x in evidence]
    return drift([v for v, _ in values], [var for _, var in values], min_after=criteria.alerts.drift_min_items)


def review_reasons(
    risk: float,
    threshold: float,
    estimate: float | None,
    worker: Proficiency,
    too_fast: bool,
    criteria: ProjectCriteria,
) -> list[EscalationReason]:
    """Why a non-gold annotation goes to review, or [] when it stays below the review threshold.
    The decision is the risk's; the reasons say where the risk came from, for the reviewer."""
    if risk < threshold or risk <= 0.0:
        return []
    e = criteria.escalation
    reasons = []
    if estimate is not None and estimate < e.consensus_threshold:
        reasons.append(EscalationReason.CONSENSUS_BELOW_THRESHOLD)
    if worker.below(e.proficiency_target):
        reasons.append(EscalationReason.LOW_PROFICIENCY)
    if too_fast:
        reasons.append(EscalationReason.TOO_FAST)
    return reasons or [EscalationReason.HIGH_RISK]


def drift_flag(current: str | None, found: Drift | None, criteria: ProjectCriteria) -> str | None:
    """The next drift alert flag of a worker, or None when there is no news. Fires when its
    evidence holds a significant drop (`alerts.drift_threshold`) of at least `drift_drop`, and its
    latest items are still down (not a bad patch it has left behind); resolves once its latest items
    are back near the level before the drop (or no drop is left in its evidence) and above the
    target item score plus the margin, so a worker that drifted and stays careless stays flagged."""
    pol, target = criteria.alerts, criteria.targets.item_score
    if found is None:
        return None
    if current != "firing":
        dropped = found.before - found.after >= pol.drift_drop and found.recent <= found.before - pol.drift_drop / 2
        return "firing" if dropped and found.statistic >= pol.drift_threshold else None
    calm = found.statistic < pol.drift_threshold / 3 or found.recent >= found.before - pol.drift_drop / 2
    back = found.recent >= (target if target is not None else 0.0) + pol.margin
    return "resolved" if calm and back else None


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


_NO_COMPARISON = ItemScore(score=None, passed=None)


def consensus_result(value: float | None, criteria: ProjectCriteria) -> ItemScore:
    """A consensus score is an agreement, not a comparison with one reference: no object counts,
    and it passes at the project's threshold. Built without validation when the value is a
    fraction (every annotation of a round gets one: validating each was a sixth of closing a
    round); any other value is validated and refused as before."""
    if value is None:
        return _NO_COMPARISON
    passed = value >= criteria.pass_threshold
    if 0.0 <= value <= 1.0:
        return ItemScore.trusted(_NO_COMPARISON.__dict__ | {"score": value, "passed": passed})
    return ItemScore(score=value, passed=passed)


def rejected_result() -> ItemScore:
    """A reviewer's rejection: nothing in the annotation is right."""
    return ItemScore(score=0.0, passed=False)


def window_f1(buckets: Mapping[int, tuple[int, int, int]], as_of: int, window_s: int) -> tuple[float | None, int]:
    """A label's F1 and its reference objects (tp + fn) over buckets (start -> (tp, fp, fn))
    whose start lies within `window_s` before `as_of` (event time, seconds)."""
    tp = fp = fn = 0
    for start, (t, f, m) in buckets.items():
        if as_of - window_s < start <= as_of:
            tp, fp, fn = tp + t, fp + f, fn + m
    den = 2 * tp + fp + fn
    return (2 * tp / den if den else None), tp + fn


def top_confusion(counts: Mapping[tuple[str, str], int], min_count: int = 3, min_share: float = 0.2) -> str | None:
    """The label a worker confuses most against known answers, in words ('labels car as truck:
    12 of 20 (60 %)'), when it is frequent enough to be a habit and not a slip."""
    seen: dict[str, int] = {}
    for (truth, _), n in counts.items():
        if truth:
            seen[truth] = seen.get(truth, 0) + n
    best = None
    for (truth, given), n in counts.items():
        if truth and given and truth != given and n >= min_count and n / seen[truth] >= min_share:
            if best is None or n / seen[truth] > best[2] / seen[best[0]]:
                best = (truth, given, n)
    if best is None:
        return None
    truth, given, n = best
    return f"labels {truth} as {given}: {n} of {seen[truth]} ({n / seen[truth]:.0%})"
