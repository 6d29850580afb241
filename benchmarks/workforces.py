"""An independent simulated labeling workforce with known truth, to measure goldstream's quality
control on work its authors did not design.

goldstream's own simulator was written by the people who wrote its rules, so a benchmark on it
can only show that the rules catch the faults their authors thought of, in the shape they thought
of them. This module was written without reading that simulator, goldstream's policy or its
benchmarks: it models a box-labeling team the way such teams behave, records the truth (what every
worker is, how good every annotation really is), and leaves it to the benchmark to see how well
goldstream's verdicts follow that truth.

    python -m benchmarks.workforces      # prints per-archetype figures for seeds 1, 2, 3

`generate(seed, ...)` returns a `Workforce`: the messages in the order a team would publish them
(criteria, the gold set, then annotations and expert reviews in time order) and a `truth` dict.

Modelling choices
-----------------
Items. Road-scene images of 1280 x 720 with 1-10 boxes (mean about 3.4) labelled car, truck, bus,
person or bike, and one `scene` classification (urban, highway, residential, parking). The scene
sets the label mix (trucks on highways, people in town) and the object count. Object size follows
a pinhole camera on a ground plane: one depth scale per object (log-normal) sets its size and how
far below the horizon its bottom edge sits, so far objects are small and near the horizon. About
a quarter of the objects are COCO-small (area under 32^2 px). Each object has an occlusion /
clutter level that makes it easier to miss and harder to box, and each item a scene ambiguity
that makes the scene easier to get wrong. Gold answers are the true content (curated, exact),
published before any work starts; gold items are `round(gold_rate * items)` items at random
places in the queue, served like any other (honeypots), each to `overlap` workers.

Assignment. One shared queue in random order. A worker asking for work takes an item it has not
done whose round is not yet full (fewer than `overlap` takers): usually a random one of the first
25 such items (a queue page), and 15 % of the time a random one from the whole open queue (skipped
and re-sorted tasks), so most rounds fill within minutes but some stay open for hours. Nothing is
ever reassigned or abandoned, and every annotation is submitted.

Time. A working day starts at the worker's shift (07:00-10:00 UTC for most of the team, a fifth
in time zones 6-9 hours away, give or take half an hour a day) and lasts the worker's hours of the
day (log-normal per worker, median 3 h; varies by day), cut into sessions (log-normal, median
75 min) with 5-30 min breaks; one day in ten is a day off. 15 % of the workers are onboarded
part-way, once 10-40 % of the project's tasks are done. Time on task is a per-worker overhead
(median 12 s) plus a per-worker time per drawn object (median 9 s), times the archetype's speed,
times per-task log-normal noise (sigma 0.3), with a 2 % chance of an interruption of 1-10 minutes;
a few seconds between tasks, now and then a pause of minutes. The spammer takes about 5 s a task
but shows up for about half an hour a day. With the defaults a project runs over two working
days (about 30 h from first to last annotation).

Workers. Archetypes in the proportions good 11, sloppy 3, lazy 2, confuser 2, spammer 1,
drifter 3 (per 22, largest remainder for other team sizes), shuffled over worker ids so an id says
nothing. Each worker draws its own parameters around its archetype (a continuum, no clones):
per-edge localisation noise as a share of the object's side plus a pixel or two (which dominates
on small objects), a systematic box growth or shrinkage, the chance to miss an object (more for
small and occluded ones), the rate of spurious boxes (double-drawn or background), the chance of
a plausible label slip (car/truck, truck/bus, person/bike), the chance of a wrong scene, and speed.
  good      small noise, rare misses / extras / slips; skill spread by one latent per worker.
  sloppy    2-4 times the noise, many more misses and extras, 10-30 % faster.
  lazy      good, but skips nearly every object smaller than its own cut-off (26-40 px side);
            15-30 % faster (and fewer boxes to draw).
  confuser  good, but labels 50-80 % of cars as trucks; half of them also trucks as cars.
  spammer   random boxes (0-5) with random labels and a random scene, or nothing; very fast.
  drifter   good until a task drawn at 30-60 % of its own sequence, then sloppy (65 %) or lazy
            for the rest, with the matching speed-up. Whether a drifter drifts, and when, is part
            of its truth (`drift_at`).

Truth. Object F1 of an annotation: greedy one-to-one matching of boxes by IoU, pairs with the
same label and IoU >= 0.5 count as true positives; F1 = 2 TP / (true + given); 1.0 when both are
empty. `bad` is F1 < 0.7. A worker's `skill` is the mean F1 of all its annotations (None if it did
no task: a small project can be done before a late shift starts).

Reviews (optional). An expert ("expert-1") reviews a random `review_rate` share of the non-gold
annotations 2 minutes plus an exponential 25 minutes after submission: approve when the annotation
is fine (not bad and the scene right), otherwise correct with the true content. Nothing is
promoted to gold.

Everything derives from `seed` through separate numpy streams (items, workers, per-worker
schedule, per worker-item content), so a seed always gives the same workforce.
"""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from goldstream import schemas as s

