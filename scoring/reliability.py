"""Worker reliability from all the evidence: known answers and peer agreement, as the stream goes.

A generalisation of Dawid-Skene to item scores. Each annotation has a latent quality q (its item
score against the truth); a worker's annotations scatter around its level. The evidence:
- a known answer (gold, expert review) measures q directly;
- a consensus round: two answers of an item agree, in expectation, as q_a * q_b, so an answer
  that disagrees with two answers that agree with each other is the bad one (`round_estimates`).
  A round's estimates depend on the round alone, so the stream can sum them per worker;
- the round estimates are calibrated against the known answers of the workers who have both
  (`fit`), and a worker's level combines the two with their uncertainties.
At a round's close each member's risk (P(quality < pass threshold)) weighs its peers by their
levels, and adds the worker's own level and its pace (`round_quality`, `pace`). The worker's
evidence in event-time order feeds a change-point test (`drift`); the riskiest share of the work
goes to review (`budget_threshold`).

Only sums (counts, sums, sums of squares, histograms) are kept in Redis: they do not depend on the
order events arrive in, so a replay and a rebuild fit the same model. Everything here is pure
numpy: `streams` reads the sums, calls these functions and acts on what they say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

SCALE = 10**9  # fixed point of the sums (scoring.counters)
_N = NormalDist()


@dataclass(frozen=True)
class Sums:
    """n observations, their sum and their sum of squares (fixed point 1e-9 in Redis)."""

    n: int = 0
    s: float = 0.0
    ss: float = 0.0

    @classmethod
    def of_fields(cls, fields: Mapping[str, int], prefix: str) -> Sums:
        return cls(
            fields.get(f"{prefix}n", 0), fields.get(f"{prefix}s", 0) / SCALE, fields.get(f"{prefix}ss", 0) / SCALE
        )


@dataclass(frozen=True)
class Worker:
    """One worker's standing: its estimated level, the level's standard error, and the evidence."""

    estimate: float
    sd: float
    known: int  # annotations with a known answer (gold, review)
    rounds: int  # consensus rounds

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        z = _N.inv_cdf(0.5 + confidence / 2)
        return max(self.estimate - z * self.sd, 0.0), min(self.estimate + z * self.sd, 1.0)


@dataclass(frozen=True)
class Calibration:
    """Known quality as a linear function of the round estimate, across workers with both."""

    offset: float = 0.0
    slope: float = 1.0
    error: float = 0.05  # sd of a worker's calibrated level around its known level, beyond sampling

    def __call__(self, raw: float) -> float:
        return min(max(self.offset + self.slope * raw, 0.0), 1.0)

    def raw(self, level: float) -> float:
        """The round-estimate scale of a level (the inverse map)."""
        return min(max((level - self.offset) / self.slope, 0.0), 1.0) if self.slope > 0 else level


@dataclass(frozen=True)
class Model:
    """A project's reliability model, fitted from its workers' sums (`fit`)."""

    workers: dict[str, Worker] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    spread: float = 0.15  # sd of a worker's annotation quality around its level (known answers)
    round_spread: float = 0.15  # the same for round estimates (raw scale)
    prior: float = 0.75  # a new worker's level before any evidence
    prior_weight: float = 2.0  # in annotations

    def worker(self, worker_id: str) -> Worker:
        """A fitted worker's level (a worker without evidence: the prior)."""
        found = self.workers.get(worker_id)
        return found if found is not None else self.level(Sums(), Sums())

    def level(self, known: Sums, rounds: Sums) -> Worker:
        """One worker's level from its own sums and this model's calibration and spreads: what
        `fit` gives it, but current as soon as its sums change (the project-wide parts of the
        model move slowly and are refitted now and then)."""
        p0 = self.prior_weight / self.spread**2
        pk = known.n / self.spread**2
        num, den = p0 * self.prior, p0 + pk
        if known.n:
            num += pk * known.s / known.n
        if rounds.n:
            cal = self.calibration
            pr = 1 / ((cal.slope * self.round_spread) ** 2 / rounds.n + cal.error**2)
            num += pr * cal(rounds.s / rounds.n)
            den += pr
        return Worker(min(max(num / den, 0.0), 1.0), 1 / math.sqrt(den), known.n, rounds.n)


