"""`goldstream alerts forward`: quality alerts to Alertmanager's API v2, re-sent while firing (#13)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

from aiohttp import web
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream import schemas as s
from goldstream.alertmanager import Forwarder, forward, payload
from goldstream.commands import publish
from goldstream.services import Endpoints

T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)


def alert(scope: str, scope_id: str, metric: str, state: str, minutes: int, value: float = 0.4) -> s.QualityAlert:
    return s.QualityAlert(
        event_id=f"{scope}-{scope_id}-{metric}-{state}-{minutes}", project_id="p1", scope=s.AlertScope(scope),
        scope_id=scope_id, metric=metric, value=value, target=0.7, window="24h",
        severity="critical" if scope == "worker" else "warning", state=state,  # type: ignore[arg-type]
        raised_at=T0 + timedelta(minutes=minutes), detail="below target",
    )  # fmt: skip


def test_an_alert_is_posted_with_the_labels_alertmanager_routes_on() -> None:
    firing = payload(alert("worker", "w-7", "qualification", "firing", 0))
    assert firing["labels"] == {"alertname": "goldstream_qualification", "project": "p1", "scope": "worker",
                                "scope_id": "w-7", "metric": "qualification", "severity": "critical"}  # fmt: skip
    assert firing["startsAt"] == "2026-12-01T09:00:00+00:00" and "endsAt" not in firing
    assert firing["annotations"]["description"] == "below target" and firing["annotations"]["target"] == "0.7"
    resolved = payload(alert("worker", "w-7", "qualification", "resolved", 30))
    assert resolved["endsAt"] == "2026-12-01T09:30:00+00:00"


def test_a_repeat_changes_nothing_and_a_resolution_closes_only_what_fired() -> None:
    fwd = Forwarder("http://am")
    first = alert("label", "car", "f1", "firing", 0)
    assert fwd.take(first) == first
    assert fwd.take(alert("label", "car", "f1", "firing", 5)) is None  # still firing: the re-send carries it
    assert fwd.take(alert("label", "bus", "f1", "resolved", 6)) is None  # never fired
    assert fwd.take(alert("label", "car", "f1", "resolved", 9)) is not None and fwd.firing() == []
    assert fwd.take(alert("batch", "b-7", "verdict", "firing", 40)) is None  # a batch verdict is a report


def test_the_forwarder_posts_what_fires_re_sends_it_and_resolves_it_on_the_real_broker(services: Endpoints) -> None:
    run_id = os.urandom(5).hex()
    settings = Settings(kafka_bootstrap=services.bootstrap_servers, redis_url=services.redis_url,
                        topic_prefix=f"am-{run_id}.", partitions=1)  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(settings.topic_prefix), 1))

    def send(*alerts: s.QualityAlert) -> None:
        asyncio.run(publish(settings, [("alerts", a.key, a.to_bytes()) for a in alerts]))

    # history before the forwarder starts: one alert fired and resolved, one fires still
    send(alert("worker", "w-1", "qualification", "firing", 0), alert("worker", "w-1", "qualification", "resolved", 10),
         alert("label", "car", "f1", "firing", 12))  # fmt: skip
    posts: list[list[dict]] = []
    refuse = [True]  # Alertmanager answers 503 once: the post is made again

    async def receive(request: web.Request) -> web.Response:
        if refuse[0]:
            refuse[0] = False
            return web.Response(status=503, text="busy")
        posts.append(await request.json())
        return web.json_response({})

    def names(post: list[dict]) -> set[tuple[str, str, bool]]:
        return {(p["labels"]["scope_id"], p["labels"]["metric"], "endsAt" in p) for p in post}

    async def main() -> None:
        app = web.Application()
        app.add_routes([web.post("/api/v2/alerts", receive)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        stop = asyncio.Event()
        task = asyncio.create_task(forward(settings, url, resend_s=0.2, stop=stop))

        async def until(check: object, what: str) -> None:
            for _ in range(600):  # up to 60 s; each round is at most a second
                if check():  # type: ignore[operator]
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}: {posts}")

        await until(lambda: len(posts) >= 3, "the firing alert and two re-sends")
        assert all(names(p) == {("car", "f1", False)} for p in posts)  # w-1 resolved before: never posted
        await asyncio.to_thread(send, alert("project", "p1", "item_score", "firing", 20))
        await until(lambda: ("p1", "item_score", False) in names(posts[-1]), "the new alert")
        await asyncio.to_thread(send, alert("label", "car", "f1", "resolved", 25, value=0.8))
        await until(lambda: any(("car", "f1", True) in names(p) for p in posts), "the resolution")
        seen = len(posts)
        await until(lambda: len(posts) >= seen + 2, "two more re-sends")
        assert all(names(p) == {("p1", "item_score", False)} for p in posts[seen:])  # car no longer re-sent
        stop.set()
        await task
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        asyncio.run(delete_topics(services, Topics(settings.topic_prefix)))
    assert not refuse[0]  # the refused post was made again: the first post received holds the car
