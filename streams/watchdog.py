"""A worker is either working or gone: crash exit, shutdown deadline, stall watchdog, probes.

A worker that is alive but useless is the worst state for a QC pipeline: nothing alerts, work
piles up. (faust-streaming, which the worker was built on until this round, did exactly that: a
crashed app stayed in its loop ignoring SIGTERM, a restarted one reported Ready and consumed
nothing.) Supervisors (Kubernetes, compose, systemd) restart processes that exit or fail their
probes, so this module turns each such state into one of those:

- `Lifeline`, a thread (it runs even when the event loop is stuck): exits the process when the
  app crashed, when a SIGTERM / SIGINT was not obeyed within `shutdown_timeout_s`, or when the
  event loop has not turned for `loop_block_s`.
- `Progress`, the rule of the worker's watchdog task: its own partitions with lag and no
  progress (committed offsets moving) for `stall_timeout_s` make it exit with `EXIT_STALLED`; a
  supervisor restarts it. A Redis outage or a rebalance is waited out, not counted as a stall.
- `HealthServer`, a thread: `GET /healthz` (alive: loop turning, not stalled) and `GET /ready`
  (alive, Redis reachable, no rebalance, lag within a bound).

Exiting without a clean shutdown is safe: delivery is at least once and effects exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

EXIT_CRASHED = 70  # EX_SOFTWARE: a step raised, or the loop stopped turning
EXIT_STATE_LOST = 3  # Redis lost goldstream's state: restart, which rebuilds it
EXIT_STALLED = 75  # EX_TEMPFAIL: lag and no progress; a restart recovers
EXIT_HUNG = 1  # asked to stop, did not within the shutdown timeout


@dataclass
class Health:
    """What the probes report, written by the loop's tasks and read by the probe thread."""

    beat: float | None = None  # the loop's last turn, once the app's tasks run
    ready: bool = False
    reason: str = "starting"
    lag: int | None = None
    assigned: int = 0
    stalled: str | None = None
    redis_down: bool = False
    rebalancing: set[str] = field(default_factory=set)  # the consumers in a rebalance

    def alive(self, loop_block_s: float) -> tuple[bool, str]:
        if self.stalled:
            return False, self.stalled
        idle = 0.0 if self.beat is None else time.monotonic() - self.beat
        if idle > loop_block_s:
            return False, f"event loop blocked for {idle:.0f} s"
        return True, "ok"

    def as_dict(self, loop_block_s: float) -> dict[str, Any]:
        alive, why = self.alive(loop_block_s)
        return {
            "alive": alive,
            "ready": self.ready,
            "reason": self.reason if alive else why,
            "lag": self.lag,
            "assigned_partitions": self.assigned,
            "redis_down": self.redis_down,
        }


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    sys.stderr.flush()
    sys.stdout.flush()


def hard_exit(code: int, message: str) -> None:
    """Log and leave now: no orderly shutdown (it may be what hangs), nothing committed on the way."""
    log.critical("%s; exiting with status %d", message, code)
    _flush_logs()
    os._exit(code)


