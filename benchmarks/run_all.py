"""Every benchmark, one after the other, then one JSON of figures and a short Markdown table.

    ops/bench [--quick]        (sets up .venv, Kafka and Redis first)
    python -m benchmarks.run_all [--quick] [--out benchmarks/results]

Each benchmark runs in its own process (a clean interpreter for timing) and writes its JSON;
this collects them into `summary.json` and `summary.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = ("scoring_bench", "stream_bench", "qc_bench")


def run(name: str, out: Path, quick: bool) -> tuple[dict[str, Any], float]:
    target = out / f"{name.removesuffix('_bench')}.json"
    argv = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(target)] + (["--quick"] if quick else [])
    print(f"\n== {name} ==", flush=True)
    t0 = time.monotonic()
    subprocess.run(argv, check=True, cwd=Path(__file__).parent.parent)
    return json.loads(target.read_text()), time.monotonic() - t0


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v:.0%}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown(summary: dict[str, Any]) -> str:
    """The headline figures as Markdown tables (README / docs can link to this file)."""
    st, qc, sc = summary["stream"], summary["qc"]["summary"], summary["scoring"]
    lines = [
        f"# goldstream benchmarks — {summary['when']}",
        "",
        f"{summary['machine']}; {'quick' if summary['quick'] else 'full'} run, {summary['seconds']:.0f} s in all.",
        "",
        "## Throughput (real Kafka + redis-server)",
        "",
        f"Workload: {st['workload']['annotations']} annotations, 10 boxes per item, 10 % gold, overlap 3; "
        f"{st['partitions']} partitions. The clock runs from the first annotation sent to the last effect "
        "(score on Kafka and Redis updated; for the baseline, the last forwarded event).",
        "",
        "| pipeline | processes | annotations/s (best of runs) |",
        "|---|---:|---:|",
    ]
    for r in st["throughput"]:
        lines.append(f"| {r['name']} | {r['processes']} | {r['events_per_s']:.0f} |")
    ratios = st["ratios"]
    lines += [
        "",
        f"goldstream / forward-only Faust baseline: **{ratios['goldstream_vs_forward_1']:.2f}x** (1 process), "
        f"{ratios['goldstream_vs_forward_2']:.2f}x (2). Two goldstream workers / one: "
        f"**{ratios['goldstream_2_vs_1_workers']:.2f}x** (forwarder: {ratios['forward_2_vs_1']:.2f}x).",
        "",
        "## Latency, submitted_at → ScoreRecord at a consumer (one worker)",
        "",
        "| offered rate | p50 ms | p95 ms | p99 ms | gold p50 / p99 | consensus p50 / p99 | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in st["latency"]:
        a, g, c = r["all"], r["gold"], r["consensus"]
        lines.append(
            f"| {r['fraction_of_max']:.0%} of max ({r['offered_per_s']:.0f}/s) | {_fmt(a['p50_ms'])} | "
            f"{_fmt(a['p95_ms'])} | {_fmt(a['p99_ms'])} | {_fmt(g['p50_ms'])} / {_fmt(g['p99_ms'])} | "
            f"{_fmt(c['p50_ms'])} / {_fmt(c['p99_ms'])} | {a['n']} |"
        )
    g, cv, ds = qc["goldstream"], qc["cvat_style_batch"], qc["dawid_skene"]
    rnd = qc["random_audit_same_budget"]
    lines += [
        "",
        f"## QC effectiveness ({len(summary['qc']['workforces'])} simulated workforces, means)",
        "",
        "| | goldstream | CVAT-style batch report | Dawid-Skene (crowd-kit) | random audit |",
        "|---|---:|---:|---:|---:|",
        f"| Spearman(estimate, true skill) | {_fmt(g['spearman_mean_score'])} "
        f"(lower bound {_fmt(g['spearman_lower_bound'])}) | {_fmt(cv['spearman'])} | {_fmt(ds['spearman'])} | - |",
        f"| drifts detected | {g['drift_detected']} | {cv['drift_detected']} (at the end) | - | - |",
        f"| gold items from drift to alert (median) | {_fmt(g['drift_delay_gold_items_median'])} | "
        f"{_fmt(cv['drift_delay_gold_items_median'])} (end of batch) | - | - |",
        f"| false alerts per 10k items of stable workers | {_fmt(g['false_alerts_per_10k_stable_items'])} | "
        f"{_fmt(cv['false_alerts_per_10k_stable_items'])} | - | - |",
        f"| truly bad non-gold annotations escalated | {_fmt(g['bad_caught_share'], True)} | "
        f"{_fmt(cv['bad_caught_share'], True)} | {_fmt(ds['bad_caught_share'], True)} | "
        f"{_fmt(rnd['bad_caught_share'], True)} |",
        f"| review budget (share of non-gold annotations) | {_fmt(g['budget_share'], True)} | "
        f"{_fmt(cv['budget_share'], True)} | {_fmt(ds['budget_share'], True)} | {_fmt(g['budget_share'], True)} |",
        f"| precision of escalations | {_fmt(g['precision'], True)} | {_fmt(cv['precision'], True)} | "
        f"{_fmt(ds['precision'], True)} | - |",
        "",
        "## Scoring library (items/s, no I/O)",
        "",
        "| workload | per item | batched | naive | batched / naive |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sc["items"]:
        lines.append(
            f"| {r['workload']} | {r['goldstream_items_per_s']:.0f} | {r['goldstream_batch_items_per_s']:.0f} | "
            f"{r['naive_items_per_s']:.0f} | {r['batch_ratio_vs_naive']:.1f}x |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small workloads (a smoke run, about 3 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
        "quick": args.quick,
    }
    seconds = {}
    for name in BENCHMARKS:
        key = name.removesuffix("_bench")
        summary[key], seconds[key] = run(name, args.out, args.quick)
    summary["seconds"] = time.monotonic() - t0
    summary["seconds_per_benchmark"] = {k: round(v, 1) for k, v in seconds.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    print(f"\nall benchmarks in {summary['seconds']:.0f} s; wrote {args.out / 'summary.json'} and summary.md")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
