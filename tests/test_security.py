"""goldstream on a locked-down Kafka (SASL_SSL, SCRAM-SHA-512) and Redis (TLS, an ACL user) (#14).

`ops/secure up` starts both with generated certificates and random passwords (files); these
tests run a worker and the commands on them, and check that a wrong password or CA fails at once
naming the setting, that the ACL user reaches only its prefix, and that no password appears in
anything goldstream printed or logged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import pytest
from goldstream.streams.security import SecurityError, kafka_options
from goldstream.streams.settings import Settings
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from goldstream import schemas as s
from tests.conftest import REPO
from tests.pipeline import Worker, messages_of, wait_for
from tests.scenario import BAD, GOOD, annotation, criteria, gold

SECURE = REPO / "ops" / "secure"


def test_settings_show_no_password_and_insecure_combinations_are_refused_by_name(tmp_path: Path) -> None:
    settings = Settings(kafka_password="hunter2-kafka", redis_password="hunter2-redis")
    assert "hunter2" not in repr(settings) and "kafka_password=***" in repr(settings)
    assert "kafka_password=''" in repr(Settings())  # an empty one is shown empty, not masked
    with pytest.raises(SecurityError, match="GOLDSTREAM_KAFKA_USERNAME and GOLDSTREAM_KAFKA_PASSWORD"):
        kafka_options(Settings(kafka_security_protocol="SASL_SSL"))
    with pytest.raises(SecurityError, match="must be one of PLAINTEXT"):
        kafka_options(Settings(kafka_security_protocol="TLS"))
    (tmp_path / "pw").write_text("from-a-file\n")
    options = kafka_options(Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_username="u",
                                     kafka_password_file=str(tmp_path / "pw")))  # fmt: skip
    assert options["sasl_plain_password"] == "from-a-file" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    with pytest.raises(SecurityError, match="not both"):
        kafka_options(Settings(kafka_security_protocol="SASL_SSL", kafka_username="u", kafka_password="x",
                               kafka_password_file=str(tmp_path / "pw")))  # fmt: skip
    with pytest.raises(SecurityError, match="make GOLDSTREAM_REDIS_URL rediss://"):
        Settings(redis_ssl_cafile=str(tmp_path / "pw")).redis()


@pytest.fixture(scope="module")
def secure() -> dict[str, str]:
    """The GOLDSTREAM_* settings of the secured Kafka and Redis (ops/secure), and their passwords."""
    up = subprocess.run([str(SECURE), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    env = dict(line.split("=", 1) for line in subprocess.check_output([str(SECURE), "env"], text=True).split())
    env["passwords"] = "\n".join(
        Path(env[k]).read_text().strip() for k in ("GOLDSTREAM_KAFKA_PASSWORD_FILE", "GOLDSTREAM_REDIS_PASSWORD_FILE")
    )
    admin = REPO / ".ops" / "secure"
    env["passwords"] += "\n" + "\n".join((admin / f).read_text().strip() for f in ("kafka-admin.password",
                                                                                   "redis-admin.password"))  # fmt: skip
    return env


def _run(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **{k: v for k, v in env.items() if k.startswith("GOLDSTREAM_")}, **extra}
    return subprocess.run([sys.executable, "-m", "goldstream.cli", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _settings(env: dict[str, str], run_id: str) -> Settings:
    return Settings.load(
        environ={k: v for k, v in env.items() if k.startswith("GOLDSTREAM_")},
        topic_prefix=f"sec-{run_id}.", key_prefix=f"gs-sec:{run_id}", app_id=f"sec-{run_id}", partitions=2,
        health_port=0,
    )  # fmt: skip


def test_a_worker_and_the_commands_score_and_keep_proficiency_on_the_secured_services(
    secure: dict[str, str], tmp_path: Path
) -> None:
    run_id = os.urandom(4).hex()
    settings = _settings(secure, run_id)
    env = {**secure, "GOLDSTREAM_TOPIC_PREFIX": settings.topic_prefix, "GOLDSTREAM_KEY_PREFIX": settings.key_prefix,
           "GOLDSTREAM_APP_ID": settings.app_id, "GOLDSTREAM_PARTITIONS": "2"}  # fmt: skip
    outputs: list[str] = []

    def cli(*args: str) -> subprocess.CompletedProcess:
        done = _run(env, *args)
        outputs.extend([done.stdout, done.stderr])
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    (tmp_path / "criteria.json").write_bytes(criteria("p1").to_bytes())
    items = [f"g{k}" for k in range(4)]
    (tmp_path / "gold.jsonl").write_bytes(b"\n".join(gold(i).to_bytes() for i in items))
    anns = [annotation(10 + k, i, "w-bad", BAD) for k, i in enumerate(items)]
    anns += [annotation(20 + k, i, "w-good", GOOD) for k, i in enumerate(items)]
    (tmp_path / "annotations.jsonl").write_bytes(b"\n".join(a.to_bytes() for a in anns))
    log = Path(tempfile.mkdtemp()) / "worker.log"
    worker = Worker(settings, log).start()
    try:
        cli("criteria", "set", str(tmp_path / "criteria.json"), "--wait", "90")
        cli("gold", "load", str(tmp_path / "gold.jsonl"), "--project", "p1")
        wait_for(lambda: len(messages_of(settings, "gold", s.GoldAnswer)) == 4, 60, "gold on the secured Kafka")
        cli("publish", str(tmp_path / "annotations.jsonl"), "annotations")

        def counted() -> bool:
            report = orjson.loads(_run(env, "report", "--project", "p1").stdout or b"{}")
            return report.get("figures", {}).get("scored") == 8

        wait_for(counted, 120, "8 scores counted in the secured Redis", [worker])
        report = orjson.loads(cli("report", "--project", "p1").stdout)
        board = orjson.loads(cli("workers", "--project", "p1", "--json").stdout)
        cli("rebuild-proficiency", "--into", f"{settings.key_prefix}-rebuilt")
        queue, published = _serve_and_bridge(env, outputs)
    finally:
        worker.stop()
        outputs.append(log.read_text())
    assert report["workers"] == 2 and report["figures"]["items"] == 8
    assert {r["worker_id"]: r["state"] for r in board} == {"w-good": "qualified", "w-bad": "suspended"}
    assert len(messages_of(settings, "scores", s.ScoreRecord)) == 8
    escalated = {e.annotation.event_id for e in messages_of(settings, "escalations", s.Escalation)}  # type: ignore[attr-defined]
    assert escalated and {e["annotation_event_id"] for e in queue["escalations"]} == escalated  # serve's Kafka tail
    assert published["published"][0]["topic"] == "annotations"  # the bridge's producer
    everything = "\n".join(outputs)
    for password in secure["passwords"].split():
        assert password not in everything  # nothing goldstream printed or logged holds a password


def _serve_and_bridge(env: dict[str, str], outputs: list[str]) -> tuple[dict, dict]:
    """`goldstream serve` and `goldstream bridge` on the secured services: the review queue as
    serve's topic tail read it, and the bridge's answer to a Label Studio delivery."""
    import re
    import time
    import urllib.request

    full = {**os.environ, **{k: v for k, v in env.items() if k.startswith("GOLDSTREAM_")}}
    procs = {
        "serve": [sys.executable, "-m", "goldstream.cli", "serve", "--port", "0"],
        "bridge": [sys.executable, "-m", "goldstream.cli", "bridge", "--port", "0", "--no-auth"],
    }
    logs = {name: Path(tempfile.mkdtemp()) / f"{name}.log" for name in procs}
    running = {name: subprocess.Popen(argv, cwd=REPO, env=full, stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT)
               for name, argv in procs.items()}  # fmt: skip
    try:
        urls = {}
        deadline = time.monotonic() + 120
        while len(urls) < 2:
            for name in procs:
                if m := re.search(r"on (http://[0-9.]+:\d+)", logs[name].read_text()):
                    urls[name] = m.group(1)
                assert running[name].poll() is None, logs[name].read_text()
            assert time.monotonic() < deadline, "serve and bridge did not start within 120 s"
            time.sleep(0.1)

        def get(path: str) -> dict:
            with urllib.request.urlopen(urls["serve"] + path, timeout=10) as r:
                return orjson.loads(r.read())

        wait_for(lambda: all(get("/api/status")["topics_caught_up"].values()), 60, "serve's topic tails")
        queue = get("/api/projects/p1/escalations?pending=false")
        body = orjson.dumps({"action": "ANNOTATION_CREATED", "annotation": {
            "id": 1, "task": 5, "project": 3, "completed_by": 2, "result": [], "created_at": "2026-12-01T10:00:00Z",
            "updated_at": "2026-12-01T10:00:00Z"}})  # fmt: skip
        request = urllib.request.Request(f"{urls['bridge']}/label-studio/webhook", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as r:
            published = orjson.loads(r.read())
    finally:
        for proc in running.values():
            proc.terminate()
            proc.wait(30)
        outputs.extend(log.read_text() for log in logs.values())
    return queue, published


@pytest.mark.parametrize(
    ("change", "command", "says"),
    [
        ({"GOLDSTREAM_KAFKA_PASSWORD_FILE": "WRONG"}, ("criteria", "set"), "Kafka refused the SASL login"),
        ({"GOLDSTREAM_KAFKA_SSL_CAFILE": "OTHER_CA"}, ("criteria", "set"), "GOLDSTREAM_KAFKA_SSL_CAFILE"),
        ({"GOLDSTREAM_REDIS_PASSWORD_FILE": "WRONG"}, ("report", "--project", "p1"), "Redis refused the login"),
        ({"GOLDSTREAM_REDIS_SSL_CAFILE": "OTHER_CA"}, ("report", "--project", "p1"), "GOLDSTREAM_REDIS_SSL_CAFILE"),
    ],
)
def test_a_wrong_password_or_ca_fails_at_once_naming_the_setting(
    secure: dict[str, str], tmp_path: Path, change: dict[str, str], command: tuple[str, ...], says: str
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    other_ca = str(REPO / ".ops" / "secure" / "tls" / "other-ca.pem")
    (tmp_path / "c.json").write_bytes(criteria("p1").to_bytes())
    values = {k: {"WRONG": str(wrong), "OTHER_CA": other_ca}[v] for k, v in change.items()}
    args = (*command, str(tmp_path / "c.json"), "--no-wait") if command[0] == "criteria" else command
    done = _run(secure, *args, GOLDSTREAM_TOPIC_PREFIX="sec-wrong.", **values)  # a hang would hit the timeout
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr
    for password in [*secure["passwords"].split(), "not-the-password"]:
        assert password not in done.stdout + done.stderr


def test_the_acl_user_reaches_only_its_own_prefix_and_commands(secure: dict[str, str]) -> None:
    admin_pw = (REPO / ".ops" / "secure" / "redis-admin.password").read_text().strip()
    settings = _settings(secure, "acl")

    async def main() -> None:
        tls = {k: v for k, v in settings.redis().items() if k.startswith("ssl_")}
        admin = Redis.from_url(settings.redis_url, username="admin", password=admin_pw, **tls)
        user = Redis.from_url(settings.redis_url, **settings.redis())
        try:
            await admin.set("other-app:secret", "kept")
            await user.set("gs-sec:acl:probe", "1")
            assert await user.get("gs-sec:acl:probe") == b"1"
            for refused in (user.get("other-app:secret"), user.set("other-app:x", "1"), user.flushdb(),
                            user.config_get("requirepass"), user.keys("*")):  # fmt: skip
                with pytest.raises(NoPermissionError):
                    await refused
        finally:
            await admin.delete("other-app:secret", "gs-sec:acl:probe")
            await admin.aclose()
            await user.aclose()

    asyncio.run(main())
