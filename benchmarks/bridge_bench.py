"""Webhook answer time and throughput of `goldstream bridge` (real Kafka of `ops/dev`).

    python -m benchmarks.bridge_bench [--quick] [--json benchmarks/results/bridge.json]

Label Studio waits about a second for a webhook's answer and never retries, so what matters is
the time from a delivery's POST to the bridge's answer, which comes only after Kafka acknowledged
the messages (acks from all in-sync replicas). Deliveries are Label Studio `ANNOTATION_CREATED`
bodies with 4 rectangles, each a new annotation. Two ways, in the same run:

- one at a time (as one Label Studio worker sends them): answer-time percentiles;
- 16 in flight (several Label Studio workers, or a sync): deliveries per second.

The baseline, in the same run, is a bare aiohttp receiver in its own process that reads and
parses each body and answers 200 without converting or publishing it: the floor any receiver
pays for HTTP and JSON on this machine. Prints figures and ratios; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
TOKEN = secrets.token_hex(16)
RECEIVER = """
import sys, orjson
from aiohttp import web
async def hook(request):
    orjson.loads(await request.read())
    return web.json_response({"ok": True})
app = web.Application(client_max_size=1 << 20)
app.add_routes([web.post("/label-studio/webhook", hook)])
runner = web.AppRunner(app)
import asyncio
async def main():
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"receiver on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def delivery(n: int) -> bytes:
    boxes = [
        {"id": f"r{k}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
         "original_width": 1920, "original_height": 1080, "image_rotation": 0,
         "value": {"x": 5 + 20 * k, "y": 10, "width": 15, "height": 30, "rotation": 0, "rectanglelabels": ["car"]}}
        for k in range(4)
    ]  # fmt: skip
    a = {"id": n, "task": n % 997, "project": 1, "completed_by": n % 13, "was_cancelled": False,
         "ground_truth": False, "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:00:09Z",
         "lead_time": 9.0, "result": boxes}  # fmt: skip
    return orjson.dumps({"action": "ANNOTATION_CREATED", "annotation": a, "project": {"id": 1}, "task": {"id": n}})


def start(argv: list[str], env: dict[str, str], pattern: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if m := re.search(pattern, line):
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{argv[:4]} did not start")


async def measure(url: str, n: int, concurrency: int, offset: int) -> dict[str, float]:
    """Answer times (ms) one at a time, then deliveries/s with `concurrency` in flight."""
    headers = {"Content-Type": "application/json", "X-Goldstream-Token": TOKEN}
    bodies = [delivery(offset + i) for i in range(2 * n)]
    async with aiohttp.ClientSession() as http:

        async def post(body: bytes) -> float:
            t0 = time.perf_counter()
            async with http.post(f"{url}/label-studio/webhook", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            return (time.perf_counter() - t0) * 1000

        for body in bodies[:20]:  # warm-up: connections, the producer's metadata
            await post(body)
        times = [await post(body) for body in bodies[20:n]]
        queue = list(bodies[n:])
        t0 = time.perf_counter()

        async def lane() -> None:
            while queue:
                await post(queue.pop())

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        rate = n / (time.perf_counter() - t0)
    p = np.percentile(times, [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 2), "p95_ms": round(float(p[1]), 2), "p99_ms": round(float(p[2]), 2),
            "max_ms": round(max(times), 2), "deliveries_per_s": round(rate, 1), "n": len(times)}  # fmt: skip


def run(n: int, ep: Any = None) -> dict[str, Any]:
    """Both receivers over `n` deliveries each way, on the Kafka of `ep` (else of the environment)."""
    from goldstream.services import from_env

    ep = ep or from_env()
    if ep is None:
        raise SystemExit('no Kafka: run `ops/dev up` and `eval "$(ops/dev env)"` (ops/bench does)')
    prefix = f"bench-bridge-{secrets.token_hex(4)}."
    env = {
        **os.environ, "GOLDSTREAM_KAFKA_BOOTSTRAP": ep.bootstrap_servers, "GOLDSTREAM_TOPIC_PREFIX": prefix,
        "GOLDSTREAM_PARTITIONS": "1", "GOLDSTREAM_BRIDGE_TOKEN": TOKEN,
    }  # fmt: skip
    rows = []
    bridge, url = start([sys.executable, "-m", "goldstream.cli", "bridge", "--port", "0"], env,
                        r"goldstream bridge on (http://[0-9.]+:\d+)")  # fmt: skip
    receiver, base_url = start([sys.executable, "-c", RECEIVER], env, r"receiver on (http://[0-9.]+:\d+)")
    try:
        for name, target in (("goldstream bridge (publishes, waits for Kafka)", url),
                             ("bare aiohttp receiver (parses, answers)", base_url)):  # fmt: skip
            figures = asyncio.run(measure(target, n, 16, len(rows) * 10 * n))
            rows.append({"name": name, **figures})
            print(f"  {name:<48} p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms  "
                  f"max {figures['max_ms']:6.1f} ms  {figures['deliveries_per_s']:7.0f} deliveries/s (16 in flight)",
                  flush=True)  # fmt: skip
    finally:
        for proc in (bridge, receiver):
            proc.terminate()
            proc.wait(30)
        from goldstream.streams.topics import Topics, delete_topics

        asyncio.run(delete_topics(ep, Topics(prefix)))
    ours, floor = rows
    return {
        "machine": platform.processor() or platform.machine(),
        "deliveries": n,
        "bridge": rows,
        "ratios": {
            "p99_vs_receiver": round(ours["p99_ms"] / floor["p99_ms"], 2),
            "rate_vs_receiver": round(ours["deliveries_per_s"] / floor["deliveries_per_s"], 2),
        },
        "label_studio_timeout_ms": 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer deliveries (a smoke run)")
    ap.add_argument("--json", type=Path, default=RESULTS / "bridge.json")
    args = ap.parse_args()
    print("bridge benchmark", flush=True)
    figures = run(300 if args.quick else 2000)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