def fit(
    known: Mapping[str, Sums], rounds: Mapping[str, Sums], *, prior: float = 0.75, prior_weight: float = 2.0
) -> Model:
    """Every worker's level and its standard error, from its known-answer scores and its round
    estimates (`round_estimates`), the latter calibrated against the known answers of the workers
    who have both (weighted least squares across workers, pulled towards the identity when few
    workers have both). The levels are precision-weighted means of the prior, the known mean and
    the calibrated round mean; the calibration's own error stays in every level's sd, so
    consensus alone never makes a worker look certain."""
    names = sorted(set(known) | set(rounds))
    kn = np.array([known.get(w, Sums()).n for w in names], dtype=float)
    ks = np.array([known.get(w, Sums()).s for w in names])
    kss = np.array([known.get(w, Sums()).ss for w in names])
    rn = np.array([rounds.get(w, Sums()).n for w in names], dtype=float)
    rs = np.array([rounds.get(w, Sums()).s for w in names])
    rss = np.array([rounds.get(w, Sums()).ss for w in names])
    if kn.sum() >= 10:
        prior = float(np.clip(ks.sum() / kn.sum(), 0.05, 0.99))
    km = np.divide(ks, kn, out=np.zeros_like(ks), where=kn > 0)
    rm = np.divide(rs, rn, out=np.zeros_like(rs), where=rn > 0)
    spread = _pooled_sd(kn, ks, kss, km, 0.15)
    round_spread = _pooled_sd(rn, rs, rss, rm, 0.15)
    cal = _calibrate(km, kn, kss, rm, rn, spread, round_spread)
    model = Model({}, cal, spread, round_spread, prior, prior_weight)
    workers = {
        w: model.level(Sums(int(kn[i]), float(ks[i]), float(kss[i])), Sums(int(rn[i]), float(rs[i]), float(rss[i])))
        for i, w in enumerate(names)
    }
    return Model(workers, cal, spread, round_spread, prior, prior_weight)


def _pooled_sd(n: np.ndarray, s: np.ndarray, ss: np.ndarray, mean: np.ndarray, default: float) -> float:
    """Pooled sd of observations around their worker's mean, floored at 0.1: never more certain
    of one annotation's quality than that, however alike a project's answers have been so far."""
    total = n.sum()
    if total < 10:
        return default
    resid = (ss - 2 * mean * s + n * mean * mean).sum()
    return float(min(max(math.sqrt(max(resid, 0.0) / max(total - (n > 0).sum(), 1)), 0.1), 0.4))


def _calibrate(
    km: np.ndarray,
    kn: np.ndarray,
    kss: np.ndarray,
    rm: np.ndarray,
    rn: np.ndarray,
    spread: float,
    round_spread: float,
) -> Calibration:
    both = (kn > 0) & (rn > 0)
    if both.sum() < 3:
        return Calibration()
    x, y, n = rm[both], km[both], kn[both]
    # each worker's own scatter of known scores (careless workers scatter more), pulled to the pool
    own = np.maximum(kss[both] - n * y * y, 0.0)
    var_k = (own + 4 * spread**2) / (np.maximum(n - 1, 0) + 4) / n
    w = 1 / (var_k + round_spread**2 / rn[both])
    xc = float((w * x).sum() / w.sum())
    yc = float((w * y).sum() / w.sum())
    sxx = float((w * (x - xc) ** 2).sum())
    # the slope is pulled towards 1 with the leverage of three typical workers: a narrow spread of
    # workers cannot tell a slope, and then round estimates are taken as they are
    pull = 3 * float(np.median(w)) * sxx / w.sum()
    if not sxx + pull > 1e-12:  # every worker alike so far: nothing to tell a slope from
        return Calibration(yc - xc, 1.0, 0.05)
    slope = (float((w * (x - xc) * (y - yc)).sum()) + pull) / (sxx + pull)
    slope = min(max(float(slope), 0.3), 3.0)
    offset = yc - slope * xc
    resid = y - (offset + slope * x)
    excess = (float((w * resid**2).sum()) - len(x)) / float(w.sum())  # beyond the sampling variance
    error = math.sqrt(max(excess, 0.0) + 0.02**2)
    return Calibration(float(offset), slope, min(error, 0.3))


# ----------------------------------------------------------------------------- one annotation


@dataclass(frozen=True)
class Quality:
    """One annotation's estimated quality (posterior mean and sd) and its risk of being bad."""

    estimate: float
    sd: float
    risk: float


NEUTRAL_PRIOR, NEUTRAL_SD, AGREEMENT_NOISE = 0.75, 0.3, 0.15


