"""The benchmarks' own arithmetic, so that the figures they print mean what they say."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import orjson
import pytest
from goldstream.streams.settings import Settings
from redis.asyncio import Redis

from benchmarks.qc_bench import evaluate, independent_case, own_case, run_goldstream
from benchmarks.replay_bench import run as replay_bench
from benchmarks.stream_bench import CpuMeter, latencies, listener_pid, percentiles
from goldstream.services import Endpoints
from tests.conftest import drop_keys, keys_left


def _score(project: str, ann: str, kind: str, n: int) -> bytes:
    return orjson.dumps({"event_id": f"s{n}", "project_id": project, "annotation_event_id": ann, "kind": kind})


def test_latencies_wait_for_the_annotation_that_completes_the_round() -> None:
    stamps = {"a1": ("i1", 100.0), "a2": ("i1", 101.0), "a3": ("i1", 103.0), "g1": ("i2", 102.0), "x": ("i3", 50.0)}
    arrivals = [  # (arrived, produced by the worker, score)
        (102.5, 102.4, _score("p", "g1", "gold", 1)),
        (103.2, 103.05, _score("p", "a1", "consensus", 2)),
        (103.2, 103.05, _score("p", "a2", "consensus", 3)),
        (103.2, 103.05, _score("p", "a3", "consensus", 4)),
        (103.3, 103.05, _score("p", "a3", "consensus", 4)),  # a re-delivery counts once
        (104.0, 103.9, _score("other", "a1", "consensus", 5)),  # another project's annotation with the same id
        (130.0, 129.0, _score("p", "x", "consensus", 6)),  # a round short of overlap, closed by timeout
    ]
    lat = latencies(stamps, arrivals, overlap=3, project="p")
    assert lat["gold"] == pytest.approx([0.5])
    assert lat["consensus"] == pytest.approx([0.2, 0.2, 0.2])
    assert lat["timeout_closed"] == pytest.approx([80.0])
    assert lat["worker"] == pytest.approx([0.4, 0.05, 0.05, 0.05])  # where the time went: in the worker,
    assert lat["delivery"] == pytest.approx([0.1, 0.15, 0.15, 0.15])  # and after it produced the score
    # a probe's warm-up and its measured part: each score by when its wait started
    warm = latencies(stamps, arrivals, overlap=3, project="p", window=(-float("inf"), 102.0))
    measured = latencies(stamps, arrivals, overlap=3, project="p", window=(102.0, float("inf")))
    assert warm["gold"] == [] and warm["consensus"] == [] and warm["worker"] == []
    assert measured["gold"] == pytest.approx([0.5]) and measured["consensus"] == pytest.approx([0.2, 0.2, 0.2])
    early = latencies(stamps, arrivals, overlap=3, project="p", window=(-float("inf"), 103.0))
    assert early["gold"] == pytest.approx([0.5]) and early["consensus"] == []  # its round completed at 103
    p = percentiles([0.010, 0.020, 0.030, 0.040, 1.0])
    assert p["n"] == 5 and p["p50_ms"] == 30.0 and p["max_ms"] == 1000.0 and p["p50_ms"] < p["p95_ms"] < p["p99_ms"]
    assert percentiles([])["p50_ms"] is None


@pytest.mark.parametrize("family", ["own", "independent"])
def test_qc_figures_on_a_small_workforce(services: Endpoints, family: str) -> None:
    """goldstream's escalations must beat a random audit of the same size, its levels must rank
    workers like their true skill, and the drifting workers must be alerted on."""
    case = own_case(21, 300) if family == "own" else independent_case(5, 500)

    async def main() -> tuple:
        redis = Redis.from_url(services.redis_url)
        try:
            return await run_goldstream(case.events, redis, "test-qc-bench")
        finally:
            await redis.aclose()
            await drop_keys(services.redis_url, "test-qc-bench")

    result, prof = asyncio.run(main())
    g = evaluate(case, result, prof, 0.75)
    assert g["bad_caught_share"] > g["budget_share"] + 0.2  # a random audit catches its budget share
    assert g["precision"] > 0.5 and g["risk_auc"] > 0.75
    assert g["spearman_level"] > 0.7
    assert int(g["drift_detected"].split("/")[0]) >= 1


def test_the_replay_benchmark_times_both_ways_on_every_workforce_and_leaves_no_keys(services: Endpoints) -> None:
    figures = asyncio.run(replay_bench(Settings.load(redis_url=services.redis_url), items=40, repeats=1))
    rows = figures["replay"]
    assert [r["workforce"] for r in rows] == ["independent", "independent-matched", "own"]
    for r in rows:
        assert r["scores"] == r["scores_batch_1"] > 0  # the same history scored either way
        assert r["annotations_per_s"] > 0 and r["batch_1_annotations_per_s"] > 0

    assert keys_left(services.redis_url, "bench-replay-*") == []


def test_the_timer_benchmark_loads_every_state_through_the_old_index_and_none_through_the_sets(
    services: Endpoints,
) -> None:
    from benchmarks.timer_bench import run as timer_bench

    row = asyncio.run(timer_bench(Settings.load(redis_url=services.redis_url), items=50))
    assert row["whole_index"]["loaded"] == 50 and row["whole_index"]["bytes"] > 50 * 1000
    assert row["per_project_sets"]["loaded"] == 0  # none of the rounds is due for an hour

    assert keys_left(services.redis_url, "bench-timer-*") == []


def test_the_state_benchmark_finds_whole_states_cost_more_per_annotation_as_items_grow(services: Endpoints) -> None:
    from benchmarks.state_bench import run as state_bench

    rows = asyncio.run(state_bench(Settings.load(redis_url=services.redis_url), [2, 8], items=5))
    for kind in ("classification", "boxes"):
        two, eight = (r for r in rows if r["content"] == kind)
        # whole states grow with the annotations they hold; a head and one annotation hardly
        assert eight["whole_state"]["input_bytes"] > 2 * two["whole_state"]["input_bytes"]
        assert eight["head_and_annotations"]["input_bytes"] < 2 * two["head_and_annotations"]["input_bytes"]

    assert keys_left(services.redis_url, "bench-state-*") == []


def test_the_bridge_benchmark_times_the_bridge_and_the_bare_receiver_on_the_same_deliveries(
    services: Endpoints,
) -> None:
    from benchmarks.bridge_bench import run as bridge_bench

    figures = bridge_bench(60, services)
    ours, floor = figures["bridge"]
    assert ours["name"].startswith("goldstream bridge") and floor["name"].startswith("bare aiohttp")
    for r in (ours, floor):
        assert r["n"] == 40 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["deliveries_per_s"] > 0
    assert figures["ratios"]["p99_vs_receiver"] == round(ours["p99_ms"] / floor["p99_ms"], 2)


def test_the_ops_benchmark_times_metrics_against_the_engine_and_the_api_and_leaves_no_keys(services: Endpoints) -> None:
    from benchmarks.ops_bench import run as ops_bench

    figures = asyncio.run(ops_bench(Settings.load(redis_url=services.redis_url), items=40, requests=3))
    assert figures["annotations"] > 0 and figures["outputs"] > figures["annotations"] / 2 and figures["workers"] > 1
    assert 0 < figures["metrics_us_per_annotation"] and 0 < figures["replay_us_per_annotation"]
    assert 0 < figures["metrics_share"] < 1
    assert set(figures["api"]) == {"leaderboard", "labels", "report", "worker"}

    assert keys_left(services.redis_url, "bench-ops-*") == []


_BURN = """
import sys, time
sys.stdout.write("ready\\n"); sys.stdout.flush()  # started: the meter starts after this
sys.stdin.readline()  # go
start = time.process_time()
while time.process_time() - start < float(sys.argv[1]):  # its own CPU time: the same on any machine
    pass
