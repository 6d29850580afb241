"""`goldstream demo` ends every process it started when it is told to stop (issue #9 item 4).

The demo runs as a subprocess in its own session: output on a pipe, or in a terminal of its own
so that Ctrl-C and closing the terminal come from the kernel as they do for a user. It gets a
marker in its environment and TMPDIR set to the test's own directory. While it runs, the test
keeps recording its process tree: descendants by ppid, members of its session and of its
children's process groups, and any process carrying a marker, which catches daemons that
re-parented to init: the environment marker, or the test's directory on the command line (a
daemonized redis-server overwrites its environment with its process title, but that title names
its socket in TMPDIR). Once the demo shows scores (worker, broker and Redis all work), the test
stops it and waits, with generous bounds, until every recorded process is gone. Another test
stops the embedded pair and a demo worker outside the demo: with SIGTERM (EmbeddedServices' own
handling) and with SIGKILL (no cleanup at all: the kernel's parent-death signal).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.embedded

MARKER = "GOLDSTREAM_CLEANUP_TEST_MARKER"


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc shows it; (pid, start) identifies it across pid reuse."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    start: int
    cmdline: str


def _read_proc(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0], int(fields[19]), cmdline.strip())


@dataclass(frozen=True)
class Marks:
    """What the test gives the demo that its descendants keep: an environment variable, TMPDIR."""

    env: str
    path: str

    def on(self, p: ProcInfo) -> bool:
        if self.path in p.cmdline:
            return True
        try:
            return f"{MARKER}={self.env}".encode() in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False


def _table() -> dict[int, ProcInfo]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _read_proc(int(entry))) is not None:
            out[info.pid] = info
    return out


def _now(info: ProcInfo) -> ProcInfo | None:
    """The same process as it is now (None once it ended): its command line changes on exec."""
    now = _read_proc(info.pid)
    return now if now is not None and now.start == info.start and now.state != "Z" else None  # a zombie has ended


class Tree:
    """Every process seen belonging to the demo, accumulated over repeated scans."""

    def __init__(self, root: int, marks: Marks) -> None:
        self.root, self.marks = root, marks
        self.seen: dict[tuple[int, int], ProcInfo] = {}

    def scan(self) -> list[ProcInfo]:
        table = _table()
        children: dict[int, list[int]] = {}
        for p in table.values():
            children.setdefault(p.ppid, []).append(p.pid)
        found, todo = set(), [self.root]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        known = [table[p] for p in found] + list(self.seen.values())
        groups = {self.root} | {p.pgrp for p in known}
        sessions = {self.root} | {p.session for p in known}
        for p in table.values():
            if p.pid != os.getpid() and (p.pgrp in groups or p.session in sessions or self.marks.on(p)):
                found.add(p.pid)
        found.discard(self.root)
        for pid in found:
            self.seen.setdefault((pid, table[pid].start), table[pid])
        return [table[p] for p in found]

    def alive(self) -> list[ProcInfo]:
        """Every recorded process still running, as it is now: a scan may have caught one between
        fork and exec, still showing its parent's command line (the worker as `goldstream demo`)."""
        return [now for p in self.seen.values() if (now := _now(p)) is not None]

    def marked(self) -> list[ProcInfo]:
        return [p for p in _table().values() if p.state != "Z" and self.marks.on(p)]


