"""Wait until a Kafka broker answers a Metadata request with at least one broker.

Standard library only (like goldstream/__init__.py), so ops/dev runs it as `python3 -m goldstream.probe`
before goldstream's dependencies are installed, and the embedded broker is checked the same way.
A log line saying "started" is not proof that clients can use the broker; a Metadata answer
that lists a broker is. Metadata v4 is used because Kafka 4.0 removed v0-v3 (KIP-896) and
v4 is the oldest non-flexible version every 4.x broker still serves.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

METADATA_API_KEY = 3
METADATA_VERSION = 4


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s


def metadata_brokers(host: str, port: int, timeout: float = 5.0) -> list[tuple[int, str, int]]:
    """Send one Metadata v4 request and return the (node_id, host, port) of each broker."""
    client_id = b"goldstream-ops"
    header = struct.pack(">hhih", METADATA_API_KEY, METADATA_VERSION, 1, len(client_id)) + client_id
    body = struct.pack(">ib", -1, 0)  # all topics (null array), no auto-creation
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _read_exact(sock, 4))[0]
        r = _Reader(_read_exact(sock, size))
    if r.take(">i") != 1:
        raise ConnectionError("correlation id mismatch")
    r.take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(r.take(">i")):
        node_id = r.take(">i")
        bhost = r.string() or ""
        bport = r.take(">i")
        r.string()  # rack
        brokers.append((node_id, bhost, bport))
    return brokers


def wait_for_kafka(bootstrap: str, timeout: float = 60.0) -> list[tuple[int, str, int]]:
    """Retry a Metadata request until it lists a broker; raise TimeoutError after `timeout` s."""
    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            brokers = metadata_brokers(host, int(port))
            if brokers:
                return brokers
        except (OSError, ConnectionError, struct.error) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"kafka at {bootstrap} did not answer a Metadata request: {last}")
        time.sleep(0.25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bootstrap", help="host:port")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to keep trying")
    args = ap.parse_args()
    try:
        brokers = wait_for_kafka(args.bootstrap, args.timeout)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"kafka ready at {args.bootstrap}: brokers {brokers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
