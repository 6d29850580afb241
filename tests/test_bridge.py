"""`goldstream bridge`: Label Studio deliveries become goldstream messages on Kafka (issue #12)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics

from goldstream import schemas as s
from goldstream.bridge import BadDelivery, LabelStudioProjects, label_studio_messages
from goldstream.commands import read_topic
from goldstream.label_studio import content_of, task_item_id
from goldstream.services import Endpoints
from tests.conftest import REPO

PROJECTS = LabelStudioProjects({"3": "cars"})
# this test process's token: a Label Studio project left by an earlier run still has a webhook with
# that run's token, which the bridge of this run refuses (ports get reused)
TOKEN = secrets.token_hex(16)


def delivery(action: str = "ANNOTATION_CREATED", **annotation: object) -> dict:
    """A delivery shaped as Label Studio 1.23 sends it (docs: ../shared/notes/label-studio.md)."""
    a = {
        "id": 41, "task": 17, "project": 3, "completed_by": 5, "was_cancelled": False, "ground_truth": False,
        "created_at": "2026-11-30T10:00:00.000000Z", "updated_at": "2026-11-30T10:00:12.500000Z",
        "lead_time": 12.5,
        "result": [{
            "id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 1280, "original_height": 720, "image_rotation": 0,
            "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["car"]},
        }],
    }  # fmt: skip
    a.update(annotation)
    return {"action": action, "annotation": a, "project": {"id": 3}, "task": {"id": 17}}


def test_a_submitted_annotation_becomes_an_annotation_with_the_tools_ids_and_times() -> None:
    (topic, key, msg), = label_studio_messages(delivery(), PROJECTS)[0]  # fmt: skip
    assert topic == "annotations" and key == task_item_id(17) == msg.item_id
    assert isinstance(msg, s.AnnotationSubmitted)
    assert (msg.project_id, msg.worker_id, msg.source, msg.external_id) == ("cars", "ls-user-5", "label_studio", "41")
    assert msg.submitted_at.isoformat() == "2026-11-30T10:00:12.500000+00:00"
    assert msg.started_at is not None and msg.started_at.isoformat() == "2026-11-30T10:00:00+00:00"
    assert msg.content.objects[0].shape == s.BBox(x=128, y=144, w=384, h=288)
    again, _ = label_studio_messages(delivery(), PROJECTS)
    assert again[0][2].event_id == msg.event_id  # a redelivery: the same event
    updated, _ = label_studio_messages(delivery("ANNOTATION_UPDATED", updated_at="2026-11-30T11:00:00Z"), PROJECTS)
    assert updated[0][2].event_id != msg.event_id  # an update: a resubmission
    other, _ = label_studio_messages(delivery(project=9), PROJECTS)
    assert other[0][2].project_id == "ls-9"  # unmapped projects keep Label Studio's id


def test_ground_truth_becomes_gold_and_skips_and_other_actions_publish_nothing() -> None:
    (topic, key, gold), = label_studio_messages(delivery(ground_truth=True), PROJECTS)[0]  # fmt: skip
    assert topic == "gold" and isinstance(gold, s.GoldAnswer) and gold.item_id == key == "ls-17"
    assert label_studio_messages(delivery(was_cancelled=True), PROJECTS) == ([], "a skipped task (was_cancelled)")
    assert label_studio_messages({"action": "TASKS_CREATED"}, PROJECTS)[0] == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"result": None}, "annotation.result is not a list"),
        ({"completed_by": None}, "annotation.completed_by is missing"),
        ({"updated_at": "yesterday"}, "not an ISO 8601 time"),
        ({"result": [{"id": "m", "type": "brushlabels", "value": {}}]}, "'brushlabels' is not supported"),
    ],
)
def test_a_delivery_that_cannot_be_converted_says_what_is_wrong(change: dict, says: str) -> None:
    with pytest.raises(BadDelivery, match=says):
        label_studio_messages(delivery(**change), PROJECTS)


# ----------------------------------------------------------------------------- over HTTP, on Kafka


@contextlib.contextmanager
def running_bridge(settings: Settings, tmp_path: Path, *extra: str) -> Iterator[str]:
    """`goldstream bridge` in its own process on a free port; yields its address."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    env = {**os.environ, "GOLDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "GOLDSTREAM_REDIS_URL":
           settings.redis_url, "GOLDSTREAM_KEY_PREFIX": settings.key_prefix,
           "GOLDSTREAM_TOPIC_PREFIX": settings.topic_prefix, "GOLDSTREAM_PARTITIONS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "goldstream.cli", "bridge", "--port", "0", "--token-file", str(token),
            "--label-studio-project", "3=cars", *extra]  # fmt: skip
    log_path = tmp_path / "bridge.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # ready when it says where it listens (it creates the topics first; the system picks the port)
        while not (m := re.search(r"goldstream bridge on (http://[0-9.]+:\d+)", log_path.read_text())):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the bridge did not start within 120 s"
            time.sleep(0.1)
        url = m.group(1)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
            assert r.status == 200
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def bridge(services: Endpoints, run_id: str, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url,
        topic_prefix=f"bridge-{run_id}.", key_prefix=f"bridge-{run_id}", partitions=1,
    )  # fmt: skip
    try:
        with running_bridge(settings, tmp_path) as url:
            yield url, settings
    finally:
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))


