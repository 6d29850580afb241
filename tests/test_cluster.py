"""A replicated Kafka (three KRaft nodes, replication factor 3, min.insync.replicas 2): one broker
killed mid-stream, and Redis still ends equal to a replay of the same events (#15)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream.commands import endpoints
from goldstream.services import Endpoints
from tests.conftest import REPO, drop_keys
from tests.pipeline import supervised
from tests.test_faults import begin, finish, scored, start

CLUSTER = REPO / "ops" / "kafka-cluster"


def cluster(*args: str) -> None:
    done = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def replicated() -> Iterator[dict[str, str]]:
    cluster("up")
    env = dict(line.split("=", 1) for line in subprocess.check_output([str(CLUSTER), "env"], text=True).split())
    yield env
    cluster("down")


@pytest.fixture
def settings(replicated: dict[str, str], services: Endpoints, run_id: str) -> Iterator[Settings]:
    st = Settings(
        kafka_bootstrap=replicated["GOLDSTREAM_KAFKA_BOOTSTRAP"], redis_url=services.redis_url,
        topic_prefix=f"cluster-{run_id}.", key_prefix=f"cluster-{run_id}", app_id=f"gs-{run_id}", partitions=4,
        replication_factor=3, min_insync_replicas=2, consensus_check_s=2.0, health_port=0, stall_timeout_s=30.0,
        watch_every_s=1.0,
    )  # fmt: skip
    asyncio.run(ensure_topics(endpoints(st), Topics(st.topic_prefix), 4, 3, 2))
    yield st
    cluster("start", "2")  # whatever the test did to it
    asyncio.run(delete_topics(endpoints(st), Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-replay"):
        asyncio.run(drop_keys(st.redis_url, prefix))


@pytest.mark.timeout(600)
def test_a_broker_killed_mid_stream_of_a_replicated_kafka_loses_nothing_and_counts_nothing_twice(
    settings: Settings, tmp_path: Path
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def described() -> list[dict]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            return await admin.describe_topics([Topics(settings.topic_prefix).name("annotations")])
        finally:
            await admin.close()

    (topic,) = asyncio.run(described())
    assert all(len(p["replicas"]) == 3 for p in topic["partitions"])  # three copies of every partition
    workers = [start(settings, tmp_path / "w0.log")]
    try:
        everything, rest, expected = begin(settings, workers[0])
        before = scored(settings)
        t0 = time.monotonic()
        cluster("stop", "2")  # SIGKILL: no orderly leadership handover
        from tests.pipeline import send

        send(settings, rest)  # acks=all from the two live copies
        restarts = supervised(
            lambda: scored(settings) >= expected,
            300,
            "every score with a broker down",
            workers,
            lambda _, n: start(settings, tmp_path / f"w{n}.log"),
        )
        finish(settings, workers, everything, expected)
        print(f"\nbroker killed after {before} scores: recovered in {time.monotonic() - t0:.1f} s, "
              f"{restarts} watchdog restart(s)")  # fmt: skip
    finally:
        for w in workers:
            w.stop()
