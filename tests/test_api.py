"""`goldstream serve`: the query API and the dashboard, against a worker on the real services (#13)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream import schemas as s
from goldstream.api import label_trend, running, top_confusions, trend
from goldstream.commands import set_criteria, worker_report
from goldstream.services import Endpoints
from tests.conftest import REPO
from tests.pipeline import Worker, messages_of, send, wait_consumed, wait_for
from tests.scenario import BAD, GOOD, annotation, criteria, gold, review

SCALE = 10**9
ARTIFACTS = Path(os.environ.get("GOLDSTREAM_TEST_ARTIFACTS", REPO / ".ops" / "test-artifacts"))


def test_a_trend_is_the_latest_windows_mean_against_the_mean_before_it_in_event_time() -> None:
    day = 86_400
    buckets = {0: (4, int(3.6 * SCALE)), day: (2, int(1.8 * SCALE)), 2 * day: (2, int(0.8 * SCALE))}
    recent, change = trend(buckets, day)
    assert recent == pytest.approx(0.4) and change == pytest.approx(0.4 - 5.4 / 6)
    assert trend({}, day) == (None, None) and trend({0: (2, SCALE)}, day) == (0.5, None)


def test_a_labels_trend_is_its_recent_f1_against_before() -> None:
    fields = {"0:tp": 8, "0:fp": 1, "0:fn": 1, "86400:tp": 1, "86400:fn": 3}
    recent, change = label_trend(fields, 86_400)
    assert recent == pytest.approx(2 / 5) and change == pytest.approx(2 / 5 - 16 / 18)


def test_top_confusions_are_the_worst_mistakes_not_the_right_answers() -> None:
    confusions = {("car", "car"): 50, ("car", "bus"): 3, ("bus", ""): 5, ("", "car"): 1}
    assert top_confusions(confusions, 2) == [{"truth": "bus", "given": None, "n": 5},
                                             {"truth": "car", "given": "bus", "n": 3}]  # fmt: skip


# ----------------------------------------------------------------------------- on the real services


@pytest.fixture(scope="module")
def scored(services: Endpoints) -> Iterator[tuple[Settings, list[s.AnnotationSubmitted]]]:
    """A worker has scored a small project: a good and a bad worker on six gold items (the bad
    one suspended: an alert fires; its annotations escalated), and an expert reviewed one."""
    run_id = os.urandom(5).hex()
    settings = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url, topic_prefix=f"api-{run_id}.",
        key_prefix=f"api-{run_id}", app_id=f"api-{run_id}", partitions=2, health_port=0,
    )  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(settings.topic_prefix), settings.partitions))
    log = Path(tempfile.mkdtemp()) / "worker.log"
    worker = Worker(settings, log).start()
    try:
        asyncio.run(set_criteria(settings, criteria("p1"), wait_s=90))
        items = [f"g{k}" for k in range(6)]
        send(settings, [gold(i) for i in items])
        wait_consumed(settings, "gold")
        bad = [annotation(10 + k, i, "w-bad", BAD) for k, i in enumerate(items)]
        good = [annotation(20 + k, i, "w-good", GOOD) for k, i in enumerate(items)]
        send(settings, bad + good)
        wait_for(lambda: len(messages_of(settings, "scores", s.ScoreRecord)) >= 12, 120, "12 scores", [worker])
        wait_for(lambda: any(a.state == "firing" for a in messages_of(settings, "alerts", s.QualityAlert)), 60,
                 "an alert", [worker])  # fmt: skip
        send(settings, [review(1, bad[0], s.Verdict.REJECT)])
        wait_consumed(settings, "reviews")
        proficiency = f"{settings.app_id}-proficiency"
        from goldstream.commands import committed_to_end

        wait_for(lambda: asyncio.run(committed_to_end(settings, proficiency, "scores")), 90, "scores counted", [worker])
        yield settings, bad
    finally:
        worker.stop()
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))


@contextlib.asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with running(settings, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield url, http


async def _get(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_the_leaderboard_and_worker_pages_show_what_redis_holds(scored: tuple[Settings, list]) -> None:
    settings, _ = scored

    async def main() -> tuple[dict, dict, dict, dict]:
        async with api(settings) as (url, http):
            paths = ("/api/projects", "/api/projects/p1/workers", "/api/projects/p1/workers/w-bad", "/openapi.json")
            return tuple([await _get(http, url + path) for path in paths])  # type: ignore[return-value]

    projects, board, bad, doc = asyncio.run(main())
    assert "p1" in projects["projects"]
    rows = {r["worker_id"]: r for r in board["workers"]}
    assert [r["worker_id"] for r in board["workers"]] == ["w-good", "w-bad"]  # best lower bound first
    for w in ("w-good", "w-bad"):
        held = asyncio.run(worker_report(settings, "p1", w))
        row = rows[w]
        assert (row["state"], row["items"], row["known_answers"]) == (
            held["state"],
            held["items"],
            held["known_answers"],
        )
        assert row["level"] == pytest.approx(held["level"], abs=1e-4)
        assert row["time_on_task_s"] == 30.0  # every annotation took 30 s (tests/scenario.py)
    # its car misplaced (an extra car and a missed one) and its bus missed, on every item
    assert rows["w-bad"]["state"] == "suspended" and rows["w-bad"]["top_confusions"] == [
        {"truth": None, "given": "car", "n": 6}, {"truth": "bus", "given": None, "n": 6},
        {"truth": "car", "given": None, "n": 6}]  # fmt: skip
    assert rows["w-good"]["top_confusions"] == []
    assert rows["w-good"]["mean_score"] > 0.9 > 0.5 > rows["w-bad"]["mean_score"]
    assert sum(b["n"] for b in bad["history"]) == bad["items"] == 7  # six gold scores and the review
    assert "/api/projects/{project}/escalations" in doc["paths"] and "Escalation" in doc["components"]["schemas"]


def test_labels_alerts_and_the_review_queue_come_from_redis_and_the_topics(scored: tuple[Settings, list]) -> None:
    settings, bad = scored

    async def main() -> tuple[dict, dict, dict, dict, dict]:
        async with api(settings) as (url, http):
            base = f"{url}/api/projects/p1"
            # the tails follow the topics from their end less 2,000: wait until they read them through
            while not all((await _get(http, f"{url}/api/status"))["topics_caught_up"].values()):
                await asyncio.sleep(0.1)
            paths = ("/labels", "/alerts", "/escalations", "/escalations?pending=false",
                     "/escalations?order=newest&reason=gold_below_threshold&limit=2")  # fmt: skip
            return tuple([await _get(http, base + path) for path in paths])  # type: ignore[return-value]

    labels, alerts, queue, everything, newest = asyncio.run(main())
    by_label = {r["label"]: r for r in labels["labels"]}
    # worst first: cars F1 0.5 (the bad worker's misplaced: an extra and a missed), buses 0.67 (missed)
    assert [r["label"] for r in labels["labels"]] == ["car", "bus"]
    assert by_label["bus"]["recall"] == pytest.approx(0.5) and by_label["bus"]["precision"] == 1.0
    assert by_label["car"]["f1"] == pytest.approx(0.5)
    firing = {(a["scope"], a["scope_id"], a["metric"]) for a in alerts["alerts"]}
    assert ("worker", "w-bad", "qualification") in firing
    escalated = {e.annotation.event_id for e in messages_of(settings, "escalations", s.Escalation)}
    assert {e["annotation_event_id"] for e in everything["escalations"]} == escalated
    assert bad[0].event_id in escalated and bad[0].event_id not in {
        e["annotation_event_id"] for e in queue["escalations"]
    }
    assert queue["total"] == everything["total"] - 1 and everything["reviewed"] == 1  # the reviewed one left the queue
    assert [e["priority"] for e in queue["escalations"]] == sorted(
        (e["priority"] for e in queue["escalations"]), reverse=True
    )
    assert (
        len(newest["escalations"]) == 2
        and newest["escalations"][0]["created_at"] >= newest["escalations"][1]["created_at"]
    )


def test_a_bad_query_is_answered_400_saying_what_is_wrong(scored: tuple[Settings, list]) -> None:
    settings, _ = scored

    async def main() -> tuple[int, str]:
        async with api(settings) as (url, http), http.get(f"{url}/api/projects/p1/escalations?order=oldest") as r:
            return r.status, await r.text()

    status, text = asyncio.run(main())
    assert status == 400 and "order must be priority or newest" in text


# ----------------------------------------------------------------------------- in a real browser


class Chromium:
    """Debian's chromium, headless, driven over the DevTools protocol (its websocket)."""

    def __init__(self, executable: str, profile: Path) -> None:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000",
                 "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen([executable, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port_file = profile / "DevToolsActivePort"
        self._id = 0

    async def page(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        deadline = time.monotonic() + 60
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60 s"
            await asyncio.sleep(0.1)
        port = self.port_file.read_text().split()[0]
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        return await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, ws: aiohttp.ClientWebSocketResponse, method: str, **params: object) -> dict:
        self._id += 1
        await ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = json.loads((await ws.receive()).data)
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return msg["result"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def test_the_dashboard_shows_a_workers_row_and_a_firing_alert_in_headless_chromium(
    scored: tuple[Settings, list], tmp_path: Path
) -> None:
    settings, _ = scored
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "chromium is missing: ops/test installs Debian's chromium"
    browser = Chromium(executable, tmp_path / "profile")
    shown = ("tr[data-worker='w-bad'] td.suspended", "tr[data-alert='worker:w-bad:qualification']",
             "tr[data-label='bus']", "#escalations tr[data-escalation]")  # fmt: skip

    async def main() -> tuple[dict, bytes]:
        async with api(settings) as (url, http):
            ws = await browser.page(http)
            await browser.call(ws, "Page.enable")
            await browser.call(ws, "Page.navigate", url=f"{url}/?project=p1")
            check = " && ".join(f"!!document.querySelector({sel!r})" for sel in shown)
            deadline = time.monotonic() + 60
            while True:  # the page polls the API: wait until what it shows is there
                found = await browser.call(ws, "Runtime.evaluate", expression=check, returnByValue=True)
                if found["result"]["value"]:
                    break
                assert time.monotonic() < deadline, "the dashboard did not show the rows within 60 s"
                await asyncio.sleep(0.2)
            text = await browser.call(ws, "Runtime.evaluate", returnByValue=True, expression=(
                "({worker: document.querySelector(\"tr[data-worker='w-bad']\").innerText,"
                " alert: document.querySelector(\"tr[data-alert='worker:w-bad:qualification']\").innerText,"
                " status: document.getElementById('status').innerText})"))  # fmt: skip
            shot = await browser.call(ws, "Page.captureScreenshot", format="png")
            await ws.close()
            return text["result"]["value"], base64.b64decode(shot["data"])

    try:
        text, png = asyncio.run(main())
    finally:
        browser.close()
    assert text["worker"].split()[:2] == ["w-bad", "suspended"] and "updated" in text["status"]
    assert text["alert"].split()[:4] == ["worker", "w-bad", "qualification", "suspended"]
    assert png.startswith(b"\x89PNG")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dashboard.png").write_bytes(png)  # kept: what the page looked like
