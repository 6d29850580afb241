"""QC effectiveness on simulated workforces with known truth, against batch baselines, same events.

    python -m benchmarks.qc_bench [--quick] [--json benchmarks/results/qc.json]

Two families of workforces, several seeds each:
- `independent` (`benchmarks/workforces.py`, written without reading goldstream's rules): 22
  workers (good ones on a continuum, sloppy, lazy ones that skip small objects, two that call
  cars trucks, a random spammer, three that drift part-way), boxes and a scene class, 12 % gold,
  overlap 3, realistic shifts and queues (rounds complete over minutes to hours), the project's
  DEFAULT criteria. Truth as that module defines it: an annotation is truly bad when its object
  F1 against the true objects is below 0.7; a worker's skill is its mean object F1.
  Figures are also given against the truth in goldstream's own metric (the item score of the
  annotation against the true content, spec §4): the metric a project asks goldstream to judge.
- `own` (`goldstream simulate`'s model, the workforce the first version was tuned on): good,
  poor and drifting workers, boxes and polygons, 10 % gold, 5 % expert review.

Each workforce runs through goldstream's engine (`streams.replay`, the engine the worker runs,
state in the real redis-server) with `escalation.review_budget` set to 1.25 times the truly bad
share of non-gold annotations (the issue's target asks for at most that much review). In the
same run, on the same events: CVAT's batch quality report, crowd-kit's Dawid-Skene, one-coin
Dawid-Skene, GLAD, MACE and M-MSR on the scene class, and a geometry-aware batch consensus with
and without reliability weighting (`benchmarks/baselines.py`), the consensus ones at the same
review budget.

Definitions:
- Spearman: rank correlation of a method's per-worker estimate with true skill.
- drift delay: tasks a drifting worker did from its first drifted task to its first worker
  alert (any metric) after it; detected: alerted at all after the drift began.
- spammer delay: tasks the spammer did until its first worker alert.
- false alerts: firing worker alerts on workers that never drift and whose true skill is at or
  above the target item score, per 10,000 annotations of the workers that never drift.
- bad caught / budget / precision: share of truly bad non-gold annotations escalated (random
  audits left out: they are on top, at their own rate); escalations as a share of non-gold
  annotations; share of escalations that were truly bad.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from goldstream.scoring import score_items
from goldstream.streams.engine import Record
from goldstream.streams.replay import ReplayResult, replay
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, ProficiencyStore, RedisState, connect, level_of
from redis.asyncio import Redis
from scipy.stats import spearmanr

from goldstream import schemas as s
from goldstream.simulator import key_of

RESULTS = Path(__file__).parent / "results"
BASELINES = True
OWN_CRITERIA = {
    "pass_threshold": 0.7,
    "proficiency": {"qualification": {"min_gold_items": 5}},
    "alerts": {"min_items": 10, "window_s": 3600},
}
TARGETS = {
    "spearman": 0.95,
    "drift_delay_median_tasks": 30,
    "spammer_tasks": 15,
    "bad_caught_share": 0.85,
    "budget_over_bad_share": 1.25,
    "precision": 0.7,
    "false_alerts_per_10k": 1.0,
}


@dataclass
class Case:
    """One workforce, its events and its truth in one shape for both families."""

    family: str
    seed: int
    events: list[tuple[str, s.Message]]
    skill: dict[str, float]  # worker -> true skill
    archetype: dict[str, str]
    drift_at: dict[str, int]  # drifting worker -> index of its first drifted task
    bad: dict[str, bool]  # annotation -> truly bad
    gold: dict[str, bool]  # annotation -> on a gold item
    task: dict[str, tuple[str, int]]  # annotation -> (worker, index in the worker's sequence)
    metric_bad: dict[str, bool] = field(default_factory=dict)  # truly bad in goldstream's own metric
    metric_skill: dict[str, float] = field(default_factory=dict)


# Records per replay batch. One: every decision sees the scores before it, as a worker that keeps
# up with its input does (its batches are what arrives within `batch_within_s`). Alerts and
# risks are judged per batch, so a replay in batches of 500 reports them later (in tasks) than a
# live worker would: the figures would measure the batch size, not the rules.
BATCH = 1


def own_workforce(seed: int, items: int, workers: int = 20) -> Any:
    """goldstream simulate's model: mostly good workers, a few poor, a few who drift to poor."""
    from goldstream.simulator import Drift, ProjectSpec, ReviewSpec, WorkerSpec, WorkforceSpec

    rng = np.random.default_rng(seed)
    good = {"miss_rate": (0.01, 0.08), "fp_rate": (0.01, 0.08), "loc_noise": (1.0, 4.0),
            "label_confusion": (0.0, 0.04), "class_error": (0.01, 0.08)}  # fmt: skip
    poor = {"miss_rate": (0.15, 0.35), "fp_rate": (0.1, 0.3), "loc_noise": (5.0, 12.0),
            "label_confusion": (0.05, 0.2), "class_error": (0.15, 0.4)}  # fmt: skip

    def draw(ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in ranges.items()}

    n_poor = n_drift = max(1, workers // 5)
    specs = []
    for i in range(workers):
        speed = float(rng.uniform(15, 45))
        if i < n_poor:
            specs.append(WorkerSpec(worker_id=f"p{i:02d}", speed_s=speed, **draw(poor)))
        elif i < n_poor + n_drift:
            tasks = items * 3 / workers
            at = int(rng.integers(int(tasks * 0.25), int(tasks * 0.5) + 1))
            specs.append(
                WorkerSpec(worker_id=f"d{i:02d}", speed_s=speed, **draw(good), drift=Drift(at=at, **draw(poor)))
            )
        else:
            specs.append(WorkerSpec(worker_id=f"g{i:02d}", speed_s=speed, **draw(good)))
    project = ProjectSpec(
        project_id="qc",
        items=items,
        labels=["car", "bus", "person", "bike"],
        shapes={"bbox": 0.8, "polygon": 0.2},
        objects_per_item=(2, 8),
        classifications={"scene": ["street", "highway", "parking", "tunnel"]},
        gold_rate=0.1,
        overlap=3,
        review=ReviewSpec(rate=0.05, promote_rate=0.5),
        criteria=OWN_CRITERIA,
    )
    return WorkforceSpec(seed=seed, projects=[project], workers=specs)


def own_case(seed: int, items: int) -> Case:
    from goldstream.simulator import simulate

    sim = simulate(own_workforce(seed, items), seed)
    t = sim.truth
    anns = [m for topic, m in sim.events if topic == "annotations"]
    return Case(
        family="own",
        seed=seed,
        events=sim.events,
        skill={w: v["true_mean_score"] for w, v in t["workers"].items()},
        archetype={w: {"p": "poor", "d": "drifter", "g": "good"}[w[0]] for w in t["workers"]},
        drift_at={w: v["drift"]["at"] for w, v in t["workers"].items() if v["drift"]},
        bad={e: v["bad"] for e, v in t["annotations"].items()},
        gold={e: v["gold"] for e, v in t["annotations"].items()},
        task={a.event_id: (a.worker_id, int(a.event_id.rsplit("-", 1)[1])) for a in anns},
    )


MATCHED = {"object_metric": "f1", "weights": {"classifications": 0.0}}  # what that truth calls quality


def independent_case(seed: int, items: int, matched: bool = False) -> Case:
    """`matched`: the criteria say what the truth means by quality (object F1 at IoU 0.5, the
    scene class aside) instead of the defaults (panoptic quality and the scene class, equally)."""
    from benchmarks.workforces import generate

    wf = generate(seed, items=items)
    if matched:
        wf.events = [
            (t, s.validate(s.ProjectCriteria, {**m.model_dump(mode="json", exclude={"event_id"}), **MATCHED}))
            if t == "projects"
            else (t, m)
            for t, m in wf.events
        ]
    t = wf.truth
    case = Case(
        family="independent-matched" if matched else "independent",
        seed=seed,
        events=wf.events,
        skill={w: v["skill"] for w, v in t["workers"].items() if v["skill"] is not None},
        archetype={w: v["archetype"] for w, v in t["workers"].items()},
        drift_at={w: v["drift_at"] for w, v in t["workers"].items() if v["drift_at"] is not None},
        bad={e: v["bad"] for e, v in t["annotations"].items()},
        gold={e: v["gold"] for e, v in t["annotations"].items()},
        task={e: (v["worker"], v["task"]) for e, v in t["annotations"].items()},
    )
    # the truth in goldstream's own metric: each annotation's item score against the true content
    crit = next(m for topic, m in wf.events if topic == "projects")
    anns = [m for topic, m in wf.events if topic == "annotations"]
    truth = {i: s.validate(s.Content, v["content"]) for i, v in t["items"].items()}
    scores = score_items([(a, truth[a.item_id]) for a in anns], crit)  # type: ignore[arg-type, attr-defined]
    per: dict[str, list[float]] = defaultdict(list)
    for a, r in zip(anns, scores, strict=True):
        value = 1.0 if r.score is None else r.score
        case.metric_bad[a.event_id] = value < crit.pass_threshold  # type: ignore[attr-defined]
        per[a.worker_id].append(value)
    case.metric_skill = {w: float(np.mean(v)) for w, v in per.items()}
    return case


# ----------------------------------------------------------------------------- goldstream


def with_budget(events: list[tuple[str, s.Message]], budget: float) -> list[tuple[str, s.Message]]:
    out = []
    for topic, m in events:
        if topic == "projects":
            assert isinstance(m, s.ProjectCriteria)
            esc = m.escalation.model_copy(update={"review_budget": budget})
            m = s.validate(s.ProjectCriteria, {**m.model_dump(mode="json", exclude={"event_id"}),
                                               "escalation": esc.model_dump(mode="json")})  # fmt: skip
        out.append((topic, m))
    return out


async def run_goldstream(
    events: list[tuple[str, s.Message]], redis: Redis, prefix: str
) -> tuple[ReplayResult, dict[str, Any]]:
    """Replay the events; each worker's final standing (level, sd, state) from Redis."""
    records = [Record(t, m.to_bytes(), key_of(t, m).encode(), 0, i) for i, (t, m) in enumerate(events)]
    keys = Keys(prefix)
    result = await replay(records, redis, keys, close_rounds=True, batch=BATCH)
    crit = next(m for t, m in events if t == "projects")
    assert isinstance(crit, s.ProjectCriteria)
    store = ProficiencyStore(RedisState(redis, keys))
    view = await store.view(crit.project_id, crit, fresh=True)
    workers = sorted(await store.workers(crit.project_id))
    totals = await store.totals([(crit.project_id, w) for w in workers])
    from goldstream.scoring.policy import proficiency

    return result, {w: proficiency(t, crit, level_of(view.model, t)) for w, t in zip(workers, totals, strict=True)}


# ----------------------------------------------------------------------------- figures


def spearman(estimate: dict[str, float | None], truth: dict[str, float]) -> float | None:
    ws = [w for w in truth if estimate.get(w) is not None]
    if len(ws) < 3:
        return None
    return round(float(spearmanr([estimate[w] for w in ws], [truth[w] for w in ws]).statistic), 3)


def catch(flagged: set[str], bad: set[str], pool: int) -> dict[str, float | int]:
    hit = len(flagged & bad)
    return {
        "escalated": len(flagged),
        "budget_share": round(len(flagged) / pool, 4) if pool else 0.0,
        "bad_caught_share": round(hit / len(bad), 4) if bad else 0.0,
        "precision": round(hit / len(flagged), 4) if flagged else 0.0,
    }


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Probability that a truly bad annotation has a higher risk than a fine one."""
    pos = np.array([x for x, y in zip(scores, labels, strict=True) if y])
    neg = np.array([x for x, y in zip(scores, labels, strict=True) if not y])
    if not len(pos) or not len(neg):
        return None
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return round(float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))), 3)


def evaluate(case: Case, result: ReplayResult, prof: dict[str, Any], target: float) -> dict[str, Any]:
    """goldstream's figures on one workforce."""
    anns = [m for t, m in case.events if t == "annotations"]
    when = {a.event_id: a.submitted_at for a in anns}
    by_worker: dict[str, list[s.AnnotationSubmitted]] = defaultdict(list)
    for a in anns:
        by_worker[a.worker_id].append(a)
    non_gold = [a.event_id for a in anns if not case.gold[a.event_id]]
    bad = {e for e in non_gold if case.bad[e]}
    escalations = result.outputs["escalations"]
    chosen = {
        e.annotation.event_id  # type: ignore[attr-defined]
        for e in escalations
        if e.reasons != [s.EscalationReason.AUDIT_SAMPLE]  # type: ignore[attr-defined]
    }
    audited = {e.annotation.event_id for e in escalations} - chosen  # type: ignore[attr-defined]
    pool = set(non_gold)
    alerts = [
        a
        for a in result.outputs["alerts"]
        if a.scope is s.AlertScope.WORKER and a.state == "firing"  # type: ignore[attr-defined]
    ]
    stable = set(case.skill) - set(case.drift_at)
    stable_items = sum(1 for a in anns if a.worker_id in stable)
    false = [a for a in alerts if a.scope_id in stable and case.skill[a.scope_id] >= target]  # type: ignore[attr-defined]

    def tasks_until(worker: str, moment: Any, start: int = 0) -> int:
        return sum(1 for a in by_worker[worker][start:] if a.submitted_at <= moment)

    drift: dict[str, int | None] = {}
    for w, at in sorted(case.drift_at.items()):
        start = when[by_worker[w][at].event_id] if at < len(by_worker[w]) else None
        fired = sorted(a.raised_at for a in alerts if a.scope_id == w and start and a.raised_at >= start)  # type: ignore[attr-defined]
        drift[w] = tasks_until(w, fired[0], at) if fired else None
    spam = {}
    for w in (w for w, kind in case.archetype.items() if kind == "spammer"):
        fired = sorted(a.raised_at for a in alerts if a.scope_id == w)  # type: ignore[attr-defined]
        spam[w] = tasks_until(w, fired[0]) if fired else None
    consensus = [r for r in result.outputs["scores"] if r.kind is s.ScoreKind.CONSENSUS and r.risk is not None]  # type: ignore[attr-defined]
    detected = [v for v in drift.values() if v is not None]
    levels = {w: p.estimate for w, p in prof.items()}
    out = {
        "spearman_level": spearman(levels, case.skill),
        "spearman_mean_score": spearman({w: p.mean_score for w, p in prof.items()}, case.skill),
        "drift_detected": f"{len(detected)}/{len(drift)}",
        "drift_delay_tasks": drift,
        "drift_delay_median_tasks": float(np.median(detected)) if detected else None,
        "spammer_tasks": spam,
        "false_alerts": len(false),
        "false_alerts_per_10k": round(len(false) / stable_items * 10_000, 2) if stable_items else None,
        "false_alert_workers": sorted({a.scope_id for a in false}),  # type: ignore[attr-defined]
        **catch(chosen & pool, bad, len(pool)),
        "with_audits": catch((chosen | audited) & pool, bad, len(pool)),
        "risk_auc": auc([r.risk for r in consensus], [case.bad[r.annotation_event_id] for r in consensus]),  # type: ignore[attr-defined]
        "expected_bad_share": round(float(np.mean([r.risk for r in consensus])), 4) if consensus else None,  # type: ignore[attr-defined]
        "escalations_by_reason": dict(Counter(r.value for e in escalations for r in e.reasons)),  # type: ignore[attr-defined]
        "worker_alerts_by_metric": dict(Counter(a.metric for a in alerts)),  # type: ignore[attr-defined]
    }
    if case.metric_bad:
        metric_bad = {e for e in non_gold if case.metric_bad[e]}
        out["in_goldstream_metric"] = {
            "spearman_level": spearman(levels, case.metric_skill),
            "truly_bad_share": round(len(metric_bad) / len(pool), 4),
            **catch(chosen & pool, metric_bad, len(pool)),
        }
    return out


def evaluate_baselines(case: Case, budget: float) -> dict[str, Any]:
    from benchmarks.baselines import all_baselines

    anns = [m for t, m in case.events if t == "annotations"]
    non_gold = {a.event_id for a in anns if not case.gold[a.event_id]}
    bad = {e for e in non_gold if case.bad[e]}
    out = {}
    for b in all_baselines(case.events, budget):
        if b.skipped:
            out[b.name] = {"skipped": b.notes}
            continue
        out[b.name] = {"spearman": spearman(b.estimate, case.skill), **catch(b.flagged & non_gold, bad, len(non_gold))}  # type: ignore[arg-type]
    return out


async def run(settings: Settings, cases: Sequence[tuple[str, int]], items: int) -> dict[str, Any]:
    redis = connect(settings.redis_url, **settings.redis())
    out = []
    try:
        for family, seed in cases:
            t0 = time.perf_counter()
            if family.startswith("independent"):
                case = independent_case(seed, items, matched=family == "independent-matched")
            else:
                case = own_case(seed, int(items * 0.8))
            crit = next(m for t, m in case.events if t == "projects")
            assert isinstance(crit, s.ProjectCriteria)
            anns = [m for t, m in case.events if t == "annotations"]
            non_gold = [a for a in anns if not case.gold[a.event_id]]
            bad_share = sum(case.bad[a.event_id] for a in non_gold) / len(non_gold)
            budget = round(TARGETS["budget_over_bad_share"] * bad_share, 3)
            prefix = f"bench-qc-{family}-{seed}-{int(time.time())}"
            t1 = time.perf_counter()
            result, prof = await run_goldstream(with_budget(case.events, budget), redis, prefix)
            took = time.perf_counter() - t1
            target = crit.targets.item_score or 0.75
            figures = {
                "family": family,
                "seed": seed,
                "workers": len(case.skill),
                "annotations": len(anns),
                "non_gold_annotations": len(non_gold),
                "truly_bad_share": round(bad_share, 4),
                "review_budget": budget,
                "replay_s": round(took, 1),
                "goldstream": evaluate(case, result, prof, target),
                "baselines": evaluate_baselines(case, budget) if BASELINES else {},
            }
            out.append(figures)
            g = figures["goldstream"]
            print(
                f"  {family} seed {seed}: {len(anns)} annotations, bad {bad_share:.0%}, budget {budget:.0%}, "
                f"replay {took:.0f} s (all {time.perf_counter() - t0:.0f} s); Spearman {g['spearman_level']}; "
                f"caught {g['bad_caught_share']:.0%} at {g['budget_share']:.0%}, precision {g['precision']:.0%}; "
                f"drift {g['drift_detected']} median {g['drift_delay_median_tasks']} tasks; spam {g['spammer_tasks']}; "
                f"false/10k {g['false_alerts_per_10k']}",
                flush=True,
            )
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.delete(key)
    finally:
        await redis.aclose()
    return {"targets": TARGETS, "items_per_workforce": items, "workforces": out, "summary": summarise(out)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family: means over seeds of the headline figures, and how many seeds meet each target."""
    out: dict[str, Any] = {}
    for family in sorted({r["family"] for r in runs}):
        rs = [r for r in runs if r["family"] == family]
        gs = [r["goldstream"] for r in rs]

        def mean(values: list[Any]) -> float | None:
            vals = [v for v in values if v is not None]
            return round(float(np.mean(vals)), 3) if vals else None

        spam = [v for g in gs for v in g["spammer_tasks"].values()]
        det = [g["drift_detected"].split("/") for g in gs]
        fam: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "truly_bad_share": mean([r["truly_bad_share"] for r in rs]),
            "goldstream": {
                "spearman_level": mean([g["spearman_level"] for g in gs]),
                "spearman_mean_score": mean([g["spearman_mean_score"] for g in gs]),
                "drift_detected": f"{sum(int(a) for a, _ in det)}/{sum(int(b) for _, b in det)}",
                "drift_delay_median_tasks": mean([g["drift_delay_median_tasks"] for g in gs]),
                "spammer_tasks": spam,
                "false_alerts_per_10k": mean([g["false_alerts_per_10k"] for g in gs]),
                "bad_caught_share": mean([g["bad_caught_share"] for g in gs]),
                "budget_share": mean([g["budget_share"] for g in gs]),
                "precision": mean([g["precision"] for g in gs]),
                "risk_auc": mean([g["risk_auc"] for g in gs]),
                "expected_bad_share": mean([g["expected_bad_share"] for g in gs]),
            },
            "baselines": {},
        }
        if all("in_goldstream_metric" in g for g in gs):
            fam["goldstream"]["in_goldstream_metric"] = {
                k: mean([g["in_goldstream_metric"][k] for g in gs])
                for k in ("spearman_level", "truly_bad_share", "bad_caught_share", "precision")
            }
        names = sorted({n for r in rs for n in r["baselines"]})
        for n in names:
            bs = [r["baselines"][n] for r in rs if "spearman" in r["baselines"].get(n, {})]
            if bs:
                fam["baselines"][n] = {
                    k: mean([b[k] for b in bs]) for k in ("spearman", "bad_caught_share", "budget_share", "precision")
                }
        out[family] = fam
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small workforce of each family (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "qc.json")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per family")
    ap.add_argument("--family", action="append", help="only these families (independent, independent-matched, own)")
    ap.add_argument("--no-baselines", action="store_true", help="goldstream only (faster)")
    args = ap.parse_args()
    settings = Settings.load()
    families = tuple(args.family or ("independent", "independent-matched", "own"))
    global BASELINES
    BASELINES = not args.no_baselines
    if args.quick:
        cases, items = [(f, 11 if f == "own" else 2) for f in families], 600
    else:
        cases = [(f, (11 if f == "own" else 1) + i) for f in families for i in range(args.seeds)]
        items = 1500
    print(f"QC effectiveness on {len(cases)} simulated workforce(s), Redis at {settings.redis_url}", flush=True)
    figures = asyncio.run(run(settings, cases, items))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps(figures["summary"], indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