def round_estimates(
    agreement: np.ndarray, priors: np.ndarray | None = None, prior_sd: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each member's quality as one round's agreement matrix says (NaN: undefined), under
    agreement(a, b) ~ q_a * q_b: an answer that disagrees with two answers that agree with each
    other is the bad one. Without `priors` every member starts alike (a neutral prior), so the
    estimate depends on the round alone, the same in every replay: the stream sums it per
    worker. With priors (peers' levels on this scale), peers are weighted by their reliability.
    Returns (estimates, their sd)."""
    k = agreement.shape[0]
    prior = np.full(k, NEUTRAL_PRIOR) if priors is None else np.asarray(priors, dtype=float)
    sd = np.full(k, NEUTRAL_SD) if prior_sd is None else np.asarray(prior_sd, dtype=float)
    q, qsd = _estimates(agreement[None], prior[None], sd[None] ** 2)
    return q[0], qsd[0]


def round_estimates_many(agreements: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`round_estimates` of many rounds (neutral priors) in one vectorised pass: a batch's rounds
    cost one set of numpy calls, not one per round."""
    if not agreements:
        return []
    a, k = _stack(agreements)
    q, _ = _estimates(a, np.full(a.shape[:2], NEUTRAL_PRIOR), np.full(a.shape[:2], NEUTRAL_SD**2))
    return [q[i, :n] for i, n in enumerate(k)]


def _stack(agreements: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Rounds of different sizes as one (rounds, K, K) array, padded with NaN (no agreement: a
    padded member touches no one, and adds only zeros to the others' sums)."""
    k = [m.shape[0] for m in agreements]
    out = np.full((len(agreements), max(k), max(k)), np.nan)
    for i, m in enumerate(agreements):
        out[i, : k[i], : k[i]] = m
    return out, k


def _estimates(agreement: np.ndarray, prior: np.ndarray, var0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fit behind `round_estimates`, over a stack of rounds: agreement (R, K, K), prior and
    prior variance (R, K)."""
    has = ~np.isnan(agreement)
    idx = np.arange(agreement.shape[1])
    has[:, idx, idx] = False
    a = np.where(has, agreement, 0.0)
    wn = 1 / AGREEMENT_NOISE**2
    q = prior.copy()
    for _ in range(10):
        g = q[:, None, :] * has
        q = np.clip((prior / var0 + wn * (g * a).sum(axis=2)) / (1 / var0 + wn * (g * g).sum(axis=2)), 0.0, 1.0)
    g = q[:, None, :] * has
    return q, 1 / np.sqrt(1 / var0 + wn * (g * g).sum(axis=2))


def round_quality(
    agreement: np.ndarray, levels: Sequence[Worker], model: Model, threshold: float, odds: Sequence[float] | None = None
) -> list[Quality]:
    """Each member's quality and risk in one consensus round: its round estimate with its peers
    weighted by their levels (its own prior left neutral, so it is judged by the others), mapped
    by the calibration, then combined with what its own level says of it. `odds`: a likelihood
    ratio per member from other signals (time on task), applied to the risk."""
    return round_quality_many([(agreement, levels, model, threshold, odds)])[0]


Round = tuple[np.ndarray, Sequence[Worker], Model, float, Sequence[float] | None]


def round_quality_many(rounds: Sequence[Round]) -> list[list[Quality]]:
    """`round_quality` of many rounds, their fits in one vectorised pass (one variant per member:
    its own prior neutral, its peers' from their levels)."""
    if not rounds:
        return []
    stacks, priors, sds, owner = [], [], [], []
    for r, (agreement, levels, model, _, _) in enumerate(rounds):
        cal = model.calibration
        raw = np.array([cal.raw(w.estimate) for w in levels])
        raw_sd = np.sqrt(model.round_spread**2 + (np.array([w.sd for w in levels]) / max(cal.slope, 0.3)) ** 2)
        for i in range(len(levels)):
            p, s = raw.copy(), raw_sd.copy()
            p[i], s[i] = NEUTRAL_PRIOR, NEUTRAL_SD
            stacks.append(agreement)
            priors.append(p)
            sds.append(s)
            owner.append((r, i))
    a, k = _stack(stacks)
    prior = np.full(a.shape[:2], NEUTRAL_PRIOR)
    var0 = np.full(a.shape[:2], NEUTRAL_SD**2)
    for v, (p, s) in enumerate(zip(priors, sds, strict=True)):
        prior[v, : k[v]], var0[v, : k[v]] = p, s**2
    q, qsd = _estimates(a, prior, var0)
    out: list[list[Quality]] = [[] for _ in rounds]
    for v, (r, i) in enumerate(owner):
        _, levels, model, threshold, odds = rounds[r]
        cal = model.calibration
        est, var = cal(float(q[v, i])), (cal.slope * float(qsd[v, i])) ** 2 + cal.error**2
        own = levels[i]
        var_own = model.spread**2 + own.sd**2
        mean = (est / var + own.estimate / var_own) / (1 / var + 1 / var_own)
        sd = 1 / math.sqrt(1 / var + 1 / var_own)
        risk = bad_probability(mean, sd, threshold)
        if odds is not None and odds[i] != 1.0:
            risk = _with_odds(risk, odds[i])
        out[r].append(Quality(mean, sd, risk))
    return out


def evidence_value(kind: str, value: float, model: Model) -> tuple[float, float]:
    """One item of a worker's evidence sequence on the quality scale, with its variance: a known
    answer as it is, a round estimate through the calibration."""
    if kind == "known":
        return value, model.spread**2
    cal = model.calibration
    return cal(value), (cal.slope * model.round_spread) ** 2


def prior_quality(level: Worker, model: Model, threshold: float) -> Quality:
    """Before any comparison: what the worker's level says of its next annotation."""
    sd = math.sqrt(model.spread**2 + level.sd**2)
    return Quality(level.estimate, sd, bad_probability(level.estimate, sd, threshold))


def bad_probability(estimate: float, sd: float, threshold: float) -> float:
    """P(quality < threshold) under a normal posterior."""
    if sd <= 0:
        return 1.0 if estimate < threshold else 0.0
    return float(_N.cdf((threshold - estimate) / sd))


def known_risk(score: float, threshold: float) -> float:
    """Against a known answer the quality is measured, not estimated."""
    return 1.0 if score < threshold else 0.0


def _with_odds(p: float, ratio: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    o = p / (1 - p) * ratio
    return o / (1 + o)


# ----------------------------------------------------------------------------- time on task

TIME_BINS_PER_OCTAVE = 2


def time_bin(seconds: float) -> int:
    """Histogram bin of a time on task: half octaves (0.5 s .. ~3 days), so sums stay small."""
    return int(min(max(math.floor(TIME_BINS_PER_OCTAVE * math.log2(max(seconds, 0.01))), -2), 36))


def bin_seconds(b: int) -> float:
    return 2 ** (b / TIME_BINS_PER_OCTAVE)


@dataclass(frozen=True)
class Pace:
    """A project's norm of time on task and what a rushed annotation says about quality."""

    median_s: float | None
    fast_below_s: float | None
    ratio: float  # likelihood ratio of 'bad' for an annotation faster than fast_below_s

    def odds(self, seconds: float | None) -> float:
        if seconds is None or self.fast_below_s is None or seconds >= self.fast_below_s:
            return 1.0
        return self.ratio

    def too_fast(self, seconds: float | None) -> bool:
        return seconds is not None and self.fast_below_s is not None and seconds < self.fast_below_s


def pace(all_bins: Mapping[int, int], known_bins: Mapping[int, tuple[int, int]], fast_share: float) -> Pace:
    """The project's median time on task, 'too fast' as below `fast_share` of it, and how much
    more often known-answer annotations that fast were bad than the others (Laplace-smoothed,
    never below 1: speed alone does not vouch for quality). `known_bins[b] = (n, bad)`."""
    total = sum(all_bins.values())
    if total < 20:
        return Pace(None, None, 1.0)
    acc, median_bin = 0, min(all_bins)
    for b in sorted(all_bins):
        acc += all_bins[b]
        if acc * 2 >= total:
            median_bin = b
            break
    median = bin_seconds(median_bin + 0.5)
    fast = median * fast_share
    fb = sum(bad for b, (_, bad) in known_bins.items() if bin_seconds(b + 1) <= fast)
    fn = sum(n for b, (n, _) in known_bins.items() if bin_seconds(b + 1) <= fast)
    bad = sum(bad for _, bad in known_bins.values())
    n = sum(n for n, _ in known_bins.values())
    p_fast_bad = (fb + 1) / (bad + 2)
    p_fast_good = (fn - fb + 1) / (n - bad + 2)
    return Pace(median, fast, max(p_fast_bad / p_fast_good, 1.0))


# ----------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class Drift:
    """The strongest drop in a worker's recent evidence: where it starts (index into the
    sequence), the level before and after, and its strength in standard errors squared."""

    statistic: float
    at: int
    before: float
    after: float
    recent: float  # level of the last few items (for resolving)


def drift(values: Sequence[float], variances: Sequence[float], min_after: int = 5, recent: int = 15) -> Drift | None:
    """A change-point test on one worker's evidence in event-time order (counted in items, not
    wall-clock time): for each split, the weighted means before and after, and the squared
    z-score of their difference; the split with the largest drop wins. Like a CUSUM it reacts
    to a sustained shift after a handful of items, but it also says where the shift began and
    needs no prior level."""
    n = len(values)
    if n < 2 * min_after:
        return None
    x = np.asarray(values, dtype=float)
    w = 1 / np.maximum(np.asarray(variances, dtype=float), 1e-4)
    cw, cx = np.cumsum(w), np.cumsum(w * x)
    k = np.arange(min_after, n - min_after + 1)  # split before index k
    w1, w2 = cw[k - 1], cw[-1] - cw[k - 1]
    m1, m2 = cx[k - 1] / w1, (cx[-1] - cx[k - 1]) / w2
    z2 = np.where(m2 < m1, (m1 - m2) ** 2 / (1 / w1 + 1 / w2), 0.0)
    best = int(np.argmax(z2))
    tail = slice(max(n - recent, 0), n)
    level = float((w[tail] * x[tail]).sum() / w[tail].sum())
    return Drift(float(z2[best]), int(k[best]), float(m1[best]), float(m2[best]), level)


# ----------------------------------------------------------------------------- review budget

RISK_BINS = 100


def risk_bin(risk: float) -> int:
    return min(int(risk * RISK_BINS), RISK_BINS - 1)


@dataclass(frozen=True)
class Risks:
    """A project's consensus risks so far: histogram (bin of 1/RISK_BINS -> count), how many were
    judged and how many of them were sent to review."""

    hist: dict[int, int] = field(default_factory=dict)
    judged: int = 0
    escalated: int = 0

    @property
    def expected_bad_share(self) -> float | None:
        """The mean risk: risks being probabilities, the share of the work expected to be bad."""
        total = sum(self.hist.values())
        return expected_bad(self.hist) / total if total else None


def expected_bad(hist: Mapping[int, int]) -> float:
    """Expected number of bad annotations in a risk histogram (each bin at its middle)."""
    return sum((b + 0.5) / RISK_BINS * n for b, n in hist.items())


def budget_threshold(hist: Mapping[int, int], budget: float, min_count: int = 50, default: float = 0.5) -> float:
    """The risk above which the riskiest `budget` share of annotations lies, from the histogram
    of risks seen so far (bins of 1/RISK_BINS): escalating above it spends the budget on the
    riskiest work first. Before `min_count` risks, `default`."""
    total = sum(hist.values())
    if total < min_count:
        return default
    allowed = budget * total
    acc = 0
    for b in range(RISK_BINS - 1, -1, -1):
        acc += hist.get(b, 0)
        if acc > allowed:
            return (b + 1) / RISK_BINS
    return 0.0


def budget_table(hist: Mapping[int, int], budgets: Sequence[float]) -> list[dict[str, float | None]]:
    """What each review budget buys, read from the histogram of risks: the risk it escalates
    from, and (risks being probabilities) the expected share of the bad work it catches and the
    expected share of its reviews that find bad work. With the expected bad share (the mean risk)
    it lets a team choose its budget before spending it."""
    total = sum(hist.values())
    bad = expected_bad(hist)
    out: list[dict[str, float | None]] = []
    for budget in budgets:
        threshold = budget_threshold(hist, budget, min_count=1, default=1.0)
        chosen = {b: n for b, n in hist.items() if b / RISK_BINS >= threshold - 1e-9}
        n = sum(chosen.values())
        caught = expected_bad(chosen)
        out.append(
            {
                "budget": budget,
                "from_risk": threshold,
                "share": round(n / total, 4) if total else None,
                "expected_bad_caught": round(caught / bad, 4) if bad else None,
                "expected_precision": round(caught / n, 4) if n else None,
            }
        )
    return out


__all__ = [
    "Calibration",
    "Drift",
    "Model",
    "Pace",
    "Quality",
    "Risks",
    "Sums",
    "Worker",
    "bad_probability",
    "budget_table",
    "budget_threshold",
    "drift",
    "evidence_value",
    "expected_bad",
    "fit",
    "known_risk",
    "pace",
    "prior_quality",
    "risk_bin",
    "round_estimates",
    "round_quality",
    "time_bin",
]
