"""QC effectiveness on simulated workforces with known truth, against two batch baselines.

    python -m benchmarks.qc_bench [--quick] [--json benchmarks/results/qc.json]

Each workforce (good, poor and drifting workers; boxes and polygons with a scene class; 10 %
gold, overlap 3, 5 % expert review) runs through goldstream's engine with its state in a real
redis-server, via `streams.replay`: the same `Engine` the Faust worker drives (the stream tests
prove live == replay), minus Kafka, so that several workforces fit in the benchmark's time.

Figures, for goldstream and, in the same run on the same events, for:
- a CVAT-style batch report: each worker's mean score on gold, computed once at the end of the
  batch; a worker below the target is flagged, and all its non-gold work goes to review;
- crowd-kit's Dawid-Skene on the scene-class labels: worker accuracy from its confusion
  matrix; an annotation whose class differs from the aggregated class goes to review;
- random audit: a random sample of the same size as goldstream's escalations.

Definitions (all from the simulator's truth):
- skill: a worker's true mean item score (each annotation scored against the true objects);
- truly bad: an annotation whose true item score is below the project's pass threshold;
- drift delay: gold items the worker did from its first drifted task to its first worker alert;
- false alert: a worker alert that fires while the worker's true mean score over the alert's
  window is at or above the target; counted per 10,000 items of the workers that never drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis
from scipy.stats import spearmanr

import schemas as s
from goldstream.settings import Settings
from goldstream.simulator import (
    Drift,
    ProjectSpec,
    ReviewSpec,
    Simulation,
    WorkerSpec,
    WorkforceSpec,
    key_of,
    simulate,
)
from scoring import score_items
from scoring.policy import proficiency
from streams.engine import Record
from streams.replay import ReplayResult, replay
from streams.state import Keys, ProficiencyStore, RedisState

RESULTS = Path(__file__).parent / "results"
CRITERIA = {
    "pass_threshold": 0.7,
    "proficiency": {"qualification": {"min_gold_items": 5}},
    "alerts": {"min_items": 10, "window_s": 3600},
}


# skill ranges (per object, noise in pixels) the workers' skills are drawn from
GOOD = {"miss_rate": (0.01, 0.08), "fp_rate": (0.01, 0.08), "loc_noise": (1.0, 4.0),
        "label_confusion": (0.0, 0.04), "class_error": (0.01, 0.08)}  # fmt: skip
POOR = {"miss_rate": (0.15, 0.35), "fp_rate": (0.1, 0.3), "loc_noise": (5.0, 12.0),
        "label_confusion": (0.05, 0.2), "class_error": (0.15, 0.4)}  # fmt: skip


def workforce(seed: int, items: int, workers: int = 20) -> WorkforceSpec:
    """Mostly good workers, a few poor ones, a few who drift from good to poor at a random task."""
    rng = np.random.default_rng(seed)

    def draw(ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in ranges.items()}

    def good() -> dict[str, float]:
        return draw(GOOD)

    def poor() -> dict[str, float]:
        return draw(POOR)

    n_poor, n_drift = max(1, workers // 5), max(1, workers // 5)
    specs = []
    for i in range(workers):
        speed = float(rng.uniform(15, 45))
        if i < n_poor:
            specs.append(WorkerSpec(worker_id=f"p{i:02d}", speed_s=speed, **poor()))
        elif i < n_poor + n_drift:
            tasks = items * 3 / workers  # overlap 3, plus gold at the same rate: about this many each
            at = int(rng.integers(int(tasks * 0.25), int(tasks * 0.5) + 1))
            specs.append(WorkerSpec(worker_id=f"d{i:02d}", speed_s=speed, **good(), drift=Drift(at=at, **poor())))
        else:
            specs.append(WorkerSpec(worker_id=f"g{i:02d}", speed_s=speed, **good()))
    return WorkforceSpec(
        seed=seed,
        projects=[
            ProjectSpec(
                project_id="qc",
                items=items,
                labels=["car", "bus", "person", "bike"],
                shapes={"bbox": 0.8, "polygon": 0.2},
                objects_per_item=(2, 8),
                classifications={"scene": ["street", "highway", "parking", "tunnel"]},
                gold_rate=0.1,
                overlap=3,
                review=ReviewSpec(rate=0.05, promote_rate=0.5),
                criteria=CRITERIA,
            )
        ],
        workers=specs,
    )


# ----------------------------------------------------------------------------- the three contenders


async def run_goldstream(sim: Simulation, redis: Redis, prefix: str) -> tuple[ReplayResult, dict[str, Any]]:
    records = [Record(t, m.to_bytes(), key_of(t, m).encode(), 0, i) for i, (t, m) in enumerate(sim.events)]
    keys = Keys(prefix)
    result = await replay(records, redis, keys, close_rounds=True)
    crit = next(m for t, m in sim.events if t == "projects")
    assert isinstance(crit, s.ProjectCriteria)
    workers = sorted(sim.truth["workers"])
    store = ProficiencyStore(RedisState(redis, keys))
    totals = await store.totals([(crit.project_id, w) for w in workers])
    return result, {w: proficiency(t, crit) for w, t in zip(workers, totals, strict=True)}


def cvat_style(sim: Simulation) -> dict[str, float]:
    """Each worker's mean item score on gold items, computed once at the end of the batch."""
    crit = next(m for t, m in sim.events if t == "projects")
    gold = {m.item_id: m.content for t, m in sim.events if t == "gold"}
    anns = [m for t, m in sim.events if t == "annotations" and m.item_id in gold]
    scores = score_items([(a, gold[a.item_id]) for a in anns], crit)  # type: ignore[arg-type]
    per: dict[str, list[float]] = {}
    for a, r in zip(anns, scores, strict=True):
        per.setdefault(a.worker_id, []).append(1.0 if r.score is None else r.score)
    return {w: float(np.mean(v)) for w, v in per.items()}