class Lifeline(threading.Thread):
    """Exits the process when the app crashed, a stop signal was not obeyed in time, or the loop
    stopped turning. A thread, so that it acts even when the event loop does not."""

    def __init__(
        self,
        crashed: Callable[[], BaseException | None],
        health: Health,
        shutdown_timeout_s: float,
        loop_block_s: float,
        crash_grace_s: float = 3.0,
        exit: Callable[[int, str], None] = hard_exit,
    ) -> None:
        super().__init__(name="goldstream-lifeline", daemon=True)
        self.crashed = crashed
        self.health = health
        self.shutdown_timeout_s = shutdown_timeout_s
        self.loop_block_s = loop_block_s
        self.crash_grace_s = crash_grace_s
        self.exit = exit
        self.stop_requested: float | None = None
        self._crash_seen: float | None = None
        self._done = threading.Event()

    def request_stop(self) -> None:
        """A stop signal arrived: from now on the shutdown has `shutdown_timeout_s` to finish."""
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()

    def finish(self) -> None:
        self._done.set()

    def verdict(self, now: float) -> tuple[int, str] | None:
        """Why the process must exit now, if it must (pure, for tests)."""
        from goldstream.streams.state import StateLost

        reason = self.crashed()
        if reason is not None:
            if self._crash_seen is None:
                self._crash_seen = now
            if now - self._crash_seen >= self.crash_grace_s:  # let the app log it and try to stop
                code = EXIT_STATE_LOST if isinstance(reason, StateLost) else EXIT_CRASHED
                return code, f"the app crashed ({type(reason).__name__}: {reason})"
        if self.stop_requested is not None and now - self.stop_requested > self.shutdown_timeout_s:
            return EXIT_HUNG, f"shutdown did not finish within {self.shutdown_timeout_s:.0f} s"
        beat = self.health.beat
        if self.stop_requested is None and beat is not None and now - beat > self.loop_block_s:
            return EXIT_CRASHED, f"the event loop has not turned for {now - beat:.0f} s"
        return None

    def run(self) -> None:
        while not self._done.wait(0.5):
            found = self.verdict(time.monotonic())
            if found is not None:
                self.exit(*found)
                return


async def heartbeat(health: Health, every_s: float = 1.0) -> None:
    """Proves the event loop turns (the lifeline and /healthz read it)."""
    while True:
        health.beat = time.monotonic()
        await asyncio.sleep(every_s)


@dataclass
class Progress:
    """Stall detection over successive readings of (progress signal, lag), pure for tests."""

    stall_timeout_s: float
    last_signal: tuple | None = None
    since: float = field(default_factory=time.monotonic)

    def reset(self, now: float) -> None:
        self.last_signal, self.since = None, now

    def observe(self, signal: tuple, lag: int, now: float) -> str | None:
        """A reason to call the worker stalled, or None. A changed signal, or no lag, is progress."""
        if signal != self.last_signal or lag <= 0:
            self.last_signal, self.since = signal, now
            return None
        if now - self.since >= self.stall_timeout_s:
            return f"{lag} record(s) of lag on its partitions and no progress for {now - self.since:.0f} s"
        return None


class HealthServer(threading.Thread):
    """`/healthz` and `/ready` on a port of its own, answered from a thread (a stuck event loop
    must still be reported, not time out the probe)."""

    def __init__(
        self, health: Health, port: int, loop_block_s: float, host: str = "0.0.0.0", metrics: Any = None
    ) -> None:
        super().__init__(name="goldstream-health", daemon=True)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics" and outer.metrics is not None:  # Prometheus' text format
                    self._answer(200, outer.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
                    return
                state = outer.health.as_dict(outer.loop_block_s)
                if path == "/healthz":
                    ok = state["alive"]
                elif path == "/ready":
                    ok = state["alive"] and state["ready"]
                else:
                    self.send_error(404, "try /healthz, /ready or /metrics")
                    return
                self._answer(200 if ok else 503, json.dumps(state).encode(), "application/json")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.health = health
        self.loop_block_s = loop_block_s
        self.metrics = metrics
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.5)


async def lag_and_offsets(
    admin: Any, probe: Any, group: str, partitions: Iterable[Any]
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Committed offsets of `group` on `partitions` and their end offsets (two requests)."""
    parts = list(partitions)
    if not parts:
        return {}, {}
    committed_raw = await admin.list_consumer_group_offsets(group, partitions=parts)
    committed = {tp: (o.offset if o is not None else -1) for tp, o in committed_raw.items()}
    ends = await probe.end_offsets(parts)
    return committed, ends


def total_lag(committed: dict[Any, int], ends: dict[Any, int]) -> int:
    return sum(max(end - max(committed.get(tp, -1), 0), 0) for tp, end in ends.items())


__all__ = [
    "EXIT_CRASHED",
    "EXIT_HUNG",
    "EXIT_STALLED",
    "EXIT_STATE_LOST",
    "Health",
    "HealthServer",
    "Lifeline",
    "Progress",
    "hard_exit",
    "heartbeat",
    "lag_and_offsets",
    "total_lag",
]