WIDTH, HEIGHT = 1280, 720
LABELS = ("car", "truck", "bus", "person", "bike")
CAR, TRUCK, BUS, PERSON, BIKE = range(len(LABELS))
SCENES = ("urban", "highway", "residential", "parking")
SCENE_P = np.array([0.35, 0.25, 0.20, 0.20])
SCENE_OBJECTS = np.array([3.5, 3.0, 2.5, 4.5])  # mean objects per item
SCENE_LABEL_P = np.array(
    [
        [0.42, 0.08, 0.10, 0.28, 0.12],  # urban
        [0.62, 0.28, 0.07, 0.01, 0.02],  # highway
        [0.52, 0.07, 0.03, 0.24, 0.14],  # residential
        [0.70, 0.14, 0.02, 0.13, 0.01],  # parking
    ]
)
SCENE_NEIGHBOURS = ((2, 3, 1), (0,), (0, 3), (0, 2))  # what a wrong scene answer tends to be
BASE_SIZE = np.array([[110, 70], [170, 110], [230, 150], [40, 100], [60, 45]], dtype=float)  # w, h at depth 1
GROUND_DROP = 160.0  # px below the horizon of an object's bottom edge at depth 1
SLIPS = ((TRUCK,), (CAR, BUS), (TRUCK,), (BIKE,), (PERSON,))
SMALL_AREA = 32.0 * 32.0
MATCH_IOU = 0.5
BAD_F1 = 0.7
PAGE = 25
T0 = datetime(2024, 3, 4, tzinfo=UTC)  # midnight: shifts are hours after it
ARCHETYPES = (("good", 11), ("sloppy", 3), ("lazy", 2), ("confuser", 2), ("spammer", 1), ("drifter", 3))


@dataclass
class Workforce:
    """The messages of one simulated project, in publishing order, and the truth behind them."""

    events: list[tuple[str, s.Message]]
    truth: dict[str, Any]


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class _Item:
    index: int
    id: str
    gold: bool
    scene: int
    ambiguity: float
    boxes: np.ndarray  # (n, 4) x, y, w, h in pixels
    labels: np.ndarray  # (n,) label codes
    hard: np.ndarray  # (n,) occlusion / clutter in [0, 1]


def _make_items(rng: np.random.Generator, n: int, gold_rate: float, project_id: str) -> list[_Item]:
    """True content of every item: a camera over a ground plane, so small objects are far ones."""
    gold = np.zeros(n, dtype=bool)
    gold[rng.choice(n, size=min(n, round(gold_rate * n)), replace=False)] = True
    items = []
    for i in range(n):
        scene = int(rng.choice(len(SCENES), p=SCENE_P))
        k = int(min(10, 1 + rng.poisson(SCENE_OBJECTS[scene] - 1)))
        labels = rng.choice(len(LABELS), size=k, p=SCENE_LABEL_P[scene])
        depth = np.exp(rng.normal(math.log(0.6), 0.75, k)).clip(0.08, 2.2)
        wh = BASE_SIZE[labels] * depth[:, None] * np.exp(rng.normal(0.0, 0.15, (k, 2)))
        wh = np.clip(wh, 6.0, [WIDTH * 0.8, HEIGHT * 0.8])
        horizon = HEIGHT * rng.uniform(0.35, 0.5)
        bottom = np.minimum(horizon + GROUND_DROP * depth * np.exp(rng.normal(0.0, 0.1, k)), HEIGHT)
        y = np.maximum(bottom - wh[:, 1], 0.0)
        x = rng.uniform(0.0, 1.0, k) * (WIDTH - wh[:, 0])
        boxes = np.round(np.column_stack([x, y, wh]), 1)
        items.append(
            _Item(
                index=i,
                id=f"{project_id}-i{i:05d}",
                gold=bool(gold[i]),
                scene=scene,
                ambiguity=float(rng.beta(1.0, 7.0)),
                boxes=boxes,
                labels=labels,
                hard=rng.beta(1.2, 5.0, k),
            )
        )
    return items