def dawid_skene(sim: Simulation, taxonomy: str = "scene") -> tuple[dict[str, float], dict[str, str]]:
    """crowd-kit's Dawid-Skene on one classification: (worker accuracy, aggregated class per item)."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    rows = [
        (a.item_id, a.worker_id, a.content.classifications[taxonomy][0])
        for t, a in sim.events
        if t == "annotations" and a.content.classifications.get(taxonomy)
    ]
    df = pd.DataFrame(rows, columns=["task", "worker", "label"])
    ds = DawidSkene(n_iter=100).fit(df)
    errors, priors = ds.errors_, ds.priors_
    accuracy = {}
    for w in df["worker"].unique():
        accuracy[str(w)] = float(sum(priors[c] * errors.loc[(w, c), c] for c in priors.index if (w, c) in errors.index))
    return accuracy, {str(k): str(v) for k, v in ds.labels_.items()}


# ----------------------------------------------------------------------------- figures


def spearman(estimate: dict[str, float | None], truth: dict[str, float]) -> float | None:
    ws = [w for w in truth if estimate.get(w) is not None]
    if len(ws) < 3:
        return None
    return round(float(spearmanr([estimate[w] for w in ws], [truth[w] for w in ws]).statistic), 3)


def catch(flagged: set[str], bad: set[str], pool: int) -> dict[str, float | int]:
    """Share of truly bad annotations among the flagged ones, and the review budget they cost."""
    hit = len(flagged & bad)
    return {
        "escalated": len(flagged),
        "budget_share": round(len(flagged) / pool, 4) if pool else 0.0,
        "bad_caught": hit,
        "bad_caught_share": round(hit / len(bad), 4) if bad else 0.0,
        "precision": round(hit / len(flagged), 4) if flagged else 0.0,
    }


def true_window_mean(sim: Simulation, worker: str, end: Any, window_s: int) -> float | None:
    vals = [
        sim.truth["annotations"][a.event_id]["true_score"]
        for t, a in sim.events
        if t == "annotations" and a.worker_id == worker and end - timedelta(seconds=window_s) < a.submitted_at <= end
    ]
    return float(np.mean(vals)) if vals else None


def evaluate(
    sim: Simulation, result: ReplayResult, prof: dict, cvat: dict, ds: tuple[dict, dict] | None
) -> dict[str, Any]:
    """Every figure of one workforce; `ds` None leaves Dawid-Skene out (crowd-kit not installed)."""
    truth = sim.truth
    crit = next(m for t, m in sim.events if t == "projects")
    assert isinstance(crit, s.ProjectCriteria)
    target = crit.targets.item_score or 0.0
    anns = [m for t, m in sim.events if t == "annotations"]
    skill = {w: v["true_mean_score"] for w, v in truth["workers"].items()}
    non_gold = [a for a in anns if not truth["annotations"][a.event_id]["gold"]]
    bad = {a.event_id for a in non_gold if truth["annotations"][a.event_id]["bad"]}
    drifters = {w for w, v in truth["workers"].items() if v["drift"]}
    stable = set(truth["workers"]) - drifters
    stable_items = sum(1 for a in anns if a.worker_id in stable)

    # goldstream
    escalated = {e.annotation.event_id for e in result.outputs["escalations"]}
    escalated_non_gold = {a.event_id for a in non_gold} & escalated
    worker_alerts = [
        a
        for a in result.outputs["alerts"]
        if a.scope == s.AlertScope.WORKER and a.state == "firing"  # type: ignore[attr-defined]
    ]
    false_alerts = 0
    for al in worker_alerts:
        if al.scope_id in stable:  # type: ignore[attr-defined]
            mean = true_window_mean(sim, al.scope_id, al.raised_at, crit.alerts.window_s)  # type: ignore[attr-defined]
            false_alerts += mean is not None and mean >= target
    delays, cvat_delays, tasks_delays = {}, {}, {}
    gold_items = {g.item_id for t, g in sim.events if t == "gold"}
    cvat_flagged = {w for w, v in cvat.items() if v < target}
    for w in sorted(drifters):
        at = truth["workers"][w]["drift"]["at"]
        start = next(a.submitted_at for a in anns if a.event_id == f"ann-{w}-{at:05d}")
        mine = [a for a in anns if a.worker_id == w and a.submitted_at >= start]
        fired = sorted(al.raised_at for al in worker_alerts if al.scope_id == w and al.raised_at >= start)  # type: ignore[attr-defined]
        gold_after = [a for a in mine if a.item_id in gold_items]
        if fired:
            delays[w] = sum(1 for a in gold_after if a.submitted_at <= fired[0])
            tasks_delays[w] = sum(1 for a in mine if a.submitted_at <= fired[0])
        else:
            delays[w] = None
        cvat_delays[w] = len(gold_after) if w in cvat_flagged else None  # known only at the end of the batch

    budget = len(escalated_non_gold)
    pool = len(non_gold)
    ds_acc, ds_labels = ds if ds is not None else ({}, {})
    ds_flagged = {
        a.event_id
        for a in non_gold
        if a.content.classifications.get("scene") and a.content.classifications["scene"][0] != ds_labels.get(a.item_id)
    }
    cvat_review = {a.event_id for a in non_gold if a.worker_id in cvat_flagged}

    def detected(d: dict) -> list[int]:
        return [v for v in d.values() if v is not None]

    gs_delays, cv_delays = detected(delays), detected(cvat_delays)
    return {
        "workers": len(truth["workers"]),
        "drifting_workers": len(drifters),
        "annotations": len(anns),
        "non_gold_annotations": pool,
        "truly_bad_non_gold": len(bad),
        "goldstream": {
            "spearman_mean_score": spearman({w: p.mean_score for w, p in prof.items()}, skill),
            "spearman_lower_bound": spearman({w: p.lower_bound for w, p in prof.items()}, skill),
            "drift_detected": f"{len(gs_delays)}/{len(drifters)}",
            "drift_delay_gold_items": delays,
            "drift_delay_gold_items_median": float(np.median(gs_delays)) if gs_delays else None,
            "drift_delay_tasks": tasks_delays,
            "false_alerts": false_alerts,
            "false_alerts_per_10k_stable_items": round(false_alerts / stable_items * 10_000, 2)
            if stable_items
            else None,
            **catch(escalated_non_gold, bad, pool),
            "escalations_by_reason": dict(
                Counter(r.value for e in result.outputs["escalations"] for r in e.reasons)  # type: ignore[attr-defined]
            ),
        },
        "cvat_style_batch": {
            "spearman": spearman(cvat, skill),  # type: ignore[arg-type]
            "drift_detected": f"{len(cv_delays)}/{len(drifters)}",
            "drift_delay_gold_items": cvat_delays,
            "drift_delay_gold_items_median": float(np.median(cv_delays)) if cv_delays else None,
            "false_alerts": len(cvat_flagged & {w for w in stable if skill[w] >= target}),
            "false_alerts_per_10k_stable_items": round(
                len(cvat_flagged & {w for w in stable if skill[w] >= target}) / stable_items * 10_000, 2
            )
            if stable_items
            else None,
            **catch(cvat_review, bad, pool),
        },
        "dawid_skene": {"spearman": spearman(ds_acc, skill), **catch(ds_flagged, bad, pool)}  # type: ignore[arg-type]
        if ds is not None
        else None,
        "random_audit_same_budget": {"bad_caught_share": round(budget / pool, 4) if pool else 0.0},
    }


async def run(settings: Settings, seeds: Sequence[int], items: int) -> dict[str, Any]:
    redis = Redis.from_url(settings.redis_url)
    out = []
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            sim = simulate(workforce(seed, items), seed)
            prefix = f"bench-qc-{seed}-{int(time.time())}"
            result, prof = await run_goldstream(sim, redis, prefix)
            took = time.perf_counter() - t0
            figures = evaluate(sim, result, prof, cvat_style(sim), dawid_skene(sim))
            figures["seed"], figures["seconds"] = seed, round(took, 1)
            out.append(figures)
            g, c, d = figures["goldstream"], figures["cvat_style_batch"], figures["dawid_skene"]
            print(
                f"  seed {seed}: {figures['annotations']} annotations in {took:.0f} s; Spearman goldstream "
                f"{g['spearman_mean_score']} / CVAT-style {c['spearman']} / Dawid-Skene {d['spearman']}; "
                f"bad caught {g['bad_caught_share']:.0%} at budget {g['budget_share']:.0%} "
                f"(CVAT-style {c['bad_caught_share']:.0%} at {c['budget_share']:.0%}, "
                f"DS {d['bad_caught_share']:.0%} at {d['budget_share']:.0%}); "
                f"drift detected {g['drift_detected']} after median {g['drift_delay_gold_items_median']} gold items; "
                f"false alerts/10k {g['false_alerts_per_10k_stable_items']}"
            )
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.delete(key)
    finally:
        await redis.aclose()
    return {"criteria": CRITERIA, "items_per_workforce": items, "workforces": out, "summary": summarise(out)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the workforces of the headline figures."""

    def mean(path: tuple[str, str]) -> float | None:
        vals = [r[path[0]][path[1]] for r in runs if r[path[0]][path[1]] is not None]
        return round(float(np.mean(vals)), 3) if vals else None

    keys = {
        "goldstream": ("spearman_mean_score", "spearman_lower_bound", "drift_delay_gold_items_median",
                       "false_alerts_per_10k_stable_items", "bad_caught_share", "budget_share", "precision"),
        "cvat_style_batch": ("spearman", "drift_delay_gold_items_median", "false_alerts_per_10k_stable_items",
                             "bad_caught_share", "budget_share", "precision"),
        "dawid_skene": ("spearman", "bad_caught_share", "budget_share", "precision"),
        "random_audit_same_budget": ("bad_caught_share",),
    }  # fmt: skip
    out: dict[str, Any] = {who: {k: mean((who, k)) for k in ks} for who, ks in keys.items()}
    for who in ("goldstream", "cvat_style_batch"):
        det = [r[who]["drift_detected"].split("/") for r in runs]
        out[who]["drift_detected"] = f"{sum(int(a) for a, _ in det)}/{sum(int(b) for _, b in det)}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small workforce (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "qc.json")
    args = ap.parse_args()
    settings = Settings.load()
    seeds, items = ((11,), 300) if args.quick else ((11, 12, 13), 1200)
    print(f"QC effectiveness on {len(seeds)} simulated workforce(s), Redis at {settings.redis_url}")
    figures = asyncio.run(run(settings, seeds, items))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps(figures["summary"], indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
