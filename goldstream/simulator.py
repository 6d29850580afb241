"""A labeling workforce with known truth: `goldstream simulate`.

Projects have items with true objects (boxes, polygons, keypoint sets) and item classifications;
a share of the items are gold honeypots, the rest are annotated by `overlap` workers each. Every
worker has a miss rate, a false-positive rate, localisation and keypoint noise, label and class
confusion, a speed, and optionally a drift (from its k-th task on, its skill changes). Reviewers
see the truth. The same spec and seed always give the same events, so benchmarks can score
goldstream's proficiency and escalations against what the simulator knows to be true.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from pydantic import Field

from goldstream import schemas as s
from goldstream.schemas.base import Id, Model
from goldstream.scoring import score_items

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


class Skill(Model):
    """How a worker annotates. Rates are per object; noise in pixels."""

    miss_rate: float = Field(0.05, ge=0, le=1)
    fp_rate: float = Field(0.05, ge=0, le=5, description="extra objects per true object")
    loc_noise: float = Field(2.0, ge=0)
    keypoint_noise: float = Field(2.0, ge=0)
    label_confusion: float = Field(0.02, ge=0, le=1)
    class_error: float = Field(0.05, ge=0, le=1)


class Drift(Skill):
    at: int = Field(ge=0, description="from this task of the worker on (0-based), the skill below applies")


class WorkerSpec(Skill):
    worker_id: Id
    speed_s: float = Field(30.0, gt=0, description="mean seconds on a task")
    drift: Drift | None = None


class ReviewSpec(Model):
    rate: float = Field(0.05, ge=0, le=1, description="share of annotations an expert reviews")
    promote_rate: float = Field(0.5, ge=0, le=1, description="share of corrections promoted to gold")
    delay_s: float = Field(600.0, ge=0)


class ProjectSpec(Model):
    project_id: Id
    items: int = Field(200, ge=1)
    labels: list[str] = Field(default_factory=lambda: ["car", "bus", "person"])
    shapes: dict[str, float] = Field(default_factory=lambda: {"bbox": 1.0}, description="bbox / polygon / keypoints")
    objects_per_item: tuple[int, int] = (1, 6)
    classifications: dict[str, list[str]] = Field(default_factory=dict)
    image: tuple[int, int] = (1280, 720)
    gold_rate: float = Field(0.1, ge=0, le=1)
    overlap: int = Field(3, ge=1)
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    criteria: dict[str, Any] = Field(default_factory=dict, description="ProjectCriteria fields for the project")


class WorkforceSpec(Model):
    projects: list[ProjectSpec]
    workers: list[WorkerSpec]
    seed: int = 0


@dataclass
class Simulation:
    """Events in time order, and the truth behind them."""

    events: list[tuple[str, s.Message]] = field(default_factory=list)  # (topic, message)
    truth: dict[str, Any] = field(default_factory=dict)


def _criteria(p: ProjectSpec) -> s.ProjectCriteria:
    data = {"project_id": p.project_id, **p.criteria}
    data.setdefault("labels", [{"name": label} for label in p.labels])
    data.setdefault("classifications", {k: {"labels": v} for k, v in p.classifications.items()})
    data.setdefault("consensus", {"overlap": min(max(p.overlap, 2), 100)})
    return s.validate(s.ProjectCriteria, data)


def _true_objects(rng: np.random.Generator, p: ProjectSpec, item: int) -> list[s.AnnotatedObject]:
    w, h = p.image
    kinds = list(p.shapes)
    weights = np.array([p.shapes[k] for k in kinds], dtype=float)
    n = int(rng.integers(p.objects_per_item[0], p.objects_per_item[1] + 1))
    out = []
    for k in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        bw, bh = float(rng.uniform(40, 200)), float(rng.uniform(40, 200))
        x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
        label = p.labels[int(rng.integers(len(p.labels)))]
        if kind == "polygon":
            m = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * math.pi, m))
            rad = rng.uniform(0.35, 0.5, m)
            cx, cy = x + bw / 2, y + bh / 2
            pts = [(cx + bw * r * math.cos(a), cy + bh * r * math.sin(a)) for a, r in zip(ang, rad, strict=True)]
            shape: s.Shape = s.Polygon(points=pts)
        elif kind == "keypoints":
            label = "person" if "person" in p.labels else label
            base = np.column_stack([rng.uniform(x, x + bw, 17), rng.uniform(y, y + bh, 17)])
            vis = rng.choice([1, 2], 17, p=[0.2, 0.8])
            shape = s.Keypoints(
                points=[(float(a), float(b), int(v)) for (a, b), v in zip(base, vis, strict=False)],
                schema="coco_person",
                area=bw * bh,
                bbox=(x, y, bw, bh),
            )
        else:
            shape = s.BBox(x=x, y=y, w=bw, h=bh)
        out.append(s.AnnotatedObject(id=f"t{item}-{k}", label=label, shape=shape))
    return out


def _annotate(rng: np.random.Generator, truth: s.Content, p: ProjectSpec, skill: Skill) -> s.Content:
    w, h = p.image
    objs = []
    for n, o in enumerate(truth.objects):
        if rng.random() < skill.miss_rate:
            continue
        label = o.label
        if rng.random() < skill.label_confusion and len(p.labels) > 1:
            label = p.labels[int(rng.choice([i for i, lb in enumerate(p.labels) if lb != o.label]))]
        sh = o.shape
        if isinstance(sh, s.BBox):
            j = rng.normal(0, skill.loc_noise, 4)
            sh = s.BBox(x=sh.x + j[0], y=sh.y + j[1], w=max(sh.w + j[2], 1.0), h=max(sh.h + j[3], 1.0))
        elif isinstance(sh, s.Polygon):
            pts = np.asarray(sh.points) + rng.normal(0, skill.loc_noise, (len(sh.points), 2))
            sh = s.Polygon(points=[tuple(map(float, q)) for q in pts])
        elif isinstance(sh, s.Keypoints):
            pts = np.asarray([(a, b) for a, b, _ in sh.points]) + rng.normal(0, skill.keypoint_noise, (17, 2))
            sh = s.Keypoints(points=[(float(a), float(b), 2) for a, b in pts], schema="coco_person")
        objs.append(s.AnnotatedObject(id=f"a{n}", label=label, shape=sh))
    for k in range(int(rng.poisson(skill.fp_rate * max(len(truth.objects), 1)))):
        bw, bh = float(rng.uniform(30, 150)), float(rng.uniform(30, 150))
        objs.append(
            s.AnnotatedObject(
                id=f"x{k}",
                label=p.labels[int(rng.integers(len(p.labels)))],
                shape=s.BBox(x=float(rng.uniform(0, w - bw)), y=float(rng.uniform(0, h - bh)), w=bw, h=bh),
            )
        )
    classes = {}
    for taxonomy, chosen in truth.classifications.items():
        options = p.classifications[taxonomy]
        if rng.random() < skill.class_error and len(options) > 1:
            classes[taxonomy] = [options[int(rng.choice([i for i, c in enumerate(options) if c not in chosen]))]]
        else:
            classes[taxonomy] = list(chosen)
    return s.Content(objects=objs, classifications=classes, image=truth.image)


def simulate(spec: WorkforceSpec, seed: int | None = None) -> Simulation:
    """Generate every event (criteria, gold, annotations, reviews) in submission-time order."""
    rng = np.random.default_rng(spec.seed if seed is None else seed)
    sim = Simulation()
    truths: dict[str, s.Content] = {}
    true_scores: dict[str, float] = {}
    tasks_of: dict[str, list[tuple[ProjectSpec, str, bool]]] = {w.worker_id: [] for w in spec.workers}
    criteria_of = {}
    for p in spec.projects:
        crit = _criteria(p)
        criteria_of[p.project_id] = crit
        sim.events.append(("projects", crit))
        ids = [f"{p.project_id}-{i:05d}" for i in range(p.items)]
        n_gold = round(p.items * p.gold_rate)
        gold_ids = set(ids[:n_gold])
        for i, item in enumerate(ids):
            classes = {t: [opts[int(rng.integers(len(opts)))]] for t, opts in p.classifications.items()}
            truths[item] = s.Content(
                objects=_true_objects(rng, p, i),
                classifications=classes,
                image=s.ImageSize(width=p.image[0], height=p.image[1]),
            )
            if item in gold_ids:
                sim.events.append(
                    (
                        "gold",
                        s.GoldAnswer(
                            event_id=f"gold-{item}",
                            project_id=p.project_id,
                            item_id=item,
                            content=truths[item],
                            created_at=T0,
                            source="curated",
                        ),
                    )
                )
        workers = [w.worker_id for w in spec.workers]
        regular = [i for i in ids if i not in gold_ids]
        for item in regular:
            for w in rng.choice(workers, size=min(p.overlap, len(workers)), replace=False):
                tasks_of[str(w)].append((p, item, False))
        if gold_ids:
            for w in workers:
                n = len([t for t in tasks_of[w] if t[0] is p])
                k = round(n * p.gold_rate / max(1e-9, 1 - p.gold_rate)) if p.gold_rate < 1 else n
                picks = rng.choice(sorted(gold_ids), size=min(max(k, 1), len(gold_ids)), replace=False)
                tasks_of[w] += [(p, str(item), True) for item in picks]
    annotations: list[s.AnnotationSubmitted] = []
    skill_track: dict[str, list[tuple[int, float]]] = {}
    for w in spec.workers:
        tasks = tasks_of[w.worker_id]
        order = rng.permutation(len(tasks))
        clock = T0 + timedelta(seconds=float(rng.uniform(0, 60)))
        for k, idx in enumerate(order):
            p, item, _ = tasks[int(idx)]
            skill: Skill = w if w.drift is None or k < w.drift.at else w.drift
            took = float(rng.lognormal(math.log(w.speed_s), 0.3))
            started, clock = clock, clock + timedelta(seconds=took)
            content = _annotate(rng, truths[item], p, skill)
            annotations.append(
                s.AnnotationSubmitted(
                    event_id=f"ann-{w.worker_id}-{k:05d}",
                    project_id=p.project_id,
                    item_id=item,
                    worker_id=w.worker_id,
                    content=content,
                    submitted_at=clock,
                    started_at=started,
                    source="simulator",
                )
            )
            clock += timedelta(seconds=float(rng.exponential(5.0)))
    annotations.sort(key=lambda a: (a.submitted_at, a.event_id))
    # the truth: every annotation scored against the true objects with its project's criteria
    for project, crit in criteria_of.items():
        mine = [a for a in annotations if a.project_id == project]
        for a, r in zip(mine, score_items([(a, truths[a.item_id]) for a in mine], crit), strict=True):
            true_scores[a.event_id] = r.score if r.score is not None else 1.0
    per_worker: dict[str, list[float]] = {}
    for a in annotations:
        per_worker.setdefault(a.worker_id, []).append(true_scores[a.event_id])
    for wid, vals in per_worker.items():
        window = 25
        skill_track[wid] = [(k, float(np.mean(vals[max(0, k - window + 1) : k + 1]))) for k in range(len(vals))]
    reviews: list[tuple[datetime, s.ReviewResult]] = []
    spec_of = {p.project_id: p for p in spec.projects}
    for a in annotations:
        p = spec_of[a.project_id]
        if rng.random() >= p.review.rate:
            continue
        good = true_scores[a.event_id] >= criteria_of[a.project_id].pass_threshold
        verdict = s.Verdict.APPROVE if good else s.Verdict.CORRECT
        at = a.submitted_at + timedelta(seconds=p.review.delay_s)
        reviews.append(
            (
                at,
                s.ReviewResult(
                    event_id=f"rev-{a.event_id}",
                    project_id=a.project_id,
                    item_id=a.item_id,
                    annotation_event_id=a.event_id,
                    worker_id=a.worker_id,
                    reviewer_id="expert-1",
                    reviewer_role="expert",
                    verdict=verdict,
                    corrected=None if good else truths[a.item_id],
                    promote_to_gold=(not good) and rng.random() < p.review.promote_rate,
                    reviewed_at=at,
                ),
            )
        )
    timeline: list[tuple[datetime, str, s.Message]] = [(a.submitted_at, "annotations", a) for a in annotations]
    timeline += [(at, "reviews", r) for at, r in reviews]
    timeline.sort(key=lambda t: (t[0], t[2].event_id))
    sim.events += [(topic, m) for _, topic, m in timeline]
    pass_of = {p: c.pass_threshold for p, c in criteria_of.items()}
    sim.truth = {
        "workers": {
            w.worker_id: {
                "skill": w.model_dump(mode="json", exclude={"worker_id", "drift", "speed_s"}),
                "drift": w.drift.model_dump(mode="json") if w.drift else None,
                "speed_s": w.speed_s,
                "true_mean_score": float(np.mean(per_worker.get(w.worker_id, [0.0]))),
                "true_score_over_time": skill_track.get(w.worker_id, []),
            }
            for w in spec.workers
        },
        "annotations": {
            a.event_id: {
                "true_score": true_scores[a.event_id],
                "bad": true_scores[a.event_id] < pass_of[a.project_id],
                "gold": a.item_id in {g.item_id for t, g in sim.events if t == "gold"},
            }
            for a in annotations
        },
    }
    return sim


def key_of(topic: str, m: s.Message) -> str:
    if isinstance(m, s.ProjectCriteria):
        return m.project_id
    return m.item_id


def sample_spec() -> WorkforceSpec:
    """The demo's workforce: a careful few, a careless one, one who drifts."""
    skilled = {"miss_rate": 0.03, "fp_rate": 0.03, "loc_noise": 2.0, "label_confusion": 0.01}
    return WorkforceSpec(
        seed=7,
        projects=[
            ProjectSpec(
                project_id="streets",
                items=300,
                labels=["car", "bus", "person", "bike"],
                shapes={"bbox": 0.8, "polygon": 0.2},
                objects_per_item=(2, 6),
                classifications={"weather": ["sun", "rain", "fog"]},
                gold_rate=0.15,
                overlap=3,
                criteria={
                    "pass_threshold": 0.7,
                    "proficiency": {"qualification": {"min_gold_items": 5}},
                    "alerts": {"min_items": 8, "window_s": 1800},
                },
            )
        ],
        workers=[
            WorkerSpec(worker_id="ada", speed_s=25, **skilled),
            WorkerSpec(worker_id="bo", speed_s=35, **skilled),
            WorkerSpec(worker_id="cy", speed_s=30, miss_rate=0.05, fp_rate=0.05, loc_noise=3.0),
            WorkerSpec(
                worker_id="dee",
                speed_s=15,
                miss_rate=0.3,
                fp_rate=0.3,
                loc_noise=9.0,
                label_confusion=0.15,
                class_error=0.3,
            ),
            WorkerSpec(
                worker_id="eli",
                speed_s=28,
                **skilled,
                drift=Drift(at=60, miss_rate=0.35, fp_rate=0.3, loc_noise=12.0, label_confusion=0.2),
            ),
            WorkerSpec(worker_id="fay", speed_s=40, miss_rate=0.1, fp_rate=0.08, loc_noise=4.0),
        ],
    )


def load_spec(path: str | None) -> WorkforceSpec:
    """A workforce spec from JSON or YAML; the demo's when no path is given."""
    if path is None:
        return sample_spec()
    from pathlib import Path

    import orjson
    import yaml

    text = Path(path).read_bytes()
    data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else orjson.loads(text)
    return s.validate(WorkforceSpec, data)


def envelopes(sim: Simulation) -> list[tuple[str, str, bytes]]:
    """(topic, key, value bytes) of every event, in order."""
    return [(topic, key_of(topic, m), m.to_bytes()) for topic, m in sim.events]
