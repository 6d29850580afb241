"""Prometheus metrics of a worker process, served at `/metrics` beside `/healthz` (issue #13).

Figures a platform team scrapes and alerts on: what was processed (annotations scored by project
and kind, escalations by reason, alerts, dead letters by reason), how good it was (the item-score
histogram by project), and whether the pipeline keeps up (processing latency and batch sizes by
step, consumer lag per partition, Redis retries). Base units, `_total` counters, the
`goldstream_` prefix, and no per-worker label: a worker's figures come from the query API, not
from Prometheus series (a label per annotator would grow without bound).

Counted as the worker emits, after Kafka acknowledged: a batch redelivered after a crash is
counted again here (its effects in Redis are not), which is what "work done" means to a scraper.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from goldstream.schemas.messages import DeadLetter, Escalation, QualityAlert, ScoreRecord
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _Retries(Collector):
    """Redis retries, read from the guard that counts them (one counter, no second bookkeeping)."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "goldstream_redis_retries", "Redis calls retried during outages (RedisGuard)", value=self.guard.retries
        )


class Metrics:
    """One worker process's metrics, in a registry of its own."""

    def __init__(self, guard: Any = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.scored = Counter("goldstream_annotations_scored", "ScoreRecords emitted", ["project", "kind"], registry=r)
        self.escalations = Counter("goldstream_escalations", "escalations emitted, by reason", ["project", "reason"],
                                   registry=r)  # fmt: skip
        self.alerts = Counter("goldstream_alerts", "quality alerts emitted", ["project", "scope", "state"], registry=r)
        self.dead_letters = Counter(
            "goldstream_dead_letters", "inputs dead-lettered, by reason", ["reason"], registry=r
        )
        self.item_score = Histogram("goldstream_item_score", "item scores of ScoreRecords", ["project"],
                                    buckets=SCORE_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram(
            "goldstream_processing_latency_seconds",
            "from an input's Kafka timestamp to its outputs acknowledged, by step",
            ["step"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch = Histogram("goldstream_batch_size_records", "records per batch, by step", ["step"],
                               buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.expired = Counter("goldstream_items_expired", "item states past item_retention_s (made markers, "
                               "or markers deleted)", registry=r)  # fmt: skip
        self.lag = Gauge("goldstream_consumer_lag_records", "records not yet committed, by step and partition",
                         ["step", "topic", "partition"], registry=r)  # fmt: skip
        if guard is not None:
            r.register(_Retries(guard))

    def emitted(self, messages: Iterable[object]) -> None:
        """Count what a step emitted (Kafka acknowledged it)."""
        for m in messages:
            if isinstance(m, ScoreRecord):
                self.scored.labels(m.project_id, m.kind.value).inc()
                if m.result.score is not None:
                    self.item_score.labels(m.project_id).observe(m.result.score)
            elif isinstance(m, Escalation):
                for reason in m.reasons:
                    self.escalations.labels(m.project_id, reason.value).inc()
            elif isinstance(m, QualityAlert):
                self.alerts.labels(m.project_id, m.scope.value, m.state).inc()
            elif isinstance(m, DeadLetter):
                self.dead_letters.labels(m.reason).inc()

    def items_expired(self, n: int) -> None:
        self.expired.inc(n)

    def batch_done(self, step: str, timestamps_ms: Sequence[int]) -> None:
        """A batch's records, applied and their outputs acknowledged, by their Kafka timestamps."""
        self.batch.labels(step).observe(len(timestamps_ms))
        now = time.time()
        observe = self.latency.labels(step).observe
        for ts in timestamps_ms:
            observe(max(now - ts / 1000, 0.0))

    def set_lag(self, step: str, committed: dict[Any, int], ends: dict[Any, int]) -> None:
        for tp, end in ends.items():
            self.lag.labels(step, tp.topic, str(tp.partition)).set(max(end - max(committed.get(tp, -1), 0), 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
