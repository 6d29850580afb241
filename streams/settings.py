"""Worker settings: from GOLDSTREAM_* environment variables, optionally a JSON or YAML file."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "GOLDSTREAM_"


# settings an earlier version read and this one does not (Faust's web view): accepted, ignored
RETIRED = frozenset({"web_enabled", "web_port"})
STEPS = frozenset({"score", "proficiency"})


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything a worker needs beyond the projects' criteria (which live on `projects`)."""

    kafka_bootstrap: str = "127.0.0.1:29192"
    redis_url: str = "redis://127.0.0.1:26479/0"
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster: use redis-py's cluster client
    services_kind: str = "external"  # "embedded": Tansu, whose producer takes no idempotence
    topic_prefix: str = "goldstream."
    key_prefix: str = "gs"
    app_id: str = "goldstream"
    partitions: int = 4
    replication_factor: int = 1  # copies of each topic partition goldstream creates (3 on a cluster)
    min_insync_replicas: int = 0  # acks=all writes need this many copies (0: the broker's default)
    unknown_projects: str = "default"  # or "deadletter"
    dedup_ttl_s: int = 7 * 86_400
    # an item's state is kept this long after its latest input, in event time (0: for ever); then
    # a marker for as long again, so that a late review of it is dead-lettered as item_expired
    item_retention_s: float = 30 * 86_400.0
    batch_max: int = 500
    batch_within_s: float = 0.2
    # the broker may hold the proficiency step's fetch this long to fill a batch: alerts may wait
    # that long, and a batch's fixed cost (reads before and after, alerts) is then shared by
    # more scores, which leaves the CPU to the score step whose latency reviewers see
    proficiency_linger_ms: int = 50
    # which steps this process runs: "score" (with its consensus timer), "proficiency", or both;
    # in separate processes a busy proficiency step cannot hold the score step's event loop
    steps: str = "score,proficiency"
    consensus_check_s: float = 30.0
    session_timeout_s: float = 10.0
    log_level: str = "warning"
    # a worker is either working or gone (streams.watchdog)
    stall_timeout_s: float = 60.0  # lag and no progress this long: exit for the supervisor (0: off)
    watch_every_s: float = 5.0
    ready_max_lag: int = 10_000  # /ready fails above this many records of lag
    health_port: int = 6068  # /healthz and /ready (0: off)
    shutdown_timeout_s: float = 30.0  # a stop signal not obeyed by then ends the process
    loop_block_s: float = 120.0  # an event loop stuck this long ends the process
    fault: str = ""  # tests only: fault injection (streams.worker.Fault)
    redis_lost_state: str = "rebuild"  # or "stop": what a worker does at start when Redis lost its state
    # secured services (streams.security): Kafka SASL / TLS, a Redis ACL user and TLS
    kafka_security_protocol: str = "PLAINTEXT"  # SSL, SASL_PLAINTEXT, SASL_SSL
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"  # or PLAIN, SCRAM-SHA-256
    kafka_username: str = ""
    kafka_password: str = ""  # secret: masked in repr, never logged
    kafka_password_file: str = ""  # or the password in a file (a mounted secret)
    kafka_ssl_cafile: str = ""  # the CA the broker's certificate is checked against (else the system's)
    kafka_ssl_certfile: str = ""  # mutual TLS: the client's certificate and key
    kafka_ssl_keyfile: str = ""
    redis_username: str = ""  # an ACL user
    redis_password: str = ""  # secret: masked in repr, never logged
    redis_password_file: str = ""
    redis_ssl_cafile: str = ""  # with a rediss:// URL
    redis_ssl_certfile: str = ""
    redis_ssl_keyfile: str = ""

    def __repr__(self) -> str:
        """Secrets masked: settings are logged and printed, passwords must not be."""
        from goldstream.streams.security import MASK, SECRET_FIELDS

        def shown(name: str) -> str:
            value = getattr(self, name)
            return MASK if name in SECRET_FIELDS and value else repr(value)

        return f"Settings({', '.join(f'{f.name}={shown(f.name)}' for f in dataclasses.fields(self))})"

    def kafka(self) -> dict[str, Any]:
        """Security options of every aiokafka client (none for PLAINTEXT)."""
        from goldstream.streams.security import kafka_options

        return kafka_options(self)

    def redis(self) -> dict[str, Any]:
        """Options of every Redis client beside its URL: ACL user, password, TLS files."""
        from goldstream.streams.security import redis_options

        return redis_options(self)

    @classmethod
    def load(
        cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then the file, then GOLDSTREAM_* variables, then explicit overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                values.update(yaml.safe_load(text) or {})
            else:
                values.update(json.loads(text))
        env = os.environ if environ is None else environ
        aliases = {"KAFKA_BOOTSTRAP": "kafka_bootstrap", "REDIS_URL": "redis_url", "SERVICES_KIND": "services_kind"}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = aliases.get(key[len(ENV_PREFIX) :], key[len(ENV_PREFIX) :].lower())
            if name in names:
                values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in RETIRED:  # a settings file written for an earlier version still loads
            values.pop(name, None)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        settings = cls(**{f.name: _coerce(f.type, values[f.name]) for f in dataclasses.fields(cls) if f.name in values})
        settings.step_names()  # a typo in `steps` fails here, not in a worker that runs nothing
        return settings

    def step_names(self) -> set[str]:
        """The steps this process runs (`steps`), checked."""
        names = {x.strip() for x in self.steps.split(",") if x.strip()}
        if not names or names - STEPS:
            raise ValueError(f"steps must name some of {', '.join(sorted(STEPS))}, not {self.steps!r}")
        return names


def _coerce(kind: Any, value: Any) -> Any:
    kind = str(kind)
    if kind == "bool" and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


@dataclass(frozen=True)
class Endpoints:
    """How to reach the broker and Redis; `kind` says which flavour, for client quirks."""

    bootstrap_servers: str
    redis_url: str
    kind: str = "external"  # "external" (Apache Kafka + redis-server) or "embedded"
    kafka: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # Settings.kafka()
    redis: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # Settings.redis()

    @property
    def idempotent_producer(self) -> bool:
        """Tansu (embedded) answers InitProducerId with an error, so producers skip idempotence there."""
        return self.kind != "embedded"

    def producer_options(self) -> dict[str, Any]:
        return {"enable_idempotence": self.idempotent_producer, "acks": "all"}