def _wait(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what()}")
        time.sleep(0.2)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _as_in_a_terminal() -> None:
    """In the child: take the pty as controlling terminal, with the signals a terminal sends at
    their default disposition. Ignored signals survive exec, and a suite started in the
    background (`nohup ops/repeat &`) ignores SIGINT and SIGHUP: the demo then rightly ignored
    Ctrl-C and the closed terminal, and these tests failed for a reason of their own."""
    _default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Run:
    """A command started as a user starts it: output to a pipe, or in a terminal of its own.

    In a terminal (a pty that is the controlling terminal of the command's session) Ctrl-C and
    closing the terminal reach it from the kernel as SIGINT and SIGHUP, and the demo draws its live
    view; stderr then goes to a file, which the test can still read after the terminal is gone.
    """

    def __init__(self, argv: list[str], marks: Marks, terminal: bool) -> None:
        drop = ("GOLDSTREAM_", "FORCE_COLOR", "NO_COLOR", "COLUMNS", "LINES")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update({MARKER: marks.env, "TMPDIR": marks.path, "PYTHONUNBUFFERED": "1", "TERM": "xterm"})
        self.err_path = Path(marks.path) / "stderr.txt"
        self.master: int | None = None
        self._buf = bytearray()
        self._stop = threading.Event()
        if terminal:
            self.master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
            with open(self.err_path, "wb") as err:
                self.proc = subprocess.Popen(
                    argv, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=err, start_new_session=True,
                    preexec_fn=_as_in_a_terminal,
                )  # fmt: skip
            os.close(slave)
            fd = self.master
        else:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_signals,
            )  # fmt: skip
            assert self.proc.stdout is not None
            fd = self.proc.stdout.fileno()
        self._reader = threading.Thread(target=self._read, args=(fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while not self._stop.is_set():
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: nothing holds the terminal's other side any more
                    return
                if not chunk:
                    return
                self._buf += chunk

    def text(self) -> str:
        """What it wrote, without terminal escapes; with stderr when it ran in a terminal."""
        out = ANSI.sub("", self._buf.decode(errors="replace"))
        if self.master is not None and self.err_path.exists():
            out += "\n--- stderr ---\n" + self.err_path.read_text(errors="replace")
        return out

    def tail(self) -> str:
        return self.text()[-3000:]

    def max_scores(self) -> int:
        return max((int(m.group(1)) for m in re.finditer(r"\bscores\s+(\d+)", self.text())), default=0)

    def ctrl_c(self) -> None:
        assert self.master is not None
        os.write(self.master, b"\x03")

    def hang_up(self) -> None:
        """Close the terminal: the kernel sends SIGHUP to the session's foreground process group."""
        assert self.master is not None and self.master >= 0
        self._stop.set()
        self._reader.join()  # it must not be inside a read of the fd being closed
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop.set()
        self._reader.join()
        if self.master is not None and self.master >= 0:
            os.close(self.master)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def marks(tmp_path: Path) -> Iterator[Marks]:
    """This test's marks; whatever still carries them at the end is killed (the test has failed then)."""
    value = Marks(uuid.uuid4().hex, f"{tmp_path}/")
    yield value
    for p in Tree(0, value).marked():
        if p.pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


def _parts(procs: list[ProcInfo]) -> dict[str, list[ProcInfo]]:
    return {
        "worker": [p for p in procs if "goldstream.cli worker" in p.cmdline],
        "broker": [p for p in procs if "tansu" in p.cmdline and " broker " in p.cmdline],
        "redis": [p for p in procs if "redis-server" in p.cmdline],
    }


def _broker_port(procs: list[ProcInfo]) -> int:
    (broker,) = _parts(procs)["broker"]
    m = re.search(r"--listener-url tcp://127\.0\.0\.1:(\d+)", broker.cmdline)
    assert m, broker.cmdline
    return int(m.group(1))


def _listening(port: int) -> bool:
    """Does something accept connections on the port? The broker's port is a free port the OS
    chose, in the ephemeral range, and Linux connects a socket to itself when it picks that very
    port as the local end of a connection to a port nobody listens on: such a connection is not
    a listener."""
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return False
        return s.getsockname() != s.getpeername()


def _listeners(port: int) -> str:
    """Which processes hold a listening socket on the port (for the failure message)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
                    inodes.add(f[9])
    sockets = {f"socket:[{i}]" for i in inodes}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{pid}/fd")):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} {cmdline[:200]}")
    return "; ".join(found) or f"no process holds a listening socket on {port} (inodes {sorted(inodes)})"


def _stop_and_check(run: Run, tree: Tree, stop: Callable[[], None], returncode: int) -> float:
    """Stop it, then: it exits, every process recorded and every marked process is gone, the port is free."""
    procs = tree.alive()
    parts = _parts(procs)
    assert all(len(v) == 1 for v in parts.values()), parts
    port = _broker_port(procs)
    t0 = time.monotonic()
    stop()

    def report() -> str:
        left = "\n".join(f"  {p.pid} {p.state} {p.cmdline}" for p in tree.alive())
        return f"still running:\n{left}\n--- output ---\n{run.tail()}"

    try:
        run.proc.wait(120)  # worker grace 15 s + broker and redis 10 s each, at worst
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the demo did not end within 120 s of the signal; {report()}") from None
    took = time.monotonic() - t0

    _wait(lambda: not tree.alive(), 30, report)  # the demo waits for its children: they are gone already
    assert not tree.marked(), report()
    assert run.proc.returncode == returncode, run.tail()  # it ran its cleanup, not the default action
    # every process of the tree is gone; the port must come free too (a socket of an exiting
    # process is closed a moment after it is reported gone, so wait for it, naming any listener)
    _wait(lambda: not _listening(port), 30, lambda: f"port {port} free; listening: {_listeners(port)}")
    return took


DEMO = [sys.executable, "-m", "goldstream.cli", "demo", "--duration", "600"]


@pytest.mark.parametrize("how", ["SIGINT-ctrl-c", "SIGTERM-kill", "SIGHUP-terminal-closed", "SIGTERM-while-starting"])
def test_demo_ends_every_process_it_started(how: str, marks: Marks) -> None:
    sig = signal.Signals[how.split("-")[0]]
    run = Run(DEMO, marks, terminal=how != "SIGTERM-kill" and how != "SIGTERM-while-starting")
    tree = Tree(run.proc.pid, marks)
    try:

        def running() -> bool:
            assert run.proc.poll() is None, f"the demo ended early ({run.proc.returncode}):\n{run.tail()}"
            parts = _parts(tree.scan())
            if how == "SIGTERM-while-starting":  # the worker exists: the demo waits for it to start
                return all(parts.values())
            return all(parts.values()) and run.max_scores() > 0

        t0 = time.monotonic()
        _wait(running, 240, lambda: f"worker, broker, redis (and scores); output:\n{run.tail()}")
        started = time.monotonic() - t0
        stop = {
            "SIGINT-ctrl-c": run.ctrl_c,
            "SIGHUP-terminal-closed": run.hang_up,
        }.get(how, lambda: os.kill(run.proc.pid, sig))
        took = _stop_and_check(run, tree, stop, 128 + sig)
        if how != "SIGHUP-terminal-closed":  # after a hang-up its output has nowhere to go
            assert f"stopped by {sig.name}" in run.text(), run.tail()
        assert "Traceback" not in run.text(), run.tail()
        print(f"\n{how}: stopped after {started:.1f} s; it and its {len(tree.seen)} children ended in {took:.1f} s")
    finally:
        run.close()


SCRIPT = """
import sys, time
from pathlib import Path
from goldstream.demo import DemoWorker
from goldstream.services import EmbeddedServices, Terminated
from goldstream.streams.settings import Settings

try:
    with EmbeddedServices() as ep:
        settings = Settings(kafka_bootstrap=ep.bootstrap_servers, redis_url=ep.redis_url, services_kind="embedded",
                            app_id="cleanup-test", topic_prefix="cleanup-test.")
        worker = DemoWorker(settings, Path(sys.argv[1]))
        try:
            worker.start()
            print("ready", flush=True)
            while True:
                time.sleep(3600)
        finally:
            worker.stop()
except Terminated as exc:
    print(f"terminated {exc.signum}", flush=True)
    sys.exit(128 + exc.signum)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_embedded_services_and_worker_end_with_their_parent(sig: signal.Signals, marks: Marks) -> None:
    """SIGTERM: EmbeddedServices' own signal handling; SIGKILL: no cleanup at all, the parent-death signal."""
    run = Run([sys.executable, "-c", SCRIPT, f"{marks.path}worker.log"], marks, terminal=False)
    tree = Tree(run.proc.pid, marks)
    try:

        def running() -> bool:
            assert run.proc.poll() is None, f"the script ended early ({run.proc.returncode}):\n{run.tail()}"
            return all(_parts(tree.scan()).values()) and "ready" in run.text()

        _wait(running, 120, lambda: f"worker, broker and redis; output:\n{run.tail()}")
        _stop_and_check(run, tree, lambda: os.kill(run.proc.pid, sig), -sig if sig == signal.SIGKILL else 128 + sig)
    finally:
        run.close()


FORKER = """
import os, subprocess, sys, time
def hold():  # between fork and exec: the child still shows this script's command line
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", os.environ["WHAT"]], preexec_fn=hold).wait()
"""


def test_the_tree_reports_a_process_by_what_it_runs_now_not_when_first_seen(marks: Marks) -> None:
    """A scan can catch the demo's worker between fork and exec (CI did): it is then recorded with
    the demo's command line, and the stop check must still find it as the worker."""
    gate = Path(marks.path) / "exec"
    env = {**os.environ, MARKER: marks.env, "WHAT": "goldstream.cli worker"}
    root = subprocess.Popen([sys.executable, "-c", FORKER, str(gate)], env=env, start_new_session=True)
    tree = Tree(root.pid, marks)
    try:
        _wait(lambda: len(tree.scan()) == 1, 60, lambda: "the forked child")
        assert _parts(tree.alive())["worker"] == []  # not exec'd yet
        gate.touch()
        _wait(lambda: bool(_parts(tree.scan())["worker"]), 60, lambda: "the child's exec")
        assert [p.ppid for p in _parts(tree.alive())["worker"]] == [root.pid]
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()