def _post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-Goldstream-Token": token} if token else {})}
    request = urllib.request.Request(f"{url}/label-studio/webhook", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_the_bridge_publishes_deliveries_refuses_strangers_and_dead_letters_what_it_cannot_convert(
    bridge: tuple[str, Settings],
) -> None:
    url, settings = bridge
    good = orjson.dumps(delivery())
    assert _post(url, good, token=None)[0] == 401
    assert _post(url, good, token="wrong")[0] == 401
    status, answer = _post(url, good)
    assert status == 200 and answer["published"][0]["topic"] == "annotations"
    assert _post(url, good)[1] == answer  # Label Studio never retries, but a proxy may: the same id
    assert _post(url, orjson.dumps(delivery(was_cancelled=True)))[1]["ignored"] == "a skipped task (was_cancelled)"
    bad = orjson.dumps(delivery(result=[{"id": "m", "type": "brushlabels", "value": {}}]))
    status, answer = _post(url, bad)
    assert status == 422 and answer["reason"] == "unsupported" and "brushlabels" in answer["error"]
    status, answer = _post(url, b"{not json")
    assert status == 400 and answer["reason"] == "undecodable"

    published = [s.AnnotationSubmitted.from_bytes(v) for _, v in asyncio.run(read_topic(settings, "annotations"))]
    assert [(a.project_id, a.item_id, a.external_id) for a in published] == [("cars", "ls-17", "41")] * 2
    assert len({a.event_id for a in published}) == 1
    letters = [s.DeadLetter.from_bytes(v) for _, v in asyncio.run(read_topic(settings, "deadletter"))]
    assert sorted(d.reason for d in letters) == ["undecodable", "unsupported"]
    assert {base64.b64decode(d.raw_b64) for d in letters} == {bad, b"{not json"}


# ----------------------------------------------------------------------------- a real Label Studio


@pytest.fixture(scope="session")
def label_studio() -> tuple[str, str]:
    """A real Label Studio (ops/label-studio: installed once, cached), as (URL, admin API token)."""
    script = REPO / "ops" / "label-studio"
    up = subprocess.run([str(script), "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stderr[-3000:]
    env = dict(line.split("=", 1) for line in subprocess.check_output([str(script), "env"], text=True).split())
    return env["LABEL_STUDIO_URL"], env["LABEL_STUDIO_TOKEN"]


def _api(base: str, token: str, method: str, path: str, body: object = None) -> object:
    request = urllib.request.Request(
        f"{base}{path}", method=method, data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        return orjson.loads(r.read() or b"null")


CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="car"/><Label value="bus"/></RectangleLabels></View>"""


def test_label_studio_delivers_a_submitted_annotation_through_the_bridge_to_kafka(
    label_studio: tuple[str, str], bridge: tuple[str, Settings]
) -> None:
    """Label Studio itself (1.23, from PyPI) with a webhook to the bridge: an annotation created
    over its API arrives on Kafka as an AnnotationSubmitted with the same boxes in pixels."""
    base, token = label_studio
    url, settings = bridge
    project = _api(base, token, "POST", "/api/projects", {"title": f"goldstream {settings.key_prefix}",
                                                         "label_config": CONFIG})  # fmt: skip
    pid = project["id"]  # type: ignore[index]
    _api(base, token, "POST", "/api/webhooks/", {
        "project": pid, "url": f"{url}/label-studio/webhook", "send_payload": True, "send_for_all_actions": True,
        "headers": {"X-Goldstream-Token": TOKEN},
    })  # fmt: skip
    _api(base, token, "POST", f"/api/projects/{pid}/import", [{"image": "https://example.com/street.jpg"}])
    tasks = _api(base, token, "GET", f"/api/projects/{pid}/tasks")
    task = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]  # type: ignore[index]

    def box(rid: str, x: float, rotation: float, label: str) -> dict:
        return {
            "id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 1280, "original_height": 720, "image_rotation": 0,
            "value": {"x": x, "y": 20, "width": 30, "height": 40, "rotation": rotation, "rectanglelabels": [label]},
        }  # fmt: skip

    result = [box("r1", 10, 0, "car"), box("r2", 50, 30, "bus")]
    try:
        _api(base, token, "POST", f"/api/tasks/{task}/annotations", {"result": result, "lead_time": 9.5})
        deadline = time.monotonic() + 60
        while not (got := asyncio.run(read_topic(settings, "annotations", until_idle_s=0.5))):
            assert time.monotonic() < deadline, "no annotation reached Kafka within 60 s"
    finally:
        _api(base, token, "DELETE", f"/api/projects/{pid}")
    (a,) = [s.AnnotationSubmitted.from_bytes(v) for _, v in got]
    assert (a.project_id, a.item_id, a.source) == (f"ls-{pid}", task_item_id(task), "label_studio")
    assert a.worker_id.startswith("ls-user-") and a.started_at is not None
    assert (a.submitted_at - a.started_at).total_seconds() == pytest.approx(9.5)
    shapes = {o.id: o.shape for o in a.content.objects}
    assert shapes["r1"] == s.BBox(x=128, y=144, w=384, h=288)
    assert isinstance(shapes["r2"], s.RotatedBBox) and shapes["r2"].angle == pytest.approx(30)
    assert a.content == content_of(result)  # Label Studio delivered the result as it was submitted


def test_sync_publishes_what_the_webhook_missed_with_the_ids_it_would_have_given(
    label_studio: tuple[str, str], bridge: tuple[str, Settings], tmp_path: Path
) -> None:
    """Label Studio never retries a delivery: while the bridge is unreachable, annotations are
    missed. `goldstream sync label-studio` pulls them from the project's export with the ids the
    webhook gives, so one the webhook did deliver is the same event, not a second annotation."""
    base, token = label_studio
    url, settings = bridge
    pid = _api(base, token, "POST", "/api/projects", {"title": f"sync {settings.key_prefix}", "label_config": CONFIG})[
        "id"  # type: ignore[index]
    ]
    try:
        hook = _api(base, token, "POST", "/api/webhooks/", {
            "project": pid, "url": f"{url}/label-studio/webhook", "send_payload": True,
            "send_for_all_actions": True, "headers": {"X-Goldstream-Token": TOKEN},
        })  # fmt: skip
        _api(base, token, "POST", f"/api/projects/{pid}/import", [{"image": "a.jpg"}, {"image": "b.jpg"}])
        tasks = _api(base, token, "GET", f"/api/projects/{pid}/tasks")
        first, second = sorted(t["id"] for t in (tasks["tasks"] if isinstance(tasks, dict) else tasks))  # type: ignore[index]
        rect = {
            "id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 640, "original_height": 480,
            "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["car"]},
        }  # fmt: skip
        _api(base, token, "POST", f"/api/tasks/{first}/annotations", {"result": [rect], "lead_time": 3})
        deadline = time.monotonic() + 60
        while not asyncio.run(read_topic(settings, "annotations", until_idle_s=0.5)):
            assert time.monotonic() < deadline, "the webhook's annotation did not reach Kafka within 60 s"
        _api(base, token, "DELETE", f"/api/webhooks/{hook['id']}/")  # type: ignore[index]  # the bridge is "down"
        _api(base, token, "POST", f"/api/tasks/{second}/annotations", {"result": [rect], "lead_time": 4})

        token_file = tmp_path / "ls-token"
        token_file.write_text(token)
        env = {**os.environ, "GOLDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "GOLDSTREAM_TOPIC_PREFIX": settings.topic_prefix, "GOLDSTREAM_PARTITIONS": "1"}  # fmt: skip
        argv = [sys.executable, "-m", "goldstream.cli", "sync", "label-studio", "--project", str(pid),
                "--url", base, "--token-file", str(token_file)]  # fmt: skip
        for _ in range(2):  # a second sync adds nothing new either
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert "2 annotations" in done.stdout, done.stdout
    finally:
        _api(base, token, "DELETE", f"/api/projects/{pid}")
    got = [s.AnnotationSubmitted.from_bytes(v) for _, v in asyncio.run(read_topic(settings, "annotations"))]
    assert len(got) == 5  # one by the webhook, two by each sync
    by_item = {}
    for a in got:
        by_item.setdefault(a.item_id, set()).add(a.event_id)
    assert by_item == {
        task_item_id(first): by_item[task_item_id(first)],
        task_item_id(second): by_item[task_item_id(second)],
    }
    assert all(len(ids) == 1 for ids in by_item.values()), by_item  # the webhook's id is the sync's


def test_ground_truth_marked_in_label_studio_becomes_gold_and_a_worker_scores_the_next_annotation(
    label_studio: tuple[str, str], bridge: tuple[str, Settings], tmp_path: Path
) -> None:
    """The loop a team runs: an expert's annotation starred as ground truth in Label Studio is the
    item's gold; an annotator's later annotation reaches a goldstream worker through the bridge
    and is scored against it (a ScoreRecord of kind gold on Kafka)."""
    from goldstream.commands import set_criteria
    from tests.pipeline import Worker, messages_of, wait_for

    base, token = label_studio
    url, settings = bridge
    pid = _api(base, token, "POST", "/api/projects", {"title": f"gold {settings.key_prefix}", "label_config": CONFIG})[
        "id"  # type: ignore[index]
    ]
    worker = Worker(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(set_criteria(settings, s.ProjectCriteria(project_id=f"ls-{pid}"), wait_s=90))
        _api(base, token, "POST", "/api/webhooks/", {
            "project": pid, "url": f"{url}/label-studio/webhook", "send_payload": True,
            "send_for_all_actions": True, "headers": {"X-Goldstream-Token": TOKEN},
        })  # fmt: skip
        _api(base, token, "POST", f"/api/projects/{pid}/import", [{"image": "street.jpg"}])
        tasks = _api(base, token, "GET", f"/api/projects/{pid}/tasks")
        task = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]  # type: ignore[index]

        def rect(x: float) -> dict:
            return {
                "id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": 1000, "original_height": 1000,
                "value": {"x": x, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["car"]},
            }  # fmt: skip

        _api(base, token, "POST", f"/api/tasks/{task}/annotations", {"result": [rect(10)], "ground_truth": True})
        wait_for(lambda: bool(messages_of(settings, "gold", s.GoldAnswer)), 60, "gold from Label Studio", [worker])
        _api(base, token, "POST", f"/api/tasks/{task}/annotations", {"result": [rect(11)], "lead_time": 5})
        wait_for(lambda: bool(messages_of(settings, "scores", s.ScoreRecord)), 120, "a score", [worker])
    finally:
        worker.stop()
        _api(base, token, "DELETE", f"/api/projects/{pid}")
    (gold,) = messages_of(settings, "gold", s.GoldAnswer)
    (score,) = messages_of(settings, "scores", s.ScoreRecord)
    assert gold.item_id == score.item_id == task_item_id(task)  # type: ignore[attr-defined]
    assert score.kind is s.ScoreKind.GOLD and score.reference_id == gold.event_id  # type: ignore[attr-defined]
    assert score.result.objects.matches == 1  # type: ignore[attr-defined]
    # 200 x 200 px boxes 10 px apart: IoU 38,000 / 42,000, the item's only component
    assert score.result.score == pytest.approx(38_000 / 42_000)  # type: ignore[attr-defined]


def test_an_escalation_becomes_a_label_studio_review_task_and_the_reviewers_correction_comes_back_as_gold(
    label_studio: tuple[str, str], bridge: tuple[str, Settings], tmp_path: Path
) -> None:
    """The loop the product closes: an annotation scored below its gold is escalated; `goldstream
    review label-studio` makes it a task of a review project (the same image, the annotation as a
    prediction, why it is there); the reviewer corrects it and marks it gold in Label Studio; the
    bridge brings that back as a ReviewResult, which the worker scores and promotes to gold."""
    from goldstream import review_tasks
    from goldstream.commands import set_criteria
    from goldstream.proc import worker_env
    from tests.pipeline import Worker, messages_of, wait_for

    base, token = label_studio
    url, settings = bridge
    pid = _api(base, token, "POST", "/api/projects", {"title": f"rev {settings.key_prefix}", "label_config": CONFIG})[
        "id"  # type: ignore[index]
    ]
    project = f"ls-{pid}"
    token_file = tmp_path / "ls-token"
    token_file.write_text(token)
    env = worker_env(settings)
    review_cli = [sys.executable, "-m", "goldstream.cli", "review", "label-studio", "--url", base,
                  "--token-file", str(token_file)]  # fmt: skip
    hook = {"url": f"{url}/label-studio/webhook", "send_payload": True, "send_for_all_actions": True,
            "headers": {"X-Goldstream-Token": TOKEN}}  # fmt: skip
    worker = Worker(settings, tmp_path / "worker.log").start()
    review_pid = None

    def rect(rid: str, x: float) -> dict:
        return {
            "id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 1000, "original_height": 1000,
            "value": {"x": x, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["car"]},
        }  # fmt: skip

    try:
        asyncio.run(set_criteria(settings, s.ProjectCriteria(project_id=project), wait_s=90))
        _api(base, token, "POST", "/api/webhooks/", {"project": pid, **hook})
        _api(base, token, "POST", f"/api/projects/{pid}/import", [{"image": "https://example.com/street.jpg"}])
        tasks = _api(base, token, "GET", f"/api/projects/{pid}/tasks")
        task = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]  # type: ignore[index]
        _api(base, token, "POST", f"/api/tasks/{task}/annotations", {"result": [rect("g", 10)], "ground_truth": True})
        wait_for(lambda: bool(messages_of(settings, "gold", s.GoldAnswer)), 60, "gold from Label Studio", [worker])
        _api(base, token, "POST", f"/api/tasks/{task}/annotations", {"result": [rect("w", 60)], "lead_time": 5})
        wait_for(lambda: bool(messages_of(settings, "escalations", s.Escalation)), 120, "an escalation", [worker])

        made = subprocess.run([*review_cli, "--create-from", str(pid)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert made.returncode == 0, made.stderr
        review_pid = int(re.search(r"review project (\d+)", made.stdout).group(1))  # type: ignore[union-attr]
        _api(base, token, "POST", "/api/webhooks/", {"project": review_pid, **hook})
        argv = [*review_cli, "--project", project, "--review-project", str(review_pid), "--once"]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "1 tasks" in done.stdout, done.stdout
        # a pusher that lost its offsets (a crash before the commit) finds the task and adds none
        again = asyncio.run(review_tasks.run(settings, base, token, project, review_pid, once=True, group="other"))
        assert (again["tasks"], again["already"]) == (0, 1), again

        export = f"/api/projects/{review_pid}/export?exportType=JSON&download_all_tasks=true"
        (review_task,) = _api(base, token, "GET", export)  # type: ignore[misc]
        assert review_task["data"]["image"] == "https://example.com/street.jpg"
        assert review_task["data"]["goldstream_reasons"] == "gold_below_threshold"
        shown = _api(base, token, "GET", f"/api/predictions/?task={review_task['id']}")
        assert content_of(shown[0]["result"]).objects[0].shape == s.BBox(x=600, y=100, w=200, h=200)  # type: ignore[index]

        verdict = {"type": "choices", "from_name": "goldstream_verdict", "to_name": "goldstream_summary",
                   "value": {"choices": ["correct"]}}  # fmt: skip
        promote = {"type": "choices", "from_name": "goldstream_gold", "to_name": "goldstream_summary",
                   "value": {"choices": ["promote to gold"]}}  # fmt: skip
        _api(base, token, "POST", f"/api/tasks/{review_task['id']}/annotations",
             {"result": [rect("c", 12), verdict, promote]})  # fmt: skip
        wait_for(
            lambda: any(g.source == "review" for g in messages_of(settings, "gold", s.GoldAnswer)),  # type: ignore[attr-defined]
            120, "gold promoted by the review", [worker],
        )  # fmt: skip
    finally:
        worker.stop()
        for p in (pid, review_pid):
            if p is not None:
                _api(base, token, "DELETE", f"/api/projects/{p}")
    (annotation,) = messages_of(settings, "annotations", s.AnnotationSubmitted)
    (review,) = messages_of(settings, "reviews", s.ReviewResult)
    assert review.annotation_event_id == annotation.event_id and review.verdict is s.Verdict.CORRECT  # type: ignore[attr-defined]
    assert review.corrected.objects[0].shape == s.BBox(x=120, y=100, w=200, h=200)  # type: ignore[attr-defined]
    scores = {x.kind: x for x in messages_of(settings, "scores", s.ScoreRecord)}  # type: ignore[attr-defined]
    # the worker's box against the reviewer's: 200 x 200 px, 480 px apart, no overlap
    assert scores[s.ScoreKind.REVIEW].reference_id == review.event_id and scores[s.ScoreKind.REVIEW].result.score == 0
    (promoted,) = [g for g in messages_of(settings, "gold", s.GoldAnswer) if g.source == "review"]  # type: ignore[attr-defined]
    assert promoted.content == review.corrected and promoted.review_event_id == review.event_id  # type: ignore[attr-defined]


def test_a_delivery_kafka_cannot_take_is_answered_503_naming_the_way_to_catch_up() -> None:
    """Label Studio does not retry: the answer must say the delivery was not taken, and how to
    recover it, rather than pretend (200) or fail obscurely (500)."""
    from aiohttp.test_utils import TestClient, TestServer
    from aiokafka.errors import KafkaConnectionError

    from goldstream.bridge import app

    async def down(messages: object) -> None:
        raise KafkaConnectionError("broker unreachable")

    async def main() -> tuple[int, dict]:
        async with TestClient(TestServer(app(down, PROJECTS, TOKEN))) as client:
            r = await client.post("/label-studio/webhook", data=orjson.dumps(delivery()),
                                  headers={"X-Goldstream-Token": TOKEN})  # fmt: skip
            return r.status, await r.json()

    status, answer = asyncio.run(main())
    assert status == 503 and answer["reason"] == "unavailable" and "goldstream sync label-studio" in answer["error"]


# ----------------------------------------------------------------------------- CVAT


CVAT_SECRET = "cvat-webhook-secret"


def cvat_delivery(**job: object) -> bytes:
    """An update:job delivery as CVAT sends it: the body is `json.dumps(payload)` and the
    signature is over those bytes (cvat/apps/webhooks: perform_webhook_request)."""
    import json

    from tests.test_cvat import JOB

    payload = {"job": {**JOB, **job}, "sender": {"id": 1, "username": "admin1"}, "event": "update:job",
               "before_update": {"updated_date": "2026-12-01T09:59:00.000000Z"}, "webhook_id": 7}  # fmt: skip
    return json.dumps(payload).encode()


def signature(body: bytes, secret: str = CVAT_SECRET) -> str:
    import hashlib
    import hmac

    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_the_cvat_endpoint_checks_the_signature_waits_for_completion_and_publishes_each_frame_once() -> None:
    from aiohttp import ClientError
    from aiohttp.test_utils import TestClient, TestServer

    from goldstream.bridge import Cvat, CvatJob, app
    from goldstream.cvat import CvatProjects
    from tests.test_cvat import ANNOTATIONS, JOB, LABELS, META

    sent: list = []
    cvat_up = [True]

    async def send(messages: object) -> None:
        sent.extend(messages)  # type: ignore[arg-type]

    async def fetch(job_id: int) -> CvatJob:
        if not cvat_up[0]:
            raise ClientError("connection refused")
        assert job_id == 14
        return CvatJob(dict(JOB), ANNOTATIONS, LABELS, META)

    async def main() -> list[tuple[int, dict]]:
        receiver = Cvat(CVAT_SECRET, fetch, CvatProjects({"1": "cars"}))
        async with TestClient(TestServer(app(send, PROJECTS, TOKEN, cvat=receiver))) as client:

            async def post(body: bytes, sig: str | None) -> tuple[int, dict]:
                r = await client.post("/cvat/webhook", data=body, headers={"X-Signature-256": sig} if sig else {})
                return r.status, await r.json()

            done = cvat_delivery()
            out = [
                await post(done, None), await post(done, signature(done, "wrong")),
                await post(cvat_delivery(state="in progress"), signature(cvat_delivery(state="in progress"))),
                await post(done, signature(done)), await post(done, signature(done)),  # CVAT delivered it twice
                await post(b"[1]", signature(b"[1]")),
            ]  # fmt: skip
            cvat_up[0] = False
            out.append(await post(done, signature(done)))
            return out

    unsigned, forged, in_progress, first, again, bad, cvat_down = asyncio.run(main())
    assert unsigned[0] == forged[0] == 401 and "X-Signature-256" in forged[1]["error"]
    assert in_progress[0] == 200 and "published when the annotator completes it" in in_progress[1]["ignored"]
    assert first[0] == 200 and [p["topic"] for p in first[1]["published"]] == ["annotations"] * 2
    assert [r["frame"] for r in first[1]["refused"]] == [17] and "ellipse" in first[1]["refused"][0]["error"]
    assert again[1] == first[1]  # a repeated delivery: the same events
    assert bad[0] == 422 and bad[1]["reason"] == "schema"
    assert cvat_down[0] == 503 and "could not read job 14 from CVAT" in cvat_down[1]["error"]
    annotations = [m for t, _, m in sent if t == "annotations"]
    assert {(a.project_id, a.worker_id, a.source) for a in annotations} == {("cars", "cvat-user-7", "cvat")}
    assert len({a.event_id for a in annotations}) == 2
    letters = [m for t, _, m in sent if t == "deadletter"]
    assert sorted(d.reason for d in letters) == ["schema", "unsupported", "unsupported"]  # frame 17 twice: one id
    assert len({d.event_id for d in letters if d.reason == "unsupported"}) == 1
    assert all(d.source_topic == "cvat-webhook" for d in letters)


@contextlib.contextmanager
def fake_cvat(api_token: str) -> Iterator[tuple[str, list[str]]]:
    """CVAT's REST API for job 14 as documented (jobs, annotations, data/meta, labels in two
    pages), answering only with the access token; yields its address and the paths asked."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlparse

    from tests.test_cvat import ANNOTATIONS, JOB, LABELS, META

    asked: list[str] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the stdlib's name
            url = urlparse(self.path)
            asked.append(url.path)
            query = parse_qs(url.query)
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            pages = {"1": {"count": len(LABELS), "next": f"{base}/api/labels?job_id=14&page=2", "results": LABELS[:3]},
                     "2": {"count": len(LABELS), "next": None, "results": LABELS[3:]}}  # fmt: skip
            routes = {"/api/jobs/14": JOB, "/api/jobs/14/annotations": ANNOTATIONS, "/api/jobs/14/data/meta": META,
                      "/api/labels": pages.get(query.get("page", ["1"])[0])}  # fmt: skip
            if self.headers.get("Authorization") != f"Bearer {api_token}":
                status, body = 401, {"detail": "Authentication credentials were not provided."}
            elif url.path in routes and (url.path != "/api/labels" or query.get("job_id") == ["14"]):
                status, body = 200, routes[url.path]
            else:
                status, body = 404, {"detail": "Not found."}
            raw = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_a_completed_cvat_job_is_scored_against_gold_from_a_cvat_export_and_a_repeated_delivery_counts_once(
    services: Endpoints, run_id: str, tmp_path: Path
) -> None:
    """CVAT's side of the loop on the real services: gold loaded from a CVAT XML export, a signed
    update:job of a completed job to the bridge, which reads the job from CVAT's API (here a
    local server speaking its documented formats) and publishes a frame per item; a worker scores
    them against the gold. CVAT delivering the same change again scores nothing twice."""
    from goldstream.commands import committed_to_end, publish, set_criteria, worker_report
    from goldstream.cvat import gold_from_xml
    from goldstream.proc import worker_env
    from tests.pipeline import Worker, messages_of, wait_consumed, wait_for
    from tests.test_cvat import XML

    settings = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url,
        topic_prefix=f"cvat-{run_id}.", key_prefix=f"cvat-{run_id}", app_id=f"cvat-{run_id}", partitions=1,
    )  # fmt: skip
    api_token, secret = secrets.token_hex(16), secrets.token_hex(16)
    (tmp_path / "cvat-token").write_text(api_token)
    (tmp_path / "cvat-secret").write_text(secret)
    worker = Worker(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(set_criteria(settings, s.ProjectCriteria(project_id="cars"), wait_s=90))
        golds = list(gold_from_xml(XML.encode(), "cars"))
        asyncio.run(publish(settings, [("gold", g.item_id, g.to_bytes()) for g in golds]))
        wait_consumed(settings, "gold")
        options = ["--cvat-token-file", str(tmp_path / "cvat-token"), "--cvat-secret-file",
                   str(tmp_path / "cvat-secret"), "--cvat-project", "1=cars"]  # fmt: skip
        with (
            fake_cvat(api_token) as (cvat_url, asked),
            running_bridge(settings, tmp_path, "--cvat-url", cvat_url, *options) as url,
        ):
            body = cvat_delivery()

            def post(sig: str) -> tuple[int, dict]:
                headers = {"Content-Type": "application/json", "X-Signature-256": sig}
                request = urllib.request.Request(f"{url}/cvat/webhook", data=body, method="POST", headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as r:
                        return r.status, orjson.loads(r.read())
                except urllib.error.HTTPError as exc:
                    return exc.code, orjson.loads(exc.read())

            assert post(signature(body, "not the secret"))[0] == 401
            first, again = post(signature(body, secret)), post(signature(body, secret))
            # the sync a team runs after the bridge was down: the same events again
            argv = [sys.executable, "-m", "goldstream.cli", "sync", "cvat", "--job", "14", "--url", cvat_url,
                    "--token-file", str(tmp_path / "cvat-token"), "--cvat-project", "1=cars"]  # fmt: skip
            synced = subprocess.run(argv, cwd=REPO, env=worker_env(settings), capture_output=True, text=True,
                                    timeout=120)  # fmt: skip
            assert synced.returncode == 0 and "2 annotations, 1 refused" in synced.stdout, synced.stderr
        assert first[0] == again[0] == 200 and first[1] == again[1], (first, again)
        assert "/api/jobs/14/annotations" in asked and asked.count("/api/labels") == 6  # two pages, three times
        wait_for(lambda: len(messages_of(settings, "annotations", s.AnnotationSubmitted)) == 6, 60, "6 annotations")
        wait_consumed(settings, "annotations")
        wait_for(lambda: len(messages_of(settings, "scores", s.ScoreRecord)) >= 2, 120, "2 scores", [worker])
        proficiency = f"{settings.app_id}-proficiency"  # the step that counts scores into Redis
        wait_for(lambda: asyncio.run(committed_to_end(settings, proficiency, "scores")), 90, "scores counted", [worker])
        report = asyncio.run(worker_report(settings, "cars", "cvat-user-7"))
        scores = messages_of(settings, "scores", s.ScoreRecord)
        published = messages_of(settings, "annotations", s.AnnotationSubmitted)
    finally:
        worker.stop()
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))
    assert {x.item_id for x in scores} == {"frames/street_01.jpg", "frames/street_02.jpg"}  # type: ignore[attr-defined]
    assert len({x.event_id for x in scores}) == 2 and all(x.kind is s.ScoreKind.GOLD for x in scores)  # type: ignore[attr-defined]
    # frame 15 is the gold itself; frame 16 empty on both sides
    assert {x.item_id: x.result.score for x in scores}["frames/street_01.jpg"] == 1.0  # type: ignore[attr-defined]
    assert len({a.event_id for a in published}) == 2  # two deliveries and a sync: one event per frame
    assert (report["items"], report["known_answers"]) == (2, 2), report  # counted once


def test_the_bridge_lays_out_keypoints_in_the_projects_own_keypoint_schema() -> None:
    """Keypoints need the project's schema (the order of its points); the bridge reads the
    project's criteria, so a hand is placed in the project's hand schema, not refused."""
    from aiohttp.test_utils import TestClient, TestServer

    from goldstream.bridge import app

    hand = s.KeypointSchema(names=["wrist", "thumb", "index"], sigmas=[0.05] * 3)
    criteria = s.ProjectCriteria(project_id="cars", keypoint_schemas={"hand": hand},
                                 labels=[s.LabelSpec(name="hand", keypoint_schema="hand")])  # fmt: skip
    sent: list = []

    async def send(messages: object) -> None:
        sent.extend(messages)  # type: ignore[arg-type]

    async def criteria_of(project_id: str) -> s.ProjectCriteria | None:
        return criteria if project_id == "cars" else None

    def point(rid: str, name: str, x: float) -> dict:
        return {"id": rid, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
                "original_width": 1000, "original_height": 1000,
                "value": {"x": x, "y": 50, "width": 0.5, "keypointlabels": [name]}}  # fmt: skip

    result = [point("k1", "thumb", 10), point("k2", "index", 20),
              {"type": "relation", "from_id": "k1", "to_id": "k2", "direction": "right"}]  # fmt: skip

    async def main() -> list[int]:
        async with TestClient(TestServer(app(send, PROJECTS, TOKEN, criteria_of=criteria_of))) as client:
            statuses = []
            for project in (3, 9):  # 3 is "cars"; 9 ("ls-9") has no criteria: the defaults have no hand
                body = orjson.dumps(delivery(result=result, project=project))
                r = await client.post("/label-studio/webhook", data=body, headers={"X-Goldstream-Token": TOKEN})
                statuses.append(r.status)
            return statuses

    assert asyncio.run(main()) == [200, 422]
    (annotation,) = [m for t, _, m in sent if t == "annotations"]
    (obj,) = annotation.content.objects
    assert obj.label == "hand" and obj.shape.schema_name == "hand"
    assert obj.shape.points == [(0.0, 0.0, 0), (100.0, 500.0, 2), (200.0, 500.0, 2)]
