"""A real Prometheus scrapes a worker and evaluates the Grafana dashboard's queries; a real
Alertmanager receives goldstream's alerts and resolves them (Debian's packages; #13)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream import schemas as s
from goldstream.commands import committed_to_end, publish, set_criteria
from goldstream.services import Endpoints
from tests.conftest import REPO
from tests.pipeline import Worker, send, wait_consumed, wait_for
from tests.scenario import BAD, GOOD, annotation, criteria, gold

OBS = REPO / "ops" / "observability"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: ops/test installs Debian's prometheus and prometheus-alertmanager"
    return path


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_the_shipped_prometheus_and_alertmanager_configs_are_valid() -> None:
    for argv in ([_tool("promtool"), "check", "config", str(OBS / "prometheus.yml")],
                 [_tool("amtool"), "check-config", str(OBS / "alertmanager.yml")]):  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(400)
def test_prometheus_scrapes_a_worker_and_every_dashboard_query_evaluates(services: Endpoints, tmp_path: Path) -> None:
    run_id = os.urandom(5).hex()
    metrics_port, prom_port = _free_port(), _free_port()
    settings = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url, topic_prefix=f"obs-{run_id}.",
        key_prefix=f"obs-{run_id}", app_id=f"obs-{run_id}", partitions=1, health_port=metrics_port,
    )  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(settings.topic_prefix), 1))
    config = tmp_path / "prometheus.yml"  # the shipped one finds workers through Docker's DNS
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs: [{job_name: goldstream-worker, static_configs: "
        f"[{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
    )
    dashboard = json.loads((OBS / "grafana" / "dashboards" / "goldstream.json").read_text())
    exprs = [t["expr"].replace("$project", ".*") for p in dashboard["panels"] for t in p["targets"]]
    worker = Worker(settings, Path(tempfile.mkdtemp()) / "worker.log").start()
    argv = [_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}"]  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

    def query(expr: str) -> dict:
        return _get(base + urllib.parse.quote(expr))

    try:
        with _process(argv, tmp_path / "prometheus.log"):
            asyncio.run(set_criteria(settings, criteria("p1"), wait_s=90))
            items = [f"g{k}" for k in range(4)]
            send(settings, [gold(i) for i in items])
            wait_consumed(settings, "gold")
            proficiency = f"{settings.app_id}-proficiency"

            def scraped(expr: str, want: float) -> bool:
                try:
                    result = query(expr)["data"]["result"]
                except OSError:
                    return False  # Prometheus still starting
                return bool(result) and float(result[0]["value"][1]) == want

            # two rounds, each scraped: the counters grow between samples, as on a live worker
            for n, (who, content) in enumerate((("w-bad", BAD), ("w-good", GOOD)), 1):
                send(settings, [annotation(10 * n + k, i, who, content) for k, i in enumerate(items)])
                wait_for(
                    lambda: asyncio.run(committed_to_end(settings, proficiency, "scores")), 120, "scores", [worker]
                )
                wait_for(lambda n=n: scraped("sum(goldstream_annotations_scored_total)", 4 * n), 120, "a scrape")
            answers = {expr: query(expr) for expr in exprs}
    finally:
        worker.stop()
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))
    for expr, answer in answers.items():
        assert answer["status"] == "success", (expr, answer)
    throughput = answers[exprs[0]]["data"]["result"]
    assert throughput and {r["metric"]["kind"] for r in throughput} == {"gold"}
    mean = next(a for e, a in answers.items() if "goldstream_item_score_sum" in e)["data"]["result"]
    assert mean and 0 < float(mean[0]["value"][1]) < 1


def test_alertmanager_receives_a_goldstream_alert_and_its_resolution(services: Endpoints, tmp_path: Path) -> None:
    from goldstream.alertmanager import forward

    run_id = os.urandom(5).hex()
    settings = Settings(kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url,
                        topic_prefix=f"amreal-{run_id}.", partitions=1)  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(settings.topic_prefix), 1))
    port = _free_port()
    argv = [_tool("prometheus-alertmanager"), f"--config.file={OBS / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]  # fmt: skip
    now = datetime.now(UTC).replace(microsecond=0)

    def alert(state: str) -> s.QualityAlert:
        return s.QualityAlert(
            event_id=f"a-{state}", project_id="p1", scope=s.AlertScope.WORKER, scope_id="w-9", metric="qualification",
            value=0.2, target=0.7, window="24h", severity="critical", state=state, raised_at=now,  # type: ignore[arg-type]
            detail="qualified -> suspended",
        )  # fmt: skip

    def active() -> list[dict]:
        try:
            return _get(f"http://127.0.0.1:{port}/api/v2/alerts?active=true&silenced=false&inhibited=false")
        except OSError:
            return []

    async def main() -> tuple[list[dict], list[dict]]:
        stop = asyncio.Event()
        task = asyncio.create_task(forward(settings, f"http://127.0.0.1:{port}", resend_s=1.0, stop=stop))

        async def until(check: object, what: str) -> None:
            for _ in range(600):
                if await asyncio.to_thread(check):  # type: ignore[arg-type]
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")

        await asyncio.to_thread(lambda: asyncio.run(publish(settings, [("alerts", "k", alert("firing").to_bytes())])))
        await until(lambda: bool(active()), "Alertmanager to hold the alert")
        firing = active()
        await asyncio.to_thread(lambda: asyncio.run(publish(settings, [("alerts", "k", alert("resolved").to_bytes())])))
        await until(lambda: not active(), "Alertmanager to resolve it")
        stop.set()
        await task
        return firing, active()

    try:
        with _process(argv, tmp_path / "alertmanager.log"):
            firing, after = asyncio.run(main())
    finally:
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))
    (held,) = firing
    assert held["labels"] == {"alertname": "goldstream_qualification", "project": "p1", "scope": "worker",
                              "scope_id": "w-9", "metric": "qualification", "severity": "critical"}  # fmt: skip
    assert held["status"]["state"] == "active" and held["annotations"]["description"] == "qualified -> suspended"
    assert after == []
