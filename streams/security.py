"""How goldstream's clients authenticate and encrypt: Kafka SASL / TLS, Redis ACL users / TLS (#14).

Managed Kafka accepts only SASL over TLS, production Redis wants an ACL user and TLS. Every client
goldstream makes (the worker's, the commands', the bridge's, the API's) takes its options from
here, so one set of settings secures them all:

- Kafka: `kafka_security_protocol` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
  `kafka_sasl_mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), `kafka_username`,
  `kafka_password` or `kafka_password_file`, `kafka_ssl_cafile`, and for mutual TLS
  `kafka_ssl_certfile` / `kafka_ssl_keyfile`;
- Redis: a `rediss://` URL for TLS, `redis_username`, `redis_password` or `redis_password_file`,
  `redis_ssl_cafile`, and for mutual TLS `redis_ssl_certfile` / `redis_ssl_keyfile`.

Secrets never appear in the settings' repr, in errors or in logs: `Settings` masks them, and a
refused login is explained by naming the setting, never its value. A wrong password or an
untrusted certificate fails at once with that explanation (`explain`), not after a hang.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from goldstream.streams.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECRET_FIELDS = frozenset({"kafka_password", "redis_password"})
MASK = "***"


class _KafkaRefusals(logging.Handler):
    """aiokafka logs why a broker refused a connection (a failed SASL login, an untrusted
    certificate) and then raises a bare "Unable to bootstrap": keep the reason, to explain it."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "SaslAuthenticationFailed" in text or "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            self.last = text


KAFKA_REFUSALS = _KafkaRefusals()
logging.getLogger("aiokafka").addHandler(KAFKA_REFUSALS)


class SecurityError(ValueError):
    """Security settings that cannot work; the message names the setting (never a secret)."""


def env_name(field: str) -> str:
    return f"GOLDSTREAM_{field.upper()}"


def secret(settings: Settings, field: str) -> str:
    """A password from its setting, else from the file its `<field>_file` setting names (a
    mounted secret: no password in the environment or the process list)."""
    value = getattr(settings, field)
    path = getattr(settings, f"{field}_file")
    if value and path:
        raise SecurityError(f"give {env_name(field)} or {env_name(field + '_file')}, not both")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise SecurityError(f"{env_name(field + '_file')}: cannot read {path} ({exc.strerror})") from None
    return value


def _file(settings: Settings, field: str) -> str | None:
    path = getattr(settings, field)
    if not path:
        return None
    if not Path(path).is_file():
        raise SecurityError(f"{env_name(field)}: no such file {path}")
    return path


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of Kafka clients: the system's CAs, or `kafka_ssl_cafile`; a client
    certificate when one is given (mutual TLS)."""
    ca, cert, key = (_file(settings, f"kafka_ssl_{x}") for x in ("cafile", "certfile", "keyfile"))
    if bool(cert) != bool(key):
        raise SecurityError("give both GOLDSTREAM_KAFKA_SSL_CERTFILE and GOLDSTREAM_KAFKA_SSL_KEYFILE, or neither")
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of every aiokafka client (producer, consumer, admin)."""
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise SecurityError(
            f"GOLDSTREAM_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, not {protocol!r}"
        )
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = kafka_ssl_context(settings)
    if protocol.startswith("SASL"):
        mechanism = settings.kafka_sasl_mechanism.upper()
        if mechanism not in MECHANISMS:
            raise SecurityError(
                f"GOLDSTREAM_KAFKA_SASL_MECHANISM must be one of {', '.join(MECHANISMS)}, not {mechanism!r}"
            )
        password = secret(settings, "kafka_password")
        if not settings.kafka_username or not password:
            raise SecurityError(
                f"{protocol} needs GOLDSTREAM_KAFKA_USERNAME and GOLDSTREAM_KAFKA_PASSWORD "
                "(or GOLDSTREAM_KAFKA_PASSWORD_FILE)"
            )
        options |= {"sasl_mechanism": mechanism, "sasl_plain_username": settings.kafka_username,
                    "sasl_plain_password": password}  # fmt: skip
    return options


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `streams.state.connect` beside the URL: the ACL user and password,
    TLS files for a `rediss://` URL, and `cluster` for a Redis Cluster."""
    options: dict[str, Any] = {"cluster": True} if settings.redis_cluster else {}
    password = secret(settings, "redis_password")
    if settings.redis_username:
        options["username"] = settings.redis_username
    if password:
        options["password"] = password
    ca, cert, key = (_file(settings, f"redis_ssl_{x}") for x in ("cafile", "certfile", "keyfile"))
    if (ca or cert or key) and not settings.redis_url.startswith("rediss://"):
        raise SecurityError("GOLDSTREAM_REDIS_SSL_* files are for TLS: make GOLDSTREAM_REDIS_URL rediss://")
    if bool(cert) != bool(key):
        raise SecurityError("give both GOLDSTREAM_REDIS_SSL_CERTFILE and GOLDSTREAM_REDIS_SSL_KEYFILE, or neither")
    if ca:
        options["ssl_ca_certs"] = ca
    if cert and key:
        options |= {"ssl_certfile": cert, "ssl_keyfile": key}
    return options


def explain(exc: BaseException, settings: Settings) -> str | None:
    """A refused connection said in terms of the settings to fix, or None when `exc` is not one.
    Never includes a secret (the messages are ours, not the libraries')."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError

    text = f"{type(exc).__name__}: {exc} {exc.__context__!r}"
    if isinstance(exc, KafkaConnectionError):
        text += " " + KAFKA_REFUSALS.last
    name = type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        if isinstance(exc, RedisConnectionError):
            return "Redis's TLS certificate is not signed by a trusted CA: check GOLDSTREAM_REDIS_SSL_CAFILE"
        return "Kafka's TLS certificate is not signed by a trusted CA: check GOLDSTREAM_KAFKA_SSL_CAFILE"
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return "Redis refused the login: check GOLDSTREAM_REDIS_USERNAME and GOLDSTREAM_REDIS_PASSWORD(_FILE)"
    if isinstance(exc, ResponseError) and "NOPERM" in text:
        return ("Redis's ACL refused a command or key to GOLDSTREAM_REDIS_USERNAME: grant it the key prefix "
                "GOLDSTREAM_KEY_PREFIX and the commands in docs/security.md")  # fmt: skip
    if name in ("SaslAuthenticationFailed", "AuthenticationFailedError") or ("SASL" in text and "fail" in text.lower()):
        return ("Kafka refused the SASL login: check GOLDSTREAM_KAFKA_USERNAME, GOLDSTREAM_KAFKA_PASSWORD(_FILE) "
                f"and GOLDSTREAM_KAFKA_SASL_MECHANISM ({settings.kafka_sasl_mechanism})")  # fmt: skip
    if isinstance(exc, KafkaConnectionError | KafkaError) and settings.kafka_security_protocol.upper() != "PLAINTEXT":
        return (f"Kafka at {settings.kafka_bootstrap} could not be reached over "
                f"{settings.kafka_security_protocol}: check GOLDSTREAM_KAFKA_SECURITY_PROTOCOL, the listener's port "
                "and GOLDSTREAM_KAFKA_SSL_CAFILE")  # fmt: skip
    return None


__all__ = [
    "MASK",
    "SECRET_FIELDS",
    "SecurityError",
    "explain",
    "kafka_options",
    "kafka_ssl_context",
    "redis_options",
    "secret",
]
