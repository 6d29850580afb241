"""The throughput baseline: a Faust agent that only consumes goldstream's input topics and
forwards each event, unchanged, to one output topic.

It is built from the same `streams.app.base_app` (same broker, commit and producer settings) and
reads the same topics as goldstream's `score` agent, so the ratio between the two measures what
scoring, item state, Redis and the extra output cost, not Faust itself.

    GOLDSTREAM_TOPIC_PREFIX=... python -m benchmarks.forward_app
"""

from __future__ import annotations

import asyncio

import faust

from goldstream.commands import endpoints
from goldstream.settings import Settings
from streams.app import SCORE_INPUTS, base_app, raw_topic
from streams.topics import Topics, ensure_topics

FORWARDED = "forwarded"  # the output topic, under the same prefix (created by the benchmark)


def create_forwarder(settings: Settings) -> faust.App:
    app = base_app(settings)
    topics = Topics(settings.topic_prefix)
    out = raw_topic(app, settings.topic_prefix + FORWARDED, partitions=settings.partitions)

    @app.agent(raw_topic(app, *(topics.name(t) for t in SCORE_INPUTS)), name="forward")
    async def forward(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await out.send(key=event.message.key, value=event.message.value)

    return app


def main() -> None:
    settings = Settings.load()
    asyncio.run(ensure_topics(endpoints(settings), Topics(settings.topic_prefix), settings.partitions))
    faust.Worker(create_forwarder(settings), loglevel=settings.log_level, quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