# ----------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Style:
    """How a worker annotates while in one state (a drifter has two)."""

    loc: float  # per-edge noise, share of the object's side
    px: float  # per-edge noise, pixels
    bias: float  # systematic growth (+) or shrinkage (-) of boxes, share of the side
    miss: float  # chance to leave an object out
    small_miss: float  # added for a small object
    extra: float  # mean spurious boxes per item
    slip: float  # chance of a plausible wrong label
    scene_err: float  # chance of a wrong scene on an unambiguous item
    lazy_side: float = 0.0  # objects with sqrt(area) below this are skipped ...
    lazy_p: float = 0.0  # ... with this chance
    confuse: tuple[tuple[int, int, float], ...] = ()  # (true label, given label, chance)
    speed: float = 1.0  # multiplies time on task
    spam: bool = False


@dataclass
class _Worker:
    index: int
    id: str
    archetype: str
    style: _Style
    overhead: float  # seconds per task
    per_object: float  # seconds per drawn object
    shift: float  # when its working day starts, seconds after midnight UTC
    hours: float  # median hours of work a day
    join_after: float  # share of the project's tasks done before it joins (0: from the start)
    after: _Style | None = None
    drift_frac: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _good(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> _Style:
    """A careful worker; the latent z (0 best) spreads skill along a continuum."""
    z = rng.uniform(lo, hi)
    return _Style(
        loc=0.015 + 0.04 * z,
        px=rng.uniform(0.3, 1.2),
        bias=rng.normal(0.0, 0.015),
        miss=0.005 + 0.035 * z,
        small_miss=0.02 + 0.10 * z,
        extra=0.02 + 0.10 * z,
        slip=0.005 + 0.025 * z,
        scene_err=0.02 + 0.06 * z,
        speed=float(np.exp(rng.normal(0.0, 0.1))),
    )


def _sloppy(rng: np.random.Generator) -> _Style:
    z = rng.uniform()
    return _Style(
        loc=0.075 + 0.055 * z,
        px=rng.uniform(1.0, 2.5),
        bias=rng.normal(0.0, 0.03),
        miss=0.05 + 0.08 * z,
        small_miss=0.12 + 0.15 * z,
        extra=0.2 + 0.3 * z,
        slip=0.02 + 0.04 * z,
        scene_err=0.08 + 0.12 * z,
        speed=rng.uniform(0.7, 0.9),
    )


def _lazy(rng: np.random.Generator) -> _Style:
    return replace(
        _good(rng, 0.1, 0.6),
        lazy_side=rng.uniform(26.0, 40.0),
        lazy_p=rng.uniform(0.85, 0.98),
        speed=rng.uniform(0.7, 0.85),
    )


def _confuser(rng: np.random.Generator) -> _Style:
    confuse = [(CAR, TRUCK, rng.uniform(0.5, 0.8))]
    if rng.uniform() < 0.5:
        confuse.append((TRUCK, CAR, rng.uniform(0.5, 0.8)))
    return replace(_good(rng, 0.0, 0.6), confuse=tuple(confuse))


SPAM = _Style(loc=0, px=0, bias=0, miss=0, small_miss=0, extra=0, slip=0, scene_err=0, spam=True)


def _archetype_counts(workers: int) -> list[str]:
    """Archetypes for a team of this size: the 22-worker mix scaled, largest remainder."""
    total = sum(c for _, c in ARCHETYPES)
    exact = [(name, c * workers / total) for name, c in ARCHETYPES]
    counts = {name: math.floor(x) for name, x in exact}
    rest = sorted(exact, key=lambda nx: nx[1] - math.floor(nx[1]), reverse=True)
    for name, _ in rest[: workers - sum(counts.values())]:
        counts[name] += 1
    return [name for name, _ in ARCHETYPES for _ in range(counts[name])]


def _make_workers(rng: np.random.Generator, n: int, project_id: str) -> list[_Worker]:
    kinds = _archetype_counts(n)
    rng.shuffle(kinds)
    workers = []
    for k, kind in enumerate(kinds):
        after, frac = None, None
        if kind == "good":
            style = _good(rng)
        elif kind == "sloppy":
            style = _sloppy(rng)
        elif kind == "lazy":
            style = _lazy(rng)
        elif kind == "confuser":
            style = _confuser(rng)
        elif kind == "spammer":
            style = SPAM
        else:
            style = _good(rng, 0.0, 0.6)
            after = _sloppy(rng) if rng.uniform() < 0.65 else _lazy(rng)
            frac = float(rng.uniform(0.3, 0.6))
        spam = kind == "spammer"
        # most of the team in one time zone, a fifth six to nine hours east or west of it
        shift = 3600.0 * (
            rng.uniform(7.0, 10.0) + (rng.choice([-1.0, 1.0]) * rng.uniform(6, 9) if rng.uniform() < 0.2 else 0)
        )
        w = _Worker(
            index=k,
            id=f"{project_id}-w{k:02d}",
            archetype=kind,
            style=style,
            overhead=float(np.exp(rng.normal(math.log(5.0 if spam else 12.0), 0.3))),
            per_object=0.0 if spam else float(np.exp(rng.normal(math.log(9.0), 0.3))),
            shift=shift % 86400.0,
            hours=float(np.exp(rng.normal(math.log(0.5 if spam else 3.0), 0.3))),
            join_after=float(rng.uniform(0.1, 0.4)) if rng.uniform() < 0.15 else 0.0,
            after=after,
            drift_frac=frac,
        )
        w.params = {
            "style": _style_params(style),
            "after": _style_params(after) if after else None,
            "drift_frac": frac,
            "overhead_s": round(w.overhead, 2),
            "per_object_s": round(w.per_object, 2),
            "shift_h": round(w.shift / 3600.0, 2),
            "hours_a_day": round(w.hours, 2),
            "join_after": round(w.join_after, 3),
        }
        workers.append(w)
    return workers


def _style_params(st: _Style) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in st.__dict__.items():
        if name == "confuse":
            out[name] = [[LABELS[a], LABELS[b], round(q, 3)] for a, b, q in value]
        elif isinstance(value, float):
            out[name] = round(value, 4)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- annotating


def _annotate(rng: np.random.Generator, item: _Item, st: _Style) -> tuple[np.ndarray, np.ndarray, int]:
    """What one worker in one state draws for an item: boxes, label codes, scene code."""
    if st.spam:
        k = int(rng.integers(0, 2)) if rng.uniform() < 0.3 else int(rng.integers(1, 6))
        w, h = rng.uniform(15, 300, k), rng.uniform(15, 220, k)
        boxes = np.column_stack([rng.uniform(0, 1, k) * (WIDTH - w), rng.uniform(0, 1, k) * (HEIGHT - h), w, h])
        return np.round(boxes, 1), rng.integers(0, len(LABELS), k), int(rng.integers(0, len(SCENES)))

    n = len(item.labels)
    area = item.boxes[:, 2] * item.boxes[:, 3]
    p_miss = st.miss + st.small_miss * (area < SMALL_AREA) + 0.15 * item.hard
    if st.lazy_p:
        p_miss = np.where(np.sqrt(area) < st.lazy_side, np.maximum(p_miss, st.lazy_p), p_miss)
    keep = rng.uniform(size=n) >= p_miss
    b, true_labels, hard = item.boxes[keep], item.labels[keep], item.hard[keep]
    m = len(true_labels)

    # each edge moves by noise proportional to the side plus a few pixels; occlusion adds to it
    sx = st.loc * (1 + hard) * b[:, 2] + st.px
    sy = st.loc * (1 + hard) * b[:, 3] + st.px
    gx, gy = st.bias * b[:, 2] / 2, st.bias * b[:, 3] / 2
    x1 = b[:, 0] - gx + rng.normal(0, 1, m) * sx
    x2 = b[:, 0] + b[:, 2] + gx + rng.normal(0, 1, m) * sx
    y1 = b[:, 1] - gy + rng.normal(0, 1, m) * sy
    y2 = b[:, 1] + b[:, 3] + gy + rng.normal(0, 1, m) * sy
    x1, y1 = np.clip(x1, 0, WIDTH - 2), np.clip(y1, 0, HEIGHT - 2)
    x2, y2 = np.clip(np.maximum(x2, x1 + 2), 0, WIDTH), np.clip(np.maximum(y2, y1 + 2), 0, HEIGHT)
    boxes = np.column_stack([x1, y1, x2 - x1, y2 - y1])

    labels = true_labels.copy()
    touched = np.zeros(m, dtype=bool)
    for src, dst, q in st.confuse:
        hit = (true_labels == src) & (rng.uniform(size=m) < q)
        labels[hit], touched = dst, touched | hit
    slip = ~touched & (rng.uniform(size=m) < st.slip)
    for j in np.flatnonzero(slip):
        choices = SLIPS[int(true_labels[j])]
        labels[j] = choices[int(rng.integers(0, len(choices)))]

    extras, extra_labels = [], []
    for _ in range(int(rng.poisson(st.extra))):
        if n and rng.uniform() < 0.5:  # drawn twice, or a part drawn as a whole
            j = int(rng.integers(0, n))
            x, y, w, h = item.boxes[j]
            shift = rng.uniform(0.5, 0.9) * rng.choice([-1.0, 1.0], 2)
            x, y = x + shift[0] * w, y + shift[1] * h
            label = int(item.labels[j])
        else:  # something in the background taken for an object
            label = int(rng.choice(len(LABELS), p=SCENE_LABEL_P[item.scene]))
            w, h = BASE_SIZE[label] * float(np.exp(rng.normal(math.log(0.4), 0.6)))
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(HEIGHT * 0.3, HEIGHT - h)
        x, y = float(np.clip(x, 0, WIDTH - 2)), float(np.clip(y, 0, HEIGHT - 2))
        extras.append([x, y, max(2.0, min(w, WIDTH - x)), max(2.0, min(h, HEIGHT - y))])
        extra_labels.append(label)
    if extras:
        boxes = np.vstack([boxes, np.array(extras)])
        labels = np.concatenate([labels, np.array(extra_labels, dtype=labels.dtype)])

    order = rng.permutation(len(labels))
    scene = item.scene
    if rng.uniform() < min(0.9, st.scene_err + 0.3 * item.ambiguity):
        options = SCENE_NEIGHBOURS[scene]
        scene = options[int(rng.integers(0, len(options)))]
    return np.round(boxes[order], 1), labels[order], scene


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xywh boxes."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def object_f1(true_boxes: np.ndarray, true_labels: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> float:
    """Object F1 by greedy IoU matching (same label, IoU >= 0.5): the truth's own yardstick,
    independent of goldstream's scorer; 1.0 when both sides are empty."""
    nt, na = len(true_labels), len(labels)
    if nt == 0 and na == 0:
        return 1.0
    if nt == 0 or na == 0:
        return 0.0
    iou = np.where(true_labels[:, None] == labels[None, :], _iou(true_boxes, boxes), 0.0)
    tp = 0
    while True:
        k = int(np.argmax(iou))
        r, c = divmod(k, na)
        if iou[r, c] < MATCH_IOU:
            break
        tp += 1
        iou[r, :] = 0.0
        iou[:, c] = 0.0
    return 2 * tp / (nt + na)


# ----------------------------------------------------------------------------- scheduling


@dataclass
class _Task:
    worker: int
    task: int
    item: int
    start: float  # seconds after T0
    end: float
    drifted: bool
    boxes: np.ndarray
    labels: np.ndarray
    scene: int


def _time_on_task(rng: np.random.Generator, w: _Worker, st: _Style, drawn: int) -> float:
    if st.spam:
        return max(1.5, w.overhead * float(np.exp(rng.normal(0.0, 0.35))))
    t = (w.overhead + w.per_object * drawn) * st.speed * float(np.exp(rng.normal(0.0, 0.3)))
    if rng.uniform() < 0.02:
        t += rng.uniform(60.0, 600.0)
    return max(3.0, t)


@dataclass
class _Day:
    """Where a worker is in its working day."""

    session_start: float = 0.0
    session_end: float = -math.inf
    budget: float = 0.0  # seconds of work left today


def _begin_day(rng: np.random.Generator, w: _Worker, day: _Day, earliest: float, first: bool = False) -> float:
    """Start a working day at the worker's shift (or now, for a newcomer); returns when it starts."""
    if first:
        start = earliest
    else:
        d = math.floor((earliest - w.shift) / 86400.0) + 1 + int(rng.uniform() < 0.1)  # now and then a day off
        start = max(earliest + 3600.0, d * 86400.0 + w.shift + rng.normal(0.0, 1800.0))
    day.budget = 3600.0 * w.hours * float(np.exp(rng.normal(0.0, 0.3)))
    return _begin_session(rng, day, start)


def _begin_session(rng: np.random.Generator, day: _Day, start: float) -> float:
    length = min(60.0 * 75.0 * float(np.exp(rng.normal(0.0, 0.4))), day.budget)
    day.session_start, day.session_end = start, start + length
    return start


def _next_session(rng: np.random.Generator, w: _Worker, day: _Day, now: float) -> float:
    """After a session: a short break if today's hours are not spent, else tomorrow's shift."""
    day.budget -= now - day.session_start
    if day.budget > 600.0:
        return _begin_session(rng, day, now + 60.0 * rng.uniform(5.0, 30.0))
    return _begin_day(rng, w, day, now)


def _pick(rng: np.random.Generator, queue: list[int], done: set[int]) -> int | None:
    """The item a worker takes: mostly from the first page of the open queue, sometimes anywhere."""
    if rng.uniform() < 0.15:
        for _ in range(8):
            i = queue[int(rng.integers(0, len(queue)))]
            if i not in done:
                return i
    page = []
    for i in queue:
        if i not in done:
            page.append(i)
            if len(page) == PAGE:
                break
    return page[int(rng.integers(0, len(page)))] if page else None


def _schedule(
    seed: int,
    items: list[_Item],
    workers: list[_Worker],
    overlap: int,
    order: list[int],
    drift_at: dict[int, int],
    cache: dict[tuple[int, int, bool], tuple[np.ndarray, np.ndarray, int]],
) -> list[_Task]:
    """Run the team on the queue until every item has `overlap` annotations.

    Each worker has its own random stream (sessions, picks, times) and each worker-item pair its
    own content stream, so a rerun with other drift points changes only what drifting changes."""
    rngs = [np.random.default_rng([seed, 2, w.index]) for w in workers]
    days = [_Day() for _ in workers]
    heap = []
    for w in workers:
        if not w.join_after:
            start = max(0.0, w.shift + rngs[w.index].normal(0.0, 1800.0))
            first = _begin_day(rngs[w.index], w, days[w.index], start, True)
            heap.append((first, w.index))
    heapq.heapify(heap)
    newcomers = sorted((w.join_after, w.index) for w in workers if w.join_after)
    total = len(items) * overlap
    queue = list(order)
    taken = [0] * len(items)
    done: list[set[int]] = [set() for _ in workers]
    count = [0] * len(workers)
    tasks: list[_Task] = []

    def onboard(now: float) -> None:
        j = newcomers.pop(0)[1]
        first = _begin_day(rngs[j], workers[j], days[j], now + rngs[j].uniform(0.0, 7200.0), True)
        heapq.heappush(heap, (first, j))

    while queue:
        if not heap:  # nobody started with the project: the first newcomer does
            onboard(0.0)
        t, k = heapq.heappop(heap)
        w, rng = workers[k], rngs[k]
        while newcomers and len(tasks) >= newcomers[0][0] * total:  # onboarded part-way through
            onboard(t)
        if t >= days[k].session_end:
            heapq.heappush(heap, (_next_session(rng, w, days[k], t), k))
            continue
        i = _pick(rng, queue, done[k])
        if i is None:  # nothing this worker may take: look again in ten minutes (and staff up)
            heapq.heappush(heap, (t + 600.0, k))
            if newcomers:
                onboard(t)
            continue
        taken[i] += 1
        if taken[i] == overlap:
            queue.remove(i)
        done[k].add(i)
        drifted = w.after is not None and count[k] >= drift_at.get(k, 1 << 30)
        st = w.after if drifted and w.after is not None else w.style
        key = (k, i, drifted)
        if key not in cache:
            cache[key] = _annotate(np.random.default_rng([seed, 3, k, i, int(drifted)]), items[i], st)
        boxes, labels, scene = cache[key]
        duration = _time_on_task(rng, w, st, len(labels))
        tasks.append(_Task(k, count[k], i, t, t + duration, drifted, boxes, labels, scene))
        count[k] += 1
        pause = rng.exponential(4.0) + (rng.uniform(60.0, 600.0) if rng.uniform() < 0.03 else 0.0)
        heapq.heappush(heap, (t + duration + 1.0 + pause, k))
    return tasks


# ----------------------------------------------------------------------------- messages


def _at(seconds: float) -> datetime:
    return T0 + timedelta(milliseconds=round(seconds * 1000))


def _content(boxes: np.ndarray, labels: np.ndarray, scene: int) -> dict[str, Any]:
    return {
        "objects": [
            {
                "id": f"o{j}",
                "label": LABELS[int(label)],
                "shape": {"type": "bbox", "x": float(x), "y": float(y), "w": float(w), "h": float(h)},
            }
            for j, ((x, y, w, h), label) in enumerate(zip(boxes.tolist(), labels, strict=True))
        ],
        "classifications": {"scene": [SCENES[scene]]},
        "image": {"width": WIDTH, "height": HEIGHT},
    }


def generate(
    seed: int,
    items: int = 1500,
    workers: int = 22,
    gold_rate: float = 0.12,
    overlap: int = 3,
    review_rate: float = 0.0,
    project_id: str = "wf",
) -> Workforce:
    """A simulated project: criteria, gold, annotations (and reviews) in time order, with the truth.

    Deterministic for `seed`; see the module docstring for what is modelled and why."""
    if workers < overlap:
        raise ValueError(f"{workers} workers cannot give every item {overlap} distinct annotators")
    item_list = _make_items(np.random.default_rng([seed, 0]), items, gold_rate, project_id)
    team = _make_workers(np.random.default_rng([seed, 1]), workers, project_id)
    order = [int(i) for i in np.random.default_rng([seed, 4]).permutation(items)]

    # A drifter turns at a share of its own tasks, which depends on how much it gets done, which
    # depends on when it turns (it speeds up, and the whole schedule shifts): rerun until the turn
    # lands within 5 points of the drawn share (and in 30-60 %), usually in two or three runs.
    expected = items * overlap / workers
    drift_at = {w.index: round(w.drift_frac * expected) for w in team if w.drift_frac is not None}
    cache: dict[tuple[int, int, bool], tuple[np.ndarray, np.ndarray, int]] = {}
    for _ in range(10):
        tasks = _schedule(seed, item_list, team, overlap, order, drift_at, cache)
        done = Counter(t.worker for t in tasks)
        off = {
            k: round(team[k].drift_frac * done[k])  # type: ignore[operator]
            for k in drift_at
            if not (
                abs(drift_at[k] - team[k].drift_frac * done[k]) <= 0.05 * done[k]  # type: ignore[operator]
                and 0.3 * done[k] <= drift_at[k] <= 0.6 * done[k]
            )
        }
        if not off:
            break
        drift_at.update(off)
    tasks.sort(key=lambda t: (t.end, t.worker))

    timed: list[tuple[float, int, str, s.Message]] = []
    ann_truth: dict[str, dict[str, Any]] = {}
    review_rng = np.random.default_rng([seed, 5])
    for n, t in enumerate(tasks):
        item, w = item_list[t.item], team[t.worker]
        event_id = f"{w.id}-{t.task:05d}"
        msg = s.validate(
            s.AnnotationSubmitted,
            {
                "event_id": event_id,
                "project_id": project_id,
                "item_id": item.id,
                "worker_id": w.id,
                "content": _content(t.boxes, t.labels, t.scene),
                "started_at": _at(t.start),
                "submitted_at": _at(t.end),
                "source": "workforce-sim",
            },
        )
        timed.append((t.end, 2 * n, "annotations", msg))
        f1 = object_f1(item.boxes, item.labels, t.boxes, t.labels)
        scene_ok = t.scene == item.scene
        ann_truth[event_id] = {
            "worker": w.id,
            "item": item.id,
            "task": t.task,
            "f1": round(f1, 4),
            "bad": f1 < BAD_F1,
            "gold": item.gold,
            "scene_ok": scene_ok,
            "drifted": t.drifted,
            "time_s": round(_at(t.end).timestamp() - _at(t.start).timestamp(), 3),
        }
        if not item.gold and review_rate > 0 and review_rng.uniform() < review_rate:
            fine = f1 >= BAD_F1 and scene_ok
            at = t.end + 120.0 + review_rng.exponential(1500.0)
            review = s.validate(
                s.ReviewResult,
                {
                    "event_id": f"review-{event_id}",
                    "project_id": project_id,
                    "item_id": item.id,
                    "annotation_event_id": event_id,
                    "worker_id": w.id,
                    "reviewer_id": "expert-1",
                    "reviewer_role": "expert",
                    "verdict": "approve" if fine else "correct",
                    "corrected": None if fine else _content(item.boxes, item.labels, item.scene),
                    "reviewed_at": _at(at),
                },
            )
            timed.append((at, 2 * n + 1, "reviews", review))
    timed.sort(key=lambda e: (e[0], e[1]))

    criteria = s.validate(
        s.ProjectCriteria,
        {
            "project_id": project_id,
            "labels": [{"name": label} for label in LABELS],
            "classifications": {"scene": {"labels": list(SCENES)}},
        },
    )
    events: list[tuple[str, s.Message]] = [("projects", criteria)]
    for item in item_list:
        if item.gold:
            gold = {
                "event_id": f"gold-{item.id}",
                "project_id": project_id,
                "item_id": item.id,
                "content": _content(item.boxes, item.labels, item.scene),
                "created_at": _at(-3600.0),
            }
            events.append(("gold", s.validate(s.GoldAnswer, gold)))
    events.extend((topic, msg) for _, _, topic, msg in timed)

    worker_truth = {}
    for w in team:
        f1s = [a["f1"] for a in ann_truth.values() if a["worker"] == w.id]
        turn = drift_at.get(w.index)
        if turn is not None and turn >= len(f1s):
            turn = None
        before = [a["f1"] for a in ann_truth.values() if a["worker"] == w.id and not a["drifted"]]
        after = [a["f1"] for a in ann_truth.values() if a["worker"] == w.id and a["drifted"]]
        worker_truth[w.id] = {
            "archetype": w.archetype,
            "skill": _mean(f1s),
            "drift_at": turn,
            "skill_before": _mean(before) if turn is not None else None,
            "skill_after": _mean(after) if turn is not None else None,
            "tasks": len(f1s),
            "params": w.params,
        }
    truth = {
        "workers": worker_truth,
        "annotations": ann_truth,
        "items": {
            it.id: {
                "gold": it.gold,
                "scene": SCENES[it.scene],
                "objects": len(it.labels),
                "small": int(np.sum(it.boxes[:, 2] * it.boxes[:, 3] < SMALL_AREA)),
                "content": _content(it.boxes, it.labels, it.scene),
            }
            for it in item_list
        },
        "params": {
            "seed": seed,
            "items": items,
            "workers": workers,
            "gold_rate": gold_rate,
            "overlap": overlap,
            "review_rate": review_rate,
            "project_id": project_id,
            "image": [WIDTH, HEIGHT],
            "labels": list(LABELS),
            "scenes": list(SCENES),
            "bad_f1": BAD_F1,
            "match_iou": MATCH_IOU,
            "t0": T0.isoformat(),
        },
    }
    return Workforce(events=events, truth=truth)


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


# ----------------------------------------------------------------------------- report


def _report(seed: int) -> None:
    t0 = time.perf_counter()
    wf = generate(seed, review_rate=0.05)
    elapsed = time.perf_counter() - t0
    for _, msg in wf.events:  # every message survives its own bytes
        assert type(msg).from_bytes(msg.to_bytes()) == msg
    truth = wf.truth
    topics = Counter(topic for topic, _ in wf.events)
    anns = truth["annotations"]
    non_gold = [a for a in anns.values() if not a["gold"]]
    times = [msg.submitted_at for topic, msg in wf.events if topic == "annotations"]  # type: ignore[attr-defined]
    rounds: dict[str, list[datetime]] = {}
    for topic, msg in wf.events:
        if topic == "annotations":
            rounds.setdefault(msg.item_id, []).append(msg.submitted_at)  # type: ignore[attr-defined]
    spans = sorted((max(v) - min(v)).total_seconds() / 60 for v in rounds.values())
    items = truth["items"].values()
    small = sum(i["small"] for i in items) / sum(i["objects"] for i in items)
    span_h = (max(times) - min(times)).total_seconds() / 3600
    print(
        f"seed {seed}: {dict(topics)} in {elapsed:.2f} s; span {span_h:.1f} h; "
        f"round spread median {spans[len(spans) // 2]:.0f} min, p90 {spans[int(len(spans) * 0.9)]:.0f} min; "
        f"small objects {small:.0%}"
    )
    print(
        f"  bad among non-gold: {sum(a['bad'] for a in non_gold) / len(non_gold):.1%} "
        f"({sum(a['bad'] for a in non_gold)}/{len(non_gold)}); scene wrong {1 - _share(non_gold, 'scene_ok'):.1%}"
    )
    print(f"  {'archetype':9} {'workers':>7} {'annots':>7} {'skill mean [min, max]':>24} {'bad':>6} {'ToT med s':>9}")
    by_kind: dict[str, list[str]] = {}
    for wid, w in truth["workers"].items():
        by_kind.setdefault(w["archetype"], []).append(wid)
    for kind, _ in ARCHETYPES:
        wids = by_kind.get(kind, [])
        if not wids:
            continue
        skills = [sk for wid in wids if (sk := truth["workers"][wid]["skill"]) is not None]
        mine = [a for a in anns.values() if a["worker"] in wids]
        if not mine:
            print(f"  {kind:9} {len(wids):7d}       0")
            continue
        tot = statistics.median(a["time_s"] for a in mine)
        print(
            f"  {kind:9} {len(wids):7d} {len(mine):7d} {np.mean(skills):8.3f} [{min(skills):.3f}, {max(skills):.3f}]"
            f" {_share(mine, 'bad'):6.1%} {tot:9.1f}"
        )
    for wid in by_kind.get("drifter", []):
        w = truth["workers"][wid]
        if w["drift_at"] is None:
            print(f"    drifter {wid}: {w['tasks']} tasks, never drifted")
            continue
        print(
            f"    drifter {wid}: {w['tasks']} tasks, drift_at {w['drift_at']} "
            f"({w['drift_at'] / w['tasks']:.0%}), skill {w['skill_before']} -> {w['skill_after']}"
            f" ({'sloppy' if w['params']['after']['lazy_p'] == 0 else 'lazy'})"
        )


def _share(rows: list[dict[str, Any]], key: str) -> float:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else 0.0


if __name__ == "__main__":
    for seed in (1, 2, 3):
        _report(seed)
