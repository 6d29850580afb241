"""The workforce simulator: deterministic, valid events, and a truth that agrees with scoring."""

from __future__ import annotations

from goldstream.scoring import score_item

from goldstream import schemas as s
from goldstream.simulator import Drift, ProjectSpec, WorkerSpec, WorkforceSpec, sample_spec, simulate


def _spec() -> WorkforceSpec:
    return WorkforceSpec(
        seed=3,
        projects=[
            ProjectSpec(
                project_id="p",
                items=60,
                shapes={"bbox": 0.6, "polygon": 0.2, "keypoints": 0.2},
                classifications={"time": ["day", "night"]},
                gold_rate=0.2,
                overlap=2,
            )
        ],
        workers=[
            WorkerSpec(
                worker_id="good", miss_rate=0.0, fp_rate=0.0, loc_noise=0.5, label_confusion=0.0, class_error=0.0
            ),
            WorkerSpec(worker_id="bad", miss_rate=0.5, fp_rate=0.5, loc_noise=15.0, label_confusion=0.3),
            WorkerSpec(
                worker_id="drifter",
                miss_rate=0.0,
                fp_rate=0.0,
                loc_noise=0.5,
                label_confusion=0.0,
                drift=Drift(at=20, miss_rate=0.6, fp_rate=0.4, loc_noise=20.0),
            ),
        ],
    )


def test_a_seed_gives_the_same_events_and_another_seed_others() -> None:
    a, b, c = simulate(_spec()), simulate(_spec()), simulate(_spec(), seed=4)
    assert [m.to_bytes() for _, m in a.events] == [m.to_bytes() for _, m in b.events]
    assert [m.to_bytes() for _, m in a.events] != [m.to_bytes() for _, m in c.events]
    assert a.truth == b.truth


def test_events_are_valid_messages_in_time_order() -> None:
    sim = simulate(_spec())
    topics = [t for t, _ in sim.events]
    assert topics[0] == "projects" and {"gold", "annotations"} <= set(topics)
    for topic, m in sim.events:
        assert type(m).from_bytes(m.to_bytes()) == m and m.topic == topic
    times = [m.submitted_at for t, m in sim.events if t == "annotations"]
    assert times == sorted(times)
    criteria = sim.events[0][1]
    gold_items = {m.item_id for t, m in sim.events if t == "gold"}
    assert len(gold_items) == 12
    for t, m in sim.events:
        if t == "annotations":
            assert s.content_errors(m.content, criteria) == []


def test_truth_ranks_workers_and_records_drift() -> None:
    sim = simulate(_spec())
    workers = sim.truth["workers"]
    assert workers["good"]["true_mean_score"] > 0.85 > workers["drifter"]["true_mean_score"]
    assert workers["bad"]["true_mean_score"] < 0.6
    track = [v for _, v in workers["drifter"]["true_score_over_time"]]
    assert track[15] > 0.85 and track[-1] < track[15] - 0.2  # the rolling true score falls after the drift
    bad = [e for e, v in sim.truth["annotations"].items() if v["bad"]]
    assert bad and all(e.startswith(("ann-bad", "ann-drifter")) for e in bad)


def test_truth_is_the_item_score_against_the_true_objects() -> None:
    sim = simulate(_spec())
    criteria = sim.events[0][1]
    truths = {m.item_id: m.content for t, m in sim.events if t == "gold"}
    checked = 0
    for t, m in sim.events:
        if t == "annotations" and m.item_id in truths:
            assert (
                score_item(m, truths[m.item_id], criteria).score == sim.truth["annotations"][m.event_id]["true_score"]
            )
            checked += 1
    assert checked > 10


def test_reviews_approve_good_work_and_correct_bad_work() -> None:
    from goldstream.simulator import ReviewSpec

    project = _spec().projects[0].model_copy(update={"review": ReviewSpec(rate=1.0, promote_rate=1.0, delay_s=60)})
    spec = _spec().model_copy(update={"projects": [project]})
    sim = simulate(spec)
    reviews = [m for t, m in sim.events if t == "reviews"]
    assert reviews
    for r in reviews:
        bad = sim.truth["annotations"][r.annotation_event_id]["bad"]
        assert r.verdict is (s.Verdict.CORRECT if bad else s.Verdict.APPROVE)
        assert r.promote_to_gold == bad


def test_the_demo_workforce_is_there() -> None:
    spec = sample_spec()
    assert {w.worker_id for w in spec.workers} >= {"dee", "eli"} and spec.workers[4].drift is not None
