"""`goldstream bridge`: labeling tools' webhooks in, goldstream messages on Kafka out (issue #12).

Label Studio posts every annotation event to `POST /label-studio/webhook`. It waits about a
second for the answer and never retries, so the bridge converts, publishes, waits for Kafka's
acknowledgement and answers at once; what it missed while down, `goldstream sync label-studio`
pulls over Label Studio's API (the same ids, so nothing is counted twice). Ids are derived from
the delivery: a redelivery publishes the same event id, an update (a new `updated_at`) a
resubmission. A delivery that cannot be converted is answered 4xx with what is wrong, and its raw
body goes to the dead-letter topic.

Label Studio authenticates only through custom headers it sends with each delivery: configure the
webhook with `X-Goldstream-Token: <token>` and give the bridge the same token
(`GOLDSTREAM_BRIDGE_TOKEN` or `--token-file`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from goldstream import schemas as s
from goldstream.commands import endpoints
from goldstream.label_studio import BadDelivery, LabelStudioProjects, Published, label_studio_messages
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, ensure_topics

TOKEN_HEADER = "X-Goldstream-Token"
WEBHOOK_SOURCE = "label-studio-webhook"
SYNC_SOURCE = "label-studio-sync"
PUBLISH_TIMEOUT_S = 10.0  # Label Studio gives up after about a second; other senders may wait longer


def dead_letter(body: bytes, reason: str, error: str, source: str = WEBHOOK_SOURCE) -> s.DeadLetter:
    """The raw body of a refused delivery, with why; its id depends on the body only, so a
    redelivery of the same bad body is one dead letter."""
    letter = s.DeadLetter.of(
        body, topic=source, partition=-1, offset=-1, reason=reason, error=error, stage="bridge",
        received_at=datetime.now(UTC),
    )  # fmt: skip
    return letter.model_copy(update={"event_id": s.derive_id("deadletter", source, hashlib.sha256(body).hexdigest())})


Send = Callable[[Sequence[Published]], Awaitable[None]]


def app(send: Send, projects: LabelStudioProjects, token: str | None) -> web.Application:
    """The bridge's HTTP application; `send` publishes and returns once Kafka acknowledged."""

    async def label_studio(request: web.Request) -> web.Response:
        if token is not None and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return _error(401, f"missing or wrong {TOKEN_HEADER} header")
        body = await request.read()
        try:
            payload = orjson.loads(body)
            if not isinstance(payload, dict):
                raise BadDelivery("schema", "the body is JSON but not an object")
            messages, ignored = label_studio_messages(payload, projects)
        except orjson.JSONDecodeError as exc:
            return await _refuse(send, body, BadDelivery("undecodable", f"the body is not JSON: {exc}"), 400)
        except BadDelivery as exc:
            return await _refuse(send, body, exc, 422)
        if ignored is not None:
            return web.json_response({"published": [], "ignored": ignored})
        try:
            await asyncio.wait_for(send(messages), PUBLISH_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            # Label Studio will not retry: say so, and how to catch up (the same ids, no double count)
            return _error(503, f"could not publish to Kafka ({type(exc).__name__}); run `goldstream sync "
                          "label-studio` once it is back", "unavailable")  # fmt: skip
        return web.json_response(
            {"published": [{"topic": t, "event_id": m.event_id} for t, _, m in messages], "ignored": None}
        )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    application = web.Application(client_max_size=s.DEFAULT_LIMITS.max_message_bytes)
    application.add_routes([web.post("/label-studio/webhook", label_studio), web.get("/healthz", health)])
    return application


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    return web.json_response({"error": message, **({"reason": reason} if reason else {})}, status=status)


async def _refuse(send: Send, body: bytes, exc: BadDelivery, status: int) -> web.Response:
    await send([("deadletter", None, dead_letter(body, exc.reason, str(exc)))])
    return _error(status, str(exc), exc.reason)


async def pull_label_studio(
    url: str, token: str, ls_project: int | str, projects: LabelStudioProjects
) -> tuple[list[Published], dict[str, int]]:
    """Every annotation of a Label Studio project as the webhook would have delivered it, read
    from its JSON export: the same ids, so what the webhook already published is not counted
    twice (the engine applies an event id once). Refused annotations come back as dead letters."""
    import aiohttp

    headers = {"Authorization": f"Token {token}"}
    params = {"exportType": "JSON", "download_all_tasks": "true"}
    async with (
        aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as http,
        http.get(f"{url.rstrip('/')}/api/projects/{ls_project}/export", params=params) as r,
    ):
        if r.status != 200:
            raise SystemExit(f"Label Studio answered {r.status} for project {ls_project}'s export: {await r.text()}")
        tasks = await r.json(content_type=None)
    out: list[Published] = []
    counts = {"annotations": 0, "gold": 0, "reviews": 0, "ignored": 0, "refused": 0}
    for task in tasks:
        for a in task.get("annotations", []):
            payload = {
                "action": "ANNOTATION_UPDATED",
                "annotation": {**a, "task": task["id"], "project": ls_project},
                "task": {"id": task["id"], "data": task.get("data", {})},  # a review task's fields make a review
            }
            try:
                messages, ignored = label_studio_messages(payload, projects)
            except BadDelivery as exc:
                out.append(("deadletter", None, dead_letter(orjson.dumps(payload), exc.reason, str(exc), SYNC_SOURCE)))
                counts["refused"] += 1
                continue
            counts["ignored"] += ignored is not None
            for topic, key, message in messages:
                counts[topic] += 1
                out.append((topic, key, message))
    return out, counts


async def serve(settings: Settings, host: str, port: int, projects: LabelStudioProjects, token: str | None) -> None:
    """Run the bridge until SIGTERM / SIGINT: one producer (acks from all in-sync replicas)."""
    ep = endpoints(settings)
    topics = Topics(settings.topic_prefix)
    await ensure_topics(ep, topics, settings.partitions)
    producer = AIOKafkaProducer(bootstrap_servers=ep.bootstrap_servers, **ep.producer_options())
    await producer.start()

    async def send(messages: Sequence[Published]) -> None:
        pending = [
            await producer.send(topics.name(t), m.to_bytes(), key=k.encode() if k else None) for t, k, m in messages
        ]
        await asyncio.gather(*pending)

    runner = web.AppRunner(app(send, projects, token), handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]  # the port the system chose for --port 0
        print(f"goldstream bridge on http://{host}:{bound} (POST /label-studio/webhook)", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await producer.stop()


__all__ = [
    "TOKEN_HEADER",
    "BadDelivery",
    "LabelStudioProjects",
    "app",
    "dead_letter",
    "label_studio_messages",
    "pull_label_studio",
    "serve",
]
