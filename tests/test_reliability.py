"""The reliability model's pure functions (scoring.reliability), on synthetic evidence with a
known answer: levels, calibration, one round's outlier, drift, pace, the review budget."""

from __future__ import annotations

import numpy as np
import pytest
from goldstream.scoring.reliability import (
    Model,
    Sums,
    Worker,
    budget_threshold,
    drift,
    fit,
    pace,
    round_estimates,
    round_quality,
    time_bin,
)


def _sums(values: np.ndarray) -> Sums:
    return Sums(len(values), float(values.sum()), float((values**2).sum()))


def test_fit_recovers_levels_and_calibrates_round_estimates_against_known_answers() -> None:
    rng = np.random.default_rng(3)
    levels = np.linspace(0.3, 0.95, 12)
    known, rounds = {}, {}
    for i, level in enumerate(levels):
        known[f"w{i}"] = _sums(np.clip(rng.normal(level, 0.1, 30), 0, 1))
        # round estimates read compressed: 0.5 + 0.6 * level (what agreement does to them)
        rounds[f"w{i}"] = _sums(np.clip(rng.normal(0.5 + 0.6 * level, 0.1, 200), 0, 1))
    model = fit(known, rounds)
    assert model.calibration.slope == pytest.approx(1 / 0.6, rel=0.15)
    est = np.array([model.workers[f"w{i}"].estimate for i in range(12)])
    assert np.abs(est - levels).max() < 0.06
    assert all(model.workers[f"w{i}"].sd < 0.05 for i in range(12))


def test_a_worker_with_consensus_only_is_placed_by_the_calibration_and_stays_uncertain() -> None:
    rng = np.random.default_rng(4)
    known = {f"w{i}": _sums(np.clip(rng.normal(0.5 + 0.04 * i, 0.1, 30), 0, 1)) for i in range(10)}
    rounds = {f"w{i}": _sums(np.clip(rng.normal(0.5 + 0.04 * i, 0.1, 100), 0, 1)) for i in range(10)}
    rounds["new"] = _sums(np.full(400, 0.1))
    model = fit(known, rounds)
    new = model.workers["new"]
    assert new.estimate < 0.2 and new.known == 0 and new.rounds == 400
    assert new.sd >= model.calibration.error * 0.9  # the calibration's own error never averages away


def test_level_of_one_worker_equals_the_fit() -> None:
    known = {"a": Sums(10, 8.0, 6.6), "b": Sums(12, 6.0, 3.3)}
    rounds = {"a": Sums(50, 40.0, 33.0), "c": Sums(5, 1.0, 0.3)}
    model = fit(known, rounds)
    for w in ("a", "b", "c"):
        assert model.level(known.get(w, Sums()), rounds.get(w, Sums())) == model.workers[w]
    assert model.worker("nobody").estimate == pytest.approx(model.prior)


def test_one_round_blames_the_answer_that_disagrees_with_two_that_agree() -> None:
    a = np.array([[np.nan, 0.9, 0.1], [0.9, np.nan, 0.12], [0.1, 0.12, np.nan]])
    q, sd = round_estimates(a)
    assert q[2] < 0.3 < 0.8 < min(q[0], q[1])
    assert (sd > 0).all()
    assert round_estimates(a)[0].tolist() == q.tolist()  # the round alone: the same every time


def test_with_two_answers_the_more_reliable_worker_is_believed() -> None:
    a = np.array([[np.nan, 0.2], [0.2, np.nan]])
    model = Model()
    good, bad = Worker(0.95, 0.02, 50, 0), Worker(0.3, 0.05, 50, 0)
    r_good, r_bad = round_quality(a, [good, bad], model, 0.7)
    assert r_good.risk < 0.3 < 0.9 < r_bad.risk


def test_drift_finds_where_a_sustained_drop_began_and_ignores_noise() -> None:
    rng = np.random.default_rng(5)
    steady = np.clip(rng.normal(0.9, 0.08, 100), 0, 1)
    found = drift(steady.tolist(), [0.08**2] * 100)
    assert found is not None and found.statistic < 20
    dropped = np.concatenate([steady[:70], np.clip(rng.normal(0.55, 0.08, 15), 0, 1)])
    found = drift(dropped.tolist(), [0.08**2] * 85)
    assert found is not None and found.statistic > 100
    assert abs(found.at - 70) <= 2 and found.after < 0.65 < 0.85 < found.before
    assert drift([0.9] * 5, [0.01] * 5) is None  # too short to say


def test_pace_learns_that_rushed_work_is_bad_from_known_answers() -> None:
    every = {time_bin(30.0): 200, time_bin(40.0): 150, time_bin(2.0): 20}
    known = {time_bin(30.0): (40, 4), time_bin(2.0): (10, 9)}
    p = pace(every, known, fast_share=0.25)
    assert p.median_s is not None and 20 < p.median_s < 50
    assert p.too_fast(2.0) and not p.too_fast(30.0)
    assert p.odds(2.0) > 5 and p.odds(30.0) == 1.0
    assert pace({time_bin(30.0): 5}, {}, 0.25).fast_below_s is None  # too little to know a norm


def test_budget_threshold_spends_the_budget_on_the_riskiest() -> None:
    hist = {0: 700, 10: 100, 50: 100, 90: 100}  # bins of 0.01
    assert budget_threshold(hist, 0.1) == pytest.approx(0.51)  # the top bin: 10 %
    assert budget_threshold(hist, 0.25) == pytest.approx(0.11)  # the top two: 20 %; a third is too much
    assert budget_threshold(hist, 0.05) == pytest.approx(0.91)  # a bin alone over budget: none of it
    assert budget_threshold(hist, 1.0) == 0.0
    assert budget_threshold({90: 10}, 0.1) == 0.5  # too few risks yet: the default


def test_workers_who_all_look_alike_do_not_break_the_calibration() -> None:
    same = Sums(5, 4.0, 3.2)
    model = fit({"a": same, "b": same, "c": same}, {"a": same, "b": same, "c": same})
    assert model.calibration.slope == 1.0 and np.isfinite(model.calibration.offset)
    assert all(np.isfinite(w.estimate) and np.isfinite(w.sd) for w in model.workers.values())
