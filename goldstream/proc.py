"""`goldstream worker` as a child process: one place for the demo, the tests and the benchmarks.

Workers run as real processes (not in-process apps) so that they can be killed with SIGKILL,
counted as separate group members, and measured the way they run in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from goldstream.services import die_with_parent
from goldstream.streams.security import SETTINGS
from goldstream.streams.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SECURITY_FIELDS = SETTINGS  # streams.security's: a child worker connects as its parent does


def worker_env(settings: Settings, log_level: str = "info") -> dict[str, str]:
    """The GOLDSTREAM_* variables that give a child worker these settings."""
    return {
        **os.environ,
        "GOLDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "GOLDSTREAM_REDIS_URL": settings.redis_url,
        "GOLDSTREAM_SERVICES_KIND": settings.services_kind,
        "GOLDSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "GOLDSTREAM_KEY_PREFIX": settings.key_prefix,
        "GOLDSTREAM_APP_ID": settings.app_id,
        "GOLDSTREAM_PARTITIONS": str(settings.partitions),
        "GOLDSTREAM_REPLICATION_FACTOR": str(settings.replication_factor),
        "GOLDSTREAM_MIN_INSYNC_REPLICAS": str(settings.min_insync_replicas),
        "GOLDSTREAM_LOG_LEVEL": log_level,
        "GOLDSTREAM_CONSENSUS_CHECK_S": str(settings.consensus_check_s),
        "GOLDSTREAM_STALL_TIMEOUT_S": str(settings.stall_timeout_s),
        "GOLDSTREAM_WATCH_EVERY_S": str(settings.watch_every_s),
        "GOLDSTREAM_HEALTH_PORT": str(settings.health_port),
        "GOLDSTREAM_SHUTDOWN_TIMEOUT_S": str(settings.shutdown_timeout_s),
        "GOLDSTREAM_REDIS_LOST_STATE": settings.redis_lost_state,
        "GOLDSTREAM_STEPS": settings.steps,
        "GOLDSTREAM_FAULT": settings.fault,
        "GOLDSTREAM_UNKNOWN_PROJECTS": settings.unknown_projects,
        "GOLDSTREAM_SESSION_TIMEOUT_S": str(settings.session_timeout_s),
        "GOLDSTREAM_BATCH_MAX": str(settings.batch_max),
        **{  # streams.security: the child connects as its parent does
            f"GOLDSTREAM_{name.upper()}": getattr(settings, name) for name in SECURITY_FIELDS if getattr(settings, name)
        },
    }


@dataclass
class WorkerProcess:
    """A child process (by default `goldstream worker`) in its own session, logging to a file."""

    settings: Settings
    log: Path
    argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "goldstream.cli", "worker"])
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                env=worker_env(self.settings),
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # no worker outlives a killed test run or benchmark
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (a clean leave of the consumer group), SIGKILL if it hangs."""
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def tail(self, n: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
