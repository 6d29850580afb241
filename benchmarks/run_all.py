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
BENCHMARKS = ("scoring_bench", "stream_bench", "replay_bench", "bridge_bench", "ops_bench", "qc_bench")


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
    st, sc = summary["stream"], summary["scoring"]
    lines = [
        f"# goldstream benchmarks — {summary['when']}",
        "",
        f"{summary['machine']}; {'quick' if summary['quick'] else 'full'} run, {summary['seconds']:.0f} s in all.",
        "",
        *(
            [f"This run: {', '.join(summary['rerun'])} only; the other sections are their last committed run.", ""]
            if set(summary.get("rerun", BENCHMARKS)) != set(BENCHMARKS)
            else []
        ),
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
        *_round_lines(st),
        *_cpu_lines(st),
        "",
        "## Latency, submitted_at → ScoreRecord at a consumer (one worker)",
        "",
        "Measured after a warm-up at the same rate (its p99 in its own column), as the OpenMessaging Benchmark "
        "does; the last column counts Redis's append-only-file rewrites during the probe (each one forks and "
        "writes the dataset out on the cores the worker shares).",
        "",
        "| offered rate | p50 ms | p95 ms | p99 ms | gold p50 / p99 | consensus p50 / p99 | n | warm-up p99 ms "
        "| AOF rewrites |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("", r) for r in st["latency"]] + [(", steps split", r) for r in st.get("latency_split_steps", [])]
    for label, r in rows:
        a, g, c = r["all"], r["gold"], r["consensus"]
        lines.append(
            f"| {r['fraction_of_max']:.0%} of max ({r['offered_per_s']:.0f}/s){label} | {_fmt(a['p50_ms'])} | "
            f"{_fmt(a['p95_ms'])} | {_fmt(a['p99_ms'])} | {_fmt(g['p50_ms'])} / {_fmt(g['p99_ms'])} | "
            f"{_fmt(c['p50_ms'])} / {_fmt(c['p99_ms'])} | {a['n']} | "
            f"{_fmt(r['warmup']['p99_ms']) if 'warmup' in r else '-'} ({r.get('warmup_s', 0):.0f} s) | "
            f"{_fmt(r.get('redis_aof_rewrites'))} |"
        )
    if "replay" in summary:
        lines += [
            "",
            "## Replay (`goldstream replay` into redis-server; annotations/s)",
            "",
            "| workforce | annotations | batches of 500 | one at a time | ratio | target |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in summary["replay"]["replay"]:
            lines.append(
                f"| {r['workforce']} | {r['annotations']} | {r['annotations_per_s']:.0f} | "
                f"{r['batch_1_annotations_per_s']:.0f} | {r['ratio_vs_batch_1']:.1f}x | {r['target_per_s']:.0f} |"
            )
    if "bridge" in summary:
        b = summary["bridge"]
        lines += [
            "",
            "## Bridge (`POST /label-studio/webhook` to the answer, after Kafka acknowledged; 4 boxes each)",
            "",
            "| receiver | p50 ms | p95 ms | p99 ms | max ms | deliveries/s, 16 in flight |",
            "|---|---:|---:|---:|---:|---:|",
            *(f"| {r['name']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | "
              f"{r['deliveries_per_s']:.0f} |" for r in b["bridge"]),
            "",
            f"Label Studio gives up after about {b['label_studio_timeout_ms']} ms.",
        ]  # fmt: skip
    if "ops" in summary:
        o = summary["ops"]
        lines += [
            "",
            "## Operating it (metrics per annotation; the query API's answer times)",
            "",
            f"Worker metrics: {o['metrics_us_per_annotation']} µs per annotation against the engine's "
            f"{o['replay_us_per_annotation']} µs in the same run ({o['metrics_share']:.1%}). "
            f"API over {o['workers']} workers: "
            + ", ".join(f"{k} {v['p50_ms']} / {v['p99_ms']} ms (p50 / p99)" for k, v in o["api"].items())
            + ".",
        ]
    lines += ["", *qc_markdown(summary["qc"]), ""]
    lines += [
        "## Scoring library (items/s, no I/O)",
        "",
        "| workload | per item | batched | naive | batched / naive | same, worker GC | median of rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.1f}x" if r.get(key) is not None else "-"

    for r in sc["items"]:
        rounds = [
            ratio(r, "batch_ratio_vs_naive_median_of_rounds"),
            ratio(r, "worker_gc_batch_ratio_vs_naive_median_of_rounds"),
        ]
        lines.append(
            f"| {r['workload']} | {r['goldstream_items_per_s']:.0f} | {r['goldstream_batch_items_per_s']:.0f} | "
            f"{r['naive_items_per_s']:.0f} | {r['batch_ratio_vs_naive']:.1f}x | "
            f"{ratio(r, 'worker_gc_batch_ratio_vs_naive')} | {' / '.join(rounds)} |"
        )
    lines.append("")
    return "\n".join(lines)


BASELINE_COLUMNS = (
    ("cvat_style", "CVAT-style"),
    ("dawid_skene", "Dawid-Skene"),
    ("glad", "GLAD"),
    ("mace", "MACE"),
    ("object_consensus", "consensus"),
    ("object_consensus_ds", "consensus, weighted"),
)


def _row(name: str, ours: Any, target: str, baselines: dict[str, Any], key: str | None, pct: bool = False) -> str:
    cells = [_fmt((baselines.get(n) or {}).get(key), pct) if key else "-" for n, _ in BASELINE_COLUMNS]
    return f"| {name} | {_fmt(ours, pct)} | {target} | " + " | ".join(cells) + " |"


def qc_markdown(qc: dict[str, Any]) -> list[str]:
    """The QC figures per family of workforces, goldstream against the issue's targets and the
    batch baselines of the same run."""
    t = qc["targets"]
    out = [f"## QC effectiveness ({len(qc['workforces'])} simulated workforces; means over seeds)", ""]
    head = "| figure | goldstream | target | " + " | ".join(label for _, label in BASELINE_COLUMNS) + " |"
    for family, f in qc["summary"].items():
        g, b = f["goldstream"], f["baselines"]
        spam = ", ".join(map(str, g["spammer_tasks"])) or "-"
        out += [
            f"### {family} (seeds {', '.join(map(str, f['seeds']))}; truly bad {_fmt(f['truly_bad_share'], True)} "
            "of non-gold annotations; review budget 1.25 x that)",
            "",
            head,
            "|---|---:|---:|" + "---:|" * len(BASELINE_COLUMNS),
            _row("Spearman(estimate, true skill)", g["spearman_level"], f">= {t['spearman']}", b, "spearman"),
            _row("truly bad non-gold escalated", g["bad_caught_share"], ">= 85%", b, "bad_caught_share", True),
            _row("review spent (share of non-gold)", g["budget_share"], "<= 1.25 x bad", b, "budget_share", True),
            _row("precision of escalations", g["precision"], ">= 70%", b, "precision", True),
            _row("drifting workers alerted", g["drift_detected"], "all", b, None),
            _row("tasks from drift to alert (median)", g["drift_delay_median_tasks"], "<= 30", b, None),
            _row("tasks a spammer did before its alert", spam, f"<= {t['spammer_tasks']}", b, None),
            _row("false worker alerts / 10k stable items", g["false_alerts_per_10k"], "<= 1", b, None),
            "",
        ]
        if "in_goldstream_metric" in g:
            m = g["in_goldstream_metric"]
            out += [
                f"Against the truth in goldstream's own metric (item score against the true content below the pass "
                f"threshold: {_fmt(m['truly_bad_share'], True)} bad): Spearman {_fmt(m['spearman_level'])}, "
                f"{_fmt(m['bad_caught_share'], True)} of the bad escalated, precision {_fmt(m['precision'], True)}.",
                "",
            ]
    return out


def _round_lines(st: dict[str, Any]) -> list[str]:
    """The ratios within each round of runs (every configuration in turn), and their median."""
    by_round, median = st.get("ratios_by_round"), st.get("ratios_median_of_rounds")
    if not by_round or not median:
        return []
    rows = [
        f"{name.replace('_', ' ')}: {' / '.join(f'{v:.2f}' for v in values)} (median {median[name]:.2f}x)"
        for name, values in by_round.items()
    ]
    return ["", "Within each round of runs (minutes apart, every configuration in turn): " + "; ".join(rows) + "."]


def _cpu_lines(st: dict[str, Any]) -> list[str]:
    """Where each best run's CPU went (`stream_bench.CpuMeter`), when the run measured it."""
    rows = [r for r in st["throughput"] if "cpu" in r]
    if not rows:
        return []
    lines = [
        "",
        "| pipeline | processes | cores busy (of all) | workers | Kafka | Redis | harness | CPU ms / annotation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["cpu"]
        lines.append(
            f"| {r['name']} | {r['processes']} | {c['machine_cores']:.2f} | {c['worker_cores']:.2f} | "
            f"{c.get('kafka_cores', float('nan')):.2f} | {c.get('redis_cores', float('nan')):.2f} | "
            f"{c['harness_cores']:.2f} | {c['cpu_ms_per_event']:.3f} |"
        )
    bound = st["ratios"].get("goldstream_scaling_bound")
    if bound is not None:
        lines += [
            "",
            f"The most two goldstream workers can reach on this machine: **{bound:.2f}x** (all cores over "
            "the cores the one-worker run kept busy).",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small workloads (a smoke run, about 5 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", choices=BENCHMARKS, action="append", help="run only these; the others' last JSON is kept")
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
        if args.only and name not in args.only:
            summary[key] = json.loads((args.out / f"{key}.json").read_text())
            continue
        summary[key], seconds[key] = run(name, args.out, args.quick)
    summary["rerun"] = list(args.only or BENCHMARKS)
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
