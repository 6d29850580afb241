"""ops/dev runs the real services idempotently; docker-compose.yml agrees with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from goldstream.probe import metadata_brokers
from goldstream.services import Endpoints
from tests.conftest import OPS, REPO


def _versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "ops" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_ops_up_is_idempotent_and_status_reports_both(services: Endpoints, ops_managed: bool) -> None:
    if not ops_managed:
        pytest.skip("services were given by environment, not run by ops/dev")
    t0 = time.monotonic()
    up = subprocess.run([str(OPS), "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "kafka already up" in up.stderr and "redis already up" in up.stderr
    status = subprocess.run([str(OPS), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert f"Apache Kafka {_versions()['KAFKA_VERSION']}" in status.stdout
    assert "redis  up" in status.stdout
    assert time.monotonic() - t0 < 600  # sanity bound only: a second 'up' starts nothing


def test_broker_is_apache_kafka_from_the_pinned_jars(services: Endpoints, ops_managed: bool) -> None:
    if not ops_managed:
        pytest.skip("services were given by environment, not run by ops/dev")
    host, _, port = services.bootstrap_servers.rpartition(":")
    ((_node_id, bhost, bport),) = metadata_brokers(host, int(port))
    assert (bhost, bport) == (host, int(port))
    cache = Path(os.environ.get("GOLDSTREAM_CACHE_DIR", Path.home() / ".cache" / "goldstream"))
    version = _versions()["KAFKA_VERSION"]
    libs = cache / f"kafka-{version}" / "libs"
    assert (libs / f"kafka_2.13-{version}.jar").is_file() and (libs / ".complete").is_file()
    pid = (
        (REPO / ".ops" / "kafka" / "kafka.pid")
        if "GOLDSTREAM_OPS_DIR" not in os.environ
        else Path(os.environ["GOLDSTREAM_OPS_DIR"]) / "kafka" / "kafka.pid"
    )
    cmdline = Path(f"/proc/{pid.read_text().strip()}/cmdline").read_bytes().split(b"\0")
    assert b"kafka.Kafka" in cmdline


def test_ops_rejects_unknown_commands() -> None:
    bad = subprocess.run([str(OPS), "launch"], capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr
    bad = subprocess.run([str(OPS), "up", "postgres"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown service" in bad.stderr


def test_probe_fails_cleanly_when_nothing_listens() -> None:
    from goldstream.services import free_port

    res = subprocess.run(
        [sys.executable, "-m", "goldstream.probe", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 1 and "did not answer a Metadata request" in res.stderr


def test_docker_compose_runs_the_pinned_kafka_with_redis_and_a_worker() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"kafka", "redis", "worker", "serve"}
    assert services["kafka"]["image"] == f"apache/kafka:{_versions()['KAFKA_VERSION']}"
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, combined node
    advertised = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    worker = services["worker"]
    assert worker["environment"]["GOLDSTREAM_KAFKA_BOOTSTRAP"] == advertised["PLAINTEXT"]
    assert worker["environment"]["GOLDSTREAM_REDIS_URL"].startswith("redis://redis:")
    assert "--appendonly" in services["redis"]["command"]
    assert set(worker["depends_on"]) == {"kafka", "redis"}
    assert all(dep["condition"] == "service_healthy" for dep in worker["depends_on"].values())
    dockerfile = (REPO / worker["build"]["context"] / worker["build"]["dockerfile"]).read_text()
    assert "FROM python:3.1" in dockerfile and "pip install ." in dockerfile
    for package in ("goldstream", "schemas", "scoring", "streams"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert worker["command"][0] == "goldstream"


def test_docker_compose_restarts_whatever_exits_and_probes_the_workers_health() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert all(svc["restart"] == "unless-stopped" for svc in services.values())
    worker = services["worker"]
    port = worker["environment"]["GOLDSTREAM_HEALTH_PORT"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(worker["healthcheck"]["test"])
    assert f"{port}:{port}" in worker["ports"]
    grace = int(worker["stop_grace_period"].rstrip("s"))
    from goldstream.streams.settings import Settings

    assert grace > Settings().shutdown_timeout_s  # compose must not SIGKILL before the worker's own deadline


def test_the_observability_profile_scrapes_every_worker_and_its_dashboard_asks_for_metrics_workers_export() -> None:
    """Prometheus scrapes the workers' /metrics port; each PromQL expression of the Grafana
    dashboard names a metric a worker exports (a renamed metric would leave a panel empty)."""
    import json
    import re

    from goldstream.streams.metrics import Metrics

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    observability = {name for name, svc in services.items() if "observability" in svc.get("profiles", [])}
    assert observability == {"prometheus", "grafana", "alertmanager", "alerts-forward"}
    port = services["worker"]["environment"]["GOLDSTREAM_HEALTH_PORT"]
    prometheus = yaml.safe_load((REPO / "ops/observability/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["dns_sd_configs"][0] == {
        "names": ["worker"], "type": "A", "port": int(port), "refresh_interval": "30s"}  # fmt: skip
    for mount in (
        *services["prometheus"]["volumes"],
        *services["grafana"]["volumes"],
        *services["alertmanager"]["volumes"],
    ):
        assert (REPO / mount.split(":")[0]).exists(), mount
    datasource = yaml.safe_load(
        (REPO / "ops/observability/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((REPO / "ops/observability/grafana/dashboards/goldstream.json").read_text())
    exported = {m.name for m in Metrics(guard=type("G", (), {"retries": 0})()).registry.collect()}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and all(p["datasource"]["uid"] == uid for p in dashboard["panels"])
    for expr in exprs:
        for name in re.findall(r"goldstream_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in exported, f"{name} in {expr!r} is not exported by a worker"
    forward = services["alerts-forward"]["command"]
    assert forward[:3] == ["goldstream", "alerts", "forward"] and "http://alertmanager:9093" in forward


def test_the_secure_compose_file_grants_what_ops_secure_grants_and_names_only_real_settings() -> None:
    """docker-compose.secure.yml cannot run here (no Docker): its Redis ACL must be the one
    tests/test_security.py proves on ops/secure, and its client settings must be settings."""
    import dataclasses
    import re

    from goldstream.streams.settings import Settings

    secure = (REPO / "docker-compose.secure.yml").read_text()
    compose = yaml.safe_load(secure)
    ops = (REPO / "ops" / "secure").read_text()

    def rules(text: str) -> str:
        line = re.search(r"(resetkeys ~\S+ .*?)[\"\n]", text)
        assert line, text[:200]
        return re.sub(r"~\S+", "~PREFIX", line.group(1))

    assert rules(secure) == rules(ops)
    fields = {f.name for f in dataclasses.fields(Settings)}
    aliases = {"KAFKA_BOOTSTRAP": "kafka_bootstrap", "REDIS_URL": "redis_url"}
    client = compose["x-secure-client"]
    for name in client:
        key = name.removeprefix("GOLDSTREAM_")
        assert aliases.get(key, key.lower()) in fields, name
    assert client["GOLDSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and client["GOLDSTREAM_REDIS_URL"].startswith(
        "rediss://"
    )
    assert compose["services"]["worker"]["environment"]["GOLDSTREAM_KAFKA_BOOTSTRAP"] == "kafka:19093"
    assert (REPO / "ops" / "secure-certs").exists()


def test_the_wheel_installs_everything_under_one_goldstream_namespace(tmp_path: Path) -> None:
    """`schemas` and `scoring` are names of unrelated distributions on PyPI: installed as top-level
    packages, goldstream would shadow them (or be shadowed). The wheel holds only `goldstream/`,
    with the folders mapped below it and their data (JSON Schemas, Lua scripts) inside."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the checkout
    for part in ("goldstream", "schemas", "scoring", "streams"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        check=True,
        capture_output=True,
        cwd=source,
    )
    (wheel,) = tmp_path.glob("goldstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"goldstream"}
    for inside in ("goldstream/schemas/messages.py", "goldstream/scoring/item.py", "goldstream/streams/worker.py",
                   "goldstream/streams/settings.py", "goldstream/streams/lua/apply_once.lua",
                   "goldstream/schemas/json/AnnotationSubmitted.json", "goldstream/dashboard.html"):  # fmt: skip
        assert inside in names, inside
