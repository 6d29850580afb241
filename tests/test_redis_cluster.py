"""goldstream's state on a Redis Cluster (three primaries, `ops/redis-cluster`): the end-to-end
test, the kill -9 test and their replay-equals-live checks run again with `redis_cluster` on, and a
node restarted without goldstream's scripts is served again (#15)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from goldstream.streams.settings import Settings
from goldstream.streams.state import Increment, Keys, RedisGuard, RedisState, connect
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream.services import Endpoints
from tests import test_pipeline as pipeline_tests
from tests.conftest import REPO, drop_keys
from tests.pipeline import Worker

CLUSTER = REPO / "ops" / "redis-cluster"
pytestmark = pytest.mark.services


def cluster(*args: str) -> str:
    done = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def redis_cluster(services: Endpoints) -> Iterator[str]:
    cluster("up")
    env = dict(line.split("=", 1) for line in cluster("env").split())
    yield env["GOLDSTREAM_REDIS_URL"]


@pytest.fixture
def settings(redis_cluster: str, services: Endpoints, run_id: str) -> Iterator[Settings]:
    st = Settings(
        kafka_bootstrap=services.bootstrap_servers, redis_url=redis_cluster, redis_cluster=True,
        topic_prefix=f"rc-{run_id}.", key_prefix=f"rc-{run_id}", app_id=f"gs-{run_id}", partitions=4,
        consensus_check_s=2.0, health_port=0, stall_timeout_s=30.0,
    )  # fmt: skip
    asyncio.run(ensure_topics(services, Topics(st.topic_prefix), st.partitions))
    yield st
    asyncio.run(delete_topics(services, Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-replay", f"{st.key_prefix}-rebuilt"):
        asyncio.run(drop_keys(st.redis_url, prefix, cluster=True))


def test_keys_of_a_run_spread_over_the_cluster_nodes(settings: Settings) -> None:
    """The cluster is really three nodes and goldstream's slots land on more than one."""

    async def main() -> set[str]:
        client = connect(settings.redis_url, cluster=True)
        try:
            keys = Keys(settings.key_prefix)
            state = RedisState(client, keys, guard=RedisGuard(client))
            incs = [Increment(keys.tag("p", f"w{n}"), f"e{n}", {"totals": {"items": 1}}) for n in range(30)]
            assert all(await state.apply(incs))
            return {client.get_node_from_key(keys.worker("p", f"w{n}")).name for n in range(30)}
        finally:
            await client.aclose()

    assert len(asyncio.run(main())) == 3


def test_stream_end_to_end_on_a_redis_cluster(settings: Settings, tmp_path: Path) -> None:
    worker = Worker(settings, tmp_path / "worker.log").start()
    try:
        pipeline_tests.test_stream_end_to_end(settings, worker, tmp_path)
    finally:
        worker.stop()


@pytest.mark.timeout(900)
def test_kill9_midstream_then_restart_equals_replay_on_a_redis_cluster(settings: Settings, tmp_path: Path) -> None:
    pipeline_tests.test_kill9_midstream_then_restart_equals_replay(settings, tmp_path)


def test_a_cluster_node_that_lost_its_scripts_is_served_again(settings: Settings) -> None:
    """SCRIPT FLUSH on every node (as a restarted node without a script cache): the next batch
    loads the scripts again instead of retrying NOSCRIPT for ever."""

    async def main() -> dict[str, int]:
        client = connect(settings.redis_url, cluster=True)
        keys = Keys(settings.key_prefix)
        try:
            state = RedisState(client, keys, guard=RedisGuard(client, cap_s=0.2))
            tag = keys.tag("p", "w")
            await state.apply([Increment(tag, "e1", {"totals": {"items": 1}})])
            await client.script_flush()
            await asyncio.wait_for(state.apply([Increment(tag, "e2", {"totals": {"items": 1}})]), 30)
            return await state.counters(keys.worker("p", "w"))
        finally:
            await client.aclose()

    assert asyncio.run(main()) == {"items": 2}


def test_settings_name_the_cluster_to_a_child_worker(settings: Settings) -> None:
    from goldstream.proc import worker_env

    env = worker_env(dataclasses.replace(settings, item_retention_s=5.0))
    assert Settings.load(environ=env).redis_cluster is True
    assert Settings.load(environ=env).item_retention_s == 5.0