sys.stdout.write("done\\n"); sys.stdout.flush(); sys.stdin.read()
"""


def test_the_cpu_meter_counts_workers_and_services_apart_from_the_machine_and_bounds_scaling() -> None:
    worker, service = (
        subprocess.Popen(
            [sys.executable, "-c", _BURN, seconds],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for seconds in ("0.4", "0.2")
    )
    try:
        for child in (worker, service):
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        meter = CpuMeter([worker.pid], {"broker": service.pid})
        for child in (worker, service):
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in (worker, service):
            assert child.stdout is not None and child.stdout.readline() == b"done\n"  # its CPU spent
        cpu = meter.read(events=100)
    finally:
        for child in (worker, service):
            child.kill()
            child.wait()
    spent = cpu["worker_cores"] * cpu["seconds"]
    assert 0.38 <= spent <= 0.6  # its 0.4 s, counted in jiffies of 10 ms
    assert 0.18 <= cpu["broker_cores"] * cpu["seconds"] <= 0.4  # the service's 0.2 s, by its pid
    busy = cpu["machine_cores"] * cpu["seconds"]
    assert busy >= spent + 0.18 - 0.1  # the machine saw at least both (its ticks are sampled)
    assert cpu["worker_cpu_ms_per_event"] == pytest.approx(1000 * spent / 100, rel=0.01)
    assert cpu["scaling_bound"] == pytest.approx(meter.cores / cpu["machine_cores"], rel=0.01)


def test_a_service_is_found_by_the_port_it_listens_on() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert listener_pid(listening.getsockname()[1]) == os.getpid()
    with socket.socket() as bound:  # bound but not listening: not a service
        bound.bind(("127.0.0.1", 0))
        assert listener_pid(bound.getsockname()[1]) is None


def test_the_summary_shows_where_each_runs_cpu_went_and_the_bound_it_leaves_two_workers() -> None:
    import copy
    import json
    from pathlib import Path

    from benchmarks.run_all import markdown

    summary = json.loads((Path(__file__).parent.parent / "benchmarks/results/summary.json").read_text())
    cpu = {"machine_cores": 1.25, "worker_cores": 0.875, "kafka_cores": 0.125, "redis_cores": 0.0625}
    cpu |= {"harness_cores": 0.1875, "cpu_ms_per_event": 0.5}
    for row in summary["stream"]["throughput"]:
        row["cpu"] = cpu
    summary["stream"]["ratios"]["goldstream_scaling_bound"] = 1.6
    summary["stream"]["latency"][0] |= {"redis_aof_rewrites": 7, "warmup_s": 5}
    text = markdown(summary)
    assert "| goldstream | 1 | 1.25 | 0.88 | 0.12 | 0.06 | 0.19 | 0.500 |" in text
    assert "two goldstream workers can reach on this machine: **1.60x**" in text
    assert "(5 s) | 7 |" in text
    older = copy.deepcopy(summary)  # a run before the meter: no CPU table, no bound
    for row in older["stream"]["throughput"]:
        del row["cpu"]
    assert "cores busy" not in markdown(older)


def test_the_scoring_benchmark_runs_the_sides_of_a_ratio_in_turn_and_keeps_each_rounds_rates() -> None:
    from benchmarks.scoring_bench import median_ratio, rates

    calls: list[str] = []
    best, rounds = rates([lambda: calls.append("a"), lambda: calls.append("b")], 10, 3)
    assert calls == ["a", "b"] * 3
    assert len(rounds) == 3 and all(len(r) == 2 for r in rounds)
    assert best == [max(r[0] for r in rounds), max(r[1] for r in rounds)]
    assert median_ratio([[4.0, 2.0], [9.0, 3.0], [10.0, 1.0]], 0, 1) == 3.0
