"""goldstream's topics: their names under a configurable prefix, their keys and their configs.

Gold and project criteria are compacted (the latest answer per key is the state); annotations
and gold share one partition count so that a gold lookup stays local to the worker that owns the
item (co-partitioning, DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, NotControllerError, TopicAlreadyExistsError
from goldstream.schemas.messages import MESSAGES
from goldstream.streams.settings import Endpoints

COMPACTED = {"gold", "projects"}
LOGICAL = tuple(m.topic for m in MESSAGES)
KEYS = {
    "annotations": "item_id",
    "gold": "item_id",
    "reviews": "item_id",
    "scores": "worker_id",
    "escalations": "item_id",
    "alerts": "scope:scope_id",
    "projects": "project_id",
    "deadletter": None,
    "control": "item_id",
}


@dataclass(frozen=True)
class Topics:
    """Physical topic names: `prefix` + logical name (e.g. 'goldstream.annotations')."""

    prefix: str = "goldstream."

    def name(self, logical: str) -> str:
        if logical not in LOGICAL:
            raise KeyError(f"no goldstream topic {logical!r}; topics are {', '.join(LOGICAL)}")
        return self.prefix + logical

    def all(self) -> dict[str, str]:
        return {logical: self.name(logical) for logical in LOGICAL}


def topic_config(logical: str, min_insync_replicas: int = 0) -> dict[str, str]:
    config = {"cleanup.policy": "compact"} if logical in COMPACTED else {}
    if min_insync_replicas:
        config["min.insync.replicas"] = str(min_insync_replicas)
    return config


CONTROLLER_ATTEMPTS = 10


async def live_metadata(admin: AIOKafkaAdminClient) -> Any:
    """The cluster's metadata from whichever broker answers. aiokafka's admin requests go to a
    random known node, which after a broker's loss may be the dead one until the controller
    fences it; the client's own metadata fetch tries the brokers in turn."""
    return await admin._client.fetch_all_metadata()


async def to_controller(admin: AIOKafkaAdminClient, call: Callable[[], Awaitable[Any]]) -> Any:
    """A create / delete request, asked again of the controller the refreshed metadata names
    while the one asked is unreachable (a broker lost: KRaft names a live broker each time)."""
    for attempt in range(CONTROLLER_ATTEMPTS):
        try:
            return await call()
        except (NodeNotReadyError, KafkaConnectionError, NotControllerError):
            if attempt == CONTROLLER_ATTEMPTS - 1:
                raise
            await admin._client.force_metadata_update()
    return None


async def ensure_topics(
    endpoints: Endpoints, topics: Topics, partitions: int = 4, replication: int = 1, min_insync_replicas: int = 0
) -> list[str]:
    """Create every goldstream topic that is missing; return the names created. On a replicated
    cluster: `replication` copies of each partition, and writes (acks=all) refused unless
    `min_insync_replicas` of them have it, so an acknowledged event survives a broker's loss."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=endpoints.bootstrap_servers, client_id="goldstream-admin", **endpoints.kafka
    )
    await admin.start()
    try:
        existing = set((await live_metadata(admin)).topics(exclude_internal_topics=False))
        wanted = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication,
                topic_configs=topic_config(logical, min_insync_replicas),
            )
            for logical, name in topics.all().items()
            if name not in existing
        ]
        if wanted:
            try:
                await to_controller(admin, lambda: admin.create_topics(wanted))
            except TopicAlreadyExistsError:
                pass  # another worker created them first
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def delete_topics(endpoints: Endpoints, topics: Topics) -> None:
    """Delete every goldstream topic under the prefix (tests and `demo` clean up with it)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=endpoints.bootstrap_servers, client_id="goldstream-admin", **endpoints.kafka
    )
    await admin.start()
    try:
        existing = set((await live_metadata(admin)).topics(exclude_internal_topics=False))
        names = [n for n in topics.all().values() if n in existing]
        if names:
            await to_controller(admin, lambda: admin.delete_topics(names))
    finally:
        await admin.close()
