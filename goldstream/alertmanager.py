"""`goldstream alerts forward`: quality alerts to Prometheus Alertmanager (issue #13).

Alertmanager routes, groups, silences and notifies; goldstream decides when quality dropped. The
forwarder reads the `alerts` topic from its start (it is small: one message per change of a
scope's state), keeps each alert's latest state, and posts to Alertmanager's `POST /api/v2/alerts`:
a firing alert when it fires and again every `resend_s` (Alertmanager resolves an alert it has
not heard of for `resolve_timeout`, 5 minutes by default, so it must be re-sent), and a resolved
one once, with `endsAt`. Reading from the start on every run means a restarted forwarder re-sends
what is firing, with no offsets or state of its own; running two is harmless (Alertmanager
de-duplicates by labels).

Labels: `alertname` (`goldstream_<metric>`), `project`, `scope`, `scope_id`, `metric`,
`severity`; annotations carry the value, target, window and detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from goldstream import schemas as s
from goldstream.commands import endpoints, topic_partitions
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics

log = logging.getLogger("goldstream.alertmanager")


def labels_of(a: s.QualityAlert) -> dict[str, str]:
    return {
        "alertname": f"goldstream_{a.metric}",
        "project": a.project_id,
        "scope": a.scope.value,
        "scope_id": a.scope_id,
        "metric": a.metric,
        "severity": a.severity,
    }


def payload(a: s.QualityAlert, generator_url: str | None = None) -> dict[str, Any]:
    """One alert as Alertmanager's API v2 takes it: a firing one open-ended, a resolved one
    ending when goldstream resolved it."""
    annotations = {
        "summary": f"{a.scope.value} {a.scope_id} of {a.project_id}: {a.metric} {_num(a.value)} "
        f"(target {_num(a.target)})",
        "value": _num(a.value),
        "target": _num(a.target),
        "window": a.window,
    }
    if a.detail:
        annotations["description"] = a.detail
    out: dict[str, Any] = {"labels": labels_of(a), "annotations": annotations, "startsAt": a.raised_at.isoformat()}
    if a.state == "resolved":
        out["endsAt"] = a.raised_at.isoformat()
    if generator_url:
        out["generatorURL"] = generator_url
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@dataclass
class Forwarder:
    """The latest state of each alert, and what to post."""

    url: str
    resend_s: float = 60.0
    generator_url: str | None = None
    latest: dict[tuple[str, ...], s.QualityAlert] = field(default_factory=dict)
    firing_since: dict[tuple[str, ...], s.QualityAlert] = field(default_factory=dict)
    sent: int = 0

    def take(self, a: s.QualityAlert) -> s.QualityAlert | None:
        """Record an alert; the alert to post now, or None (a batch verdict is a report, and a
        repeat of the state it already has changes nothing)."""
        if a.scope is s.AlertScope.BATCH:
            return None
        key = tuple(labels_of(a)[k] for k in ("project", "scope", "scope_id", "metric"))
        before = self.latest.get(key)
        self.latest[key] = a
        if a.state == "firing":
            self.firing_since.setdefault(key, a)
        elif self.firing_since.pop(key, None) is None:
            return None  # resolved without having fired: nothing to close
        if before is not None and before.state == a.state == "firing":
            return None  # still firing: the periodic re-send carries it
        return a

    def firing(self) -> list[s.QualityAlert]:
        return [self.latest[k] for k in self.firing_since]

    async def post(self, http: aiohttp.ClientSession, alerts: list[s.QualityAlert]) -> bool:
        if not alerts:
            return True
        body = [payload(a, self.generator_url) for a in alerts]
        try:
            async with http.post(f"{self.url.rstrip('/')}/api/v2/alerts", json=body) as r:
                if r.status >= 300:
                    log.warning("Alertmanager answered %d: %s", r.status, (await r.text())[:300])
                    return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("Alertmanager unreachable (%s); re-sending on the next round", exc)
            return False
        self.sent += len(body)
        return True


async def forward(
    settings: Settings, alertmanager: str, *, resend_s: float = 60.0, stop: asyncio.Event | None = None,
    on_round: Callable[[Forwarder], None] | None = None,
) -> Forwarder:  # fmt: skip
    """Follow the alerts topic into Alertmanager until `stop` is set."""
    stop = stop or asyncio.Event()
    fwd = Forwarder(alertmanager, resend_s)
    ep = endpoints(settings)
    name = Topics(settings.topic_prefix).name("alerts")
    consumer = AIOKafkaConsumer(bootstrap_servers=ep.bootstrap_servers, **ep.kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not (numbers := await topic_partitions(ep, name)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
                if stop.is_set():
                    return fwd
            parts = [TopicPartition(name, p) for p in numbers]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            end = await consumer.end_offsets(parts)
            # the history first: only its outcome is posted (what fires now), not every change
            while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
                    for r in records:
                        if (a := _decode(r.value)) is not None:
                            fwd.take(a)
            pending = fwd.firing()
            next_resend = asyncio.get_running_loop().time() + resend_s
            while not stop.is_set():
                if await fwd.post(http, pending):
                    pending = []  # else kept: posted again on the next round
                if on_round is not None:
                    on_round(fwd)
                got = await consumer.getmany(timeout_ms=int(min(resend_s, 1.0) * 1000), max_records=500)
                for records in got.values():
                    for r in records:
                        if (a := _decode(r.value)) is not None and (change := fwd.take(a)) is not None:
                            pending.append(change)
                now = asyncio.get_running_loop().time()
                if now >= next_resend:
                    pending += [a for a in fwd.firing() if a not in pending]
                    next_resend = now + resend_s
    finally:
        await consumer.stop()
    return fwd


def _decode(value: bytes | None) -> s.QualityAlert | None:
    if value is None:
        return None
    try:
        return s.decode(s.QualityAlert, value)
    except s.SchemaError:
        return None


async def run(settings: Settings, alertmanager: str, resend_s: float) -> None:
    """`goldstream alerts forward`: until SIGTERM / SIGINT."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"forwarding {settings.topic_prefix}alerts to {alertmanager} (re-sending firing every {resend_s:g} s)",
          flush=True)  # fmt: skip
    fwd = await forward(settings, alertmanager, resend_s=resend_s, stop=stop)
    print(f"stopped after {fwd.sent} alert posts; {len(fwd.firing())} firing", flush=True)


__all__ = ["Forwarder", "forward", "labels_of", "payload", "run"]
