"""`/metrics` on a worker: Prometheus' text format, counters equal to what was processed (#13)."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest
from goldstream.streams.metrics import Metrics
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics
from prometheus_client.parser import text_string_to_metric_families

from goldstream import schemas as s
from goldstream.commands import committed_to_end, set_criteria
from goldstream.services import Endpoints
from tests.pipeline import Worker, messages_of, send, wait_consumed, wait_for
from tests.scenario import BAD, GOOD, annotation, criteria, gold


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed with Prometheus' own text parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for x in family.samples:
            out[(x.name, tuple(sorted(x.labels.items())))] = x.value
    return out


def test_what_the_worker_emitted_is_counted_by_project_kind_and_reason() -> None:
    m = Metrics()
    c = criteria("p1")
    from goldstream.scoring import score_item
    from goldstream.streams.items import score_record

    a = annotation(1, "g1", "w", BAD)
    rec = score_record(a, s.ScoreKind.GOLD, "gold-g1-0", score_item(BAD, GOOD, c), 1.0).value
    m.emitted([rec, rec, None])
    m.batch_done("score", [1_000, 2_000])
    got = samples(m.exposition().decode())
    assert got[("goldstream_annotations_scored_total", (("kind", "gold"), ("project", "p1")))] == 2
    assert got[("goldstream_item_score_count", (("project", "p1"),))] == 2
    assert got[("goldstream_batch_size_records_count", (("step", "score"),))] == 1
    assert got[("goldstream_processing_latency_seconds_count", (("step", "score"),))] == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(400)
def test_a_workers_metrics_after_a_run_equal_what_it_processed(services: Endpoints) -> None:
    run_id = os.urandom(5).hex()
    port = _free_port()
    settings = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url, topic_prefix=f"met-{run_id}.",
        key_prefix=f"met-{run_id}", app_id=f"met-{run_id}", partitions=2, health_port=port, watch_every_s=0.5,
    )  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(settings.topic_prefix), settings.partitions))
    worker = Worker(settings, Path(tempfile.mkdtemp()) / "worker.log").start()
    try:
        asyncio.run(set_criteria(settings, criteria("p1"), wait_s=90))
        items = [f"g{k}" for k in range(5)]
        send(settings, [gold(i) for i in items])
        wait_consumed(settings, "gold")
        send(settings, [annotation(10 + k, i, "w-bad", BAD) for k, i in enumerate(items)]
             + [annotation(20 + k, i, "w-good", GOOD) for k, i in enumerate(items)],
             raw=[("annotations", b"{not json")])  # fmt: skip
        wait_consumed(settings, "annotations")
        proficiency = f"{settings.app_id}-proficiency"
        wait_for(lambda: asyncio.run(committed_to_end(settings, proficiency, "scores")), 90, "scores counted", [worker])
        scores = messages_of(settings, "scores", s.ScoreRecord)
        escalations = messages_of(settings, "escalations", s.Escalation)
        alerts = messages_of(settings, "alerts", s.QualityAlert)
        letters = messages_of(settings, "deadletter", s.DeadLetter)

        def scrape() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                return samples(r.read().decode())

        # the lag gauge is set by the watchdog's next round: wait for it to read all committed
        wait_for(lambda: sum(v for (n, _), v in scrape().items() if n == "goldstream_consumer_lag_records") == 0
                 and any(n == "goldstream_consumer_lag_records" for n, _ in scrape()), 60, "the lag gauge")  # fmt: skip
        got = scrape()
    finally:
        worker.stop()
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))
    assert len(scores) == 10 and len(letters) == 1
    assert got[("goldstream_annotations_scored_total", (("kind", "gold"), ("project", "p1")))] == 10
    assert got[("goldstream_item_score_count", (("project", "p1"),))] == 10
    assert got[("goldstream_item_score_sum", (("project", "p1"),))] == pytest.approx(
        sum(x.result.score for x in scores))  # type: ignore[attr-defined]  # fmt: skip
    by_reason = {}
    for e in escalations:
        for r in e.reasons:  # type: ignore[attr-defined]
            by_reason[r.value] = by_reason.get(r.value, 0) + 1
    assert by_reason and all(
        got[("goldstream_escalations_total", (("project", "p1"), ("reason", r)))] == n for r, n in by_reason.items()
    )
    assert sum(v for (n, _), v in got.items() if n == "goldstream_alerts_total") == len(alerts) > 0
    assert got[("goldstream_dead_letters_total", (("reason", letters[0].reason),))] == 1  # type: ignore[attr-defined]
    assert got[("goldstream_redis_retries_total", ())] == 0
    assert got[("goldstream_batch_size_records_count", (("step", "score"),))] >= 1
    names = {n for n, _ in got}
    assert all(n.startswith("goldstream_") or n.startswith(("python_", "process_")) for n in names)
    assert not any(k == "worker" or k == "worker_id" for _, labels in got for k, _ in labels)  # no per-worker series
