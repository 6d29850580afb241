"""The throughput baseline: a Faust agent that only consumes goldstream's input topics and
forwards each event, unchanged, to one output topic.

goldstream's worker ran as a Faust app with these settings until faust-streaming was found to
commit offsets of events it never processed (docs/reliability.md); it now runs plain aiokafka
consumer groups. A bare Faust agent stays the baseline a user would compare with: the ratio
between the two measures what goldstream costs against the simplest Faust pipeline.

    GOLDSTREAM_TOPIC_PREFIX=... python -m benchmarks.forward_app
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import faust
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics
from goldstream.streams.worker import ITEM_TOPICS

from goldstream.commands import create_topics

FORWARDED = "forwarded"  # the output topic, under the same prefix (created by the benchmark)


def credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The broker credentials of a Faust app from goldstream's security settings, so the baseline
    runs wherever goldstream does (streams.security)."""
    options = settings.kafka()
    if not options:
        return None
    if options["security_protocol"] == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    from faust.types.auth import SASLMechanism

    return faust.SASLCredentials(
        username=options["sasl_plain_username"], password=options["sasl_plain_password"],
        ssl_context=options.get("ssl_context"), mechanism=SASLMechanism(options["sasl_mechanism"]),
    )  # fmt: skip


def base_app(settings: Settings) -> faust.App:
    """The Faust app and its broker settings, without agents (the benchmarks' forwarding baseline
    uses it too, so that both differ only in what their agents do)."""
    embedded = settings.services_kind == "embedded"
    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=credentials(settings),
        store="memory://",
        # Faust makes a data directory even for memory stores; keep it out of the working directory
        datadir=os.path.join(tempfile.gettempdir(), "goldstream-faust-{conf.name}"),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        web_enabled=False,  # the bare agent of the baseline serves no web pages
        producer_acks=-1,
        producer_enable_idempotence=not embedded,
        broker_commit_every=settings.batch_max,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
        topic_allow_declare=True,
        # A worker that dies without leaving its group (kill -9, a lost machine) holds its
        # partitions until its session times out: keep that short. Tansu (embedded) also holds a
        # JoinGroup for up to the rebalance timeout.
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=8.0 if embedded else 2 * settings.session_timeout_s,
        broker_heartbeat_interval=1.0 if embedded else max(settings.session_timeout_s / 5, 1.0),
    )


def raw_topic(app: faust.App, *names: str, partitions: int | None = None) -> faust.TopicT:
    """Topics of raw bytes keys and values: goldstream decodes with `schemas`, not Faust."""
    return app.topic(
        *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=partitions
    )


def create_forwarder(settings: Settings) -> faust.App:
    app = base_app(settings)
    topics = Topics(settings.topic_prefix)
    out = raw_topic(app, settings.topic_prefix + FORWARDED, partitions=settings.partitions)

    @app.agent(raw_topic(app, *(topics.name(t) for t in ITEM_TOPICS)), name="forward")
    async def forward(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await out.send(key=event.message.key, value=event.message.value)

    return app


def main() -> None:
    settings = Settings.load()
    asyncio.run(create_topics(settings))
    faust.Worker(create_forwarder(settings), loglevel=settings.log_level, quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
