"""`goldstream worker` as a child process: one place for the demo, the tests and the benchmarks.

Workers run as real processes (not in-process apps) so that they can be killed with SIGKILL,
counted as separate group members, and measured the way they run in production.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from goldstream.services import die_with_parent
from goldstream.streams.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def worker_env(settings: Settings, log_level: str = "info") -> dict[str, str]:
    """The GOLDSTREAM_* variables that give a child worker exactly these settings: every field,
    so that neither a hand-kept list (which once left a new setting out) nor a variable the
    parent inherited can make the child differ."""
    env = {**os.environ}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[f"GOLDSTREAM_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["GOLDSTREAM_LOG_LEVEL"] = log_level
    return env


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
