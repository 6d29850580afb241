"""Helpers for the stream tests: goldstream workers as real processes, and waiting on topics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from goldstream.streams.engine import Record
from goldstream.streams.replay import envelope, proficiency_snapshot, replay
from goldstream.streams.settings import Settings
from goldstream.streams.state import Keys, connect
from goldstream.streams.watchdog import EXIT_STALLED

from goldstream import schemas as s
from goldstream.commands import committed_to_end, publish, read_topic
from goldstream.proc import WorkerProcess
from tests.scenario import TOPIC_OF, key_of


class Worker(WorkerProcess):
    """`goldstream worker` in its own process, configured through GOLDSTREAM_* variables."""


def messages_of(settings: Settings, topic: str, model: type[s.Message]) -> list[s.Message]:
    """Every message on a topic, decoded; re-deliveries included."""
    return [s.decode(model, v) for _, v in asyncio.run(read_topic(settings, topic, until_idle_s=0.3)) if v]


class Stalled(AssertionError):
    """No progress for a while: the worker consumes nothing."""


class WorkerExited(AssertionError):
    """A worker process ended by itself while the test waited."""

    def __init__(self, message: str, worker: Worker, returncode: int) -> None:
        super().__init__(message)
        self.worker = worker
        self.returncode = returncode


def wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    workers: Sequence[Worker] = (),
    stalled_after: float | None = None,
    progress: Callable[[], int] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    while time.monotonic() < deadline:
        if check():
            return
        for w in workers:
            if not w.alive() and w.proc is not None and w.proc.returncode not in (None, -9):
                rc = w.proc.returncode
                raise WorkerExited(f"worker exited ({rc}) while waiting for {what}:\n{w.tail()}", w, rc)
        if progress is not None and stalled_after is not None:
            now = progress()
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > stalled_after:
                raise Stalled(f"no progress for {stalled_after:.0f} s waiting for {what} (at {now})")
        time.sleep(1.0)
    tails = "\n---\n".join(w.tail() for w in workers)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def supervised(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    workers: list[Worker],
    restart: Callable[[int, int], Worker],
    max_restarts: int = 6,
) -> int:
    """`wait_for`, restarting a worker that exits because its watchdog saw it stall (as a
    supervisor with a restart policy does). Returns how many restarts it took; any other exit
    fails the test. `restart(index, restarts)` starts the replacement of workers[index]."""
    restarts = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_for(check, max(deadline - time.monotonic(), 1.0), what, workers)
            return restarts
        except WorkerExited as exc:
            if exc.returncode != EXIT_STALLED:
                raise
            restarts += 1
            assert restarts <= max_restarts, f"the watchdog restarted workers {restarts} times:\n{exc}"
            i = workers.index(exc.worker)
            workers[i] = restart(i, restarts)


def unique_ids(settings: Settings, topic: str, model: type[s.Message]) -> set[str]:
    return {m.event_id for m in messages_of(settings, topic, model)}


def send(settings: Settings, messages: Sequence[s.Message], raw: Sequence[tuple[str, bytes]] = ()) -> None:
    items = [(TOPIC_OF[type(m)], key_of(m), m.to_bytes()) for m in messages]
    items += [(topic, "bad", value) for topic, value in raw]
    asyncio.run(publish(settings, items))


def replay_snapshot(settings: Settings, messages: Sequence[s.Message], prefix: str) -> dict:
    """What `goldstream replay` makes of the same messages, under another key prefix."""

    async def main() -> dict:
        client = connect(settings.redis_url, **settings.redis())
        try:
            recs = [Record(TOPIC_OF[type(m)], m.to_bytes(), key_of(m).encode(), 0, i) for i, m in enumerate(messages)]
            await replay(recs, client, Keys(prefix))
            return await proficiency_snapshot(client, Keys(prefix))
        finally:
            await client.aclose()

    return asyncio.run(main())


def live_snapshot(settings: Settings, prefix: str | None = None) -> dict:
    async def main() -> dict:
        client = connect(settings.redis_url, **settings.redis())
        try:
            return await proficiency_snapshot(client, Keys(prefix or settings.key_prefix))
        finally:
            await client.aclose()

    return asyncio.run(main())


def write_envelopes(path: Path, messages: Sequence[s.Message]) -> Path:
    with open(path, "wb") as fh:
        for m in messages:
            fh.write(envelope(TOPIC_OF[type(m)], m, key_of(m)))
    return path


def wait_consumed(settings: Settings, logical: str, timeout: float = 90.0) -> None:
    """Wait until the worker group has committed a topic to its end (e.g. gold before annotations)."""
    wait_for(lambda: asyncio.run(committed_to_end(settings, settings.app_id, logical)), timeout,
             f"the workers to consume {logical}")  # fmt: skip
