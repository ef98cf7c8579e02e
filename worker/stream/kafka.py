"""Connection settings every aiokafka client shares (servers, SASL, TLS), and topic creation.

One function turns `Settings` into keyword arguments so the consumer, the producers, the
admin client and the DLQ tool cannot disagree about how to reach the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.helpers import create_ssl_context

from worker.errors import ConfigError, TokenheapError
from worker.settings import Settings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def client_kwargs(settings: Settings, client_id: str = "tokenheap") -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (the password is passed, never logged)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    elif settings.ssl_cafile or settings.ssl_certfile or settings.ssl_keyfile:
        raise ConfigError(
            "TLS files are set but TOKENHEAP_SECURITY_PROTOCOL is "
            f"{settings.security_protocol}; use SSL or SASL_SSL"
        )
    if settings.security_protocol.startswith("SASL_"):
        if settings.sasl_mechanism is None:
            raise ConfigError(
                f"{settings.security_protocol} needs TOKENHEAP_SASL_MECHANISM "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        if settings.sasl_username is None or settings.sasl_password is None:
            raise ConfigError("SASL needs TOKENHEAP_SASL_USERNAME and TOKENHEAP_SASL_PASSWORD")
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def consumer_tuning(settings: Settings) -> dict[str, Any]:
    """The consumer's failover settings: how fast a dead member's partitions move
    (session, heartbeat), how long a request may take, and the longest gap between fetches."""
    if settings.kafka_heartbeat_interval_s >= settings.kafka_session_timeout_s:
        raise ConfigError(
            "TOKENHEAP_KAFKA_HEARTBEAT_INTERVAL_S must be below TOKENHEAP_KAFKA_SESSION_TIMEOUT_S "
            f"({settings.kafka_heartbeat_interval_s} >= {settings.kafka_session_timeout_s})"
        )
    return {
        "session_timeout_ms": _ms(settings.kafka_session_timeout_s),
        "heartbeat_interval_ms": _ms(settings.kafka_heartbeat_interval_s),
        "max_poll_interval_ms": _ms(settings.kafka_max_poll_interval_s),
        "request_timeout_ms": _ms(settings.kafka_request_timeout_s),
    }


def producer_tuning(settings: Settings) -> dict[str, Any]:
    """aiokafka's producer `request_timeout_ms` is its delivery timeout: a message not
    acknowledged within it fails with KafkaTimeoutError (then the worker restarts its clients)."""
    return {"request_timeout_ms": _ms(settings.kafka_delivery_timeout_s)}


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class BrokerRefused(ConfigError):
    """The broker answered but will not let us in: credentials, mechanism or TLS trust.
    The same settings fail the same way every time, so this stops at once, never retries."""

    code = "kafka_refused"


class BrokerUnreachable(TokenheapError):
    """No broker answered (down, wrong address, a network cut): worth retrying."""

    code = "kafka_unreachable"
    retriable = True


def connection_error(exc: BaseException, settings: Settings, address: str) -> TokenheapError:
    """What a failed connection attempt to `address` means, in the settings' own words.

    aiokafka logs the cause and raises a bare "Unable to bootstrap", so callers that want to
    tell a typo'd password (fatal) from an outage (retry) connect once with `check_connection`
    and get one of these. The password is never part of the message.
    """
    user, mech = settings.sasl_username, settings.sasl_mechanism
    if isinstance(exc, SaslAuthenticationFailed):
        return BrokerRefused(
            f"{address}: the broker rejected SASL {mech} authentication for user {user!r} "
            "(wrong password, unknown user, or no credentials of that mechanism); check "
            "TOKENHEAP_SASL_USERNAME and TOKENHEAP_SASL_PASSWORD"
        )
    if isinstance(exc, UnsupportedSaslMechanismError | IllegalSaslStateError):
        return BrokerRefused(f"{address}: {exc}; check TOKENHEAP_SASL_MECHANISM")
    if isinstance(exc, ssl.SSLCertVerificationError):
        trust = settings.ssl_cafile or "the system CA store"
        return BrokerRefused(
            f"{address}: the broker's TLS certificate is not trusted ({exc.verify_message}): "
            f"{trust} (TOKENHEAP_SSL_CAFILE) did not sign it, or it does not name this host"
        )
    if isinstance(exc, ssl.SSLError):
        return BrokerRefused(
            f"{address}: TLS handshake failed ({exc.reason or exc}); does the listener speak "
            f"{settings.security_protocol} (TOKENHEAP_SECURITY_PROTOCOL)?"
        )
    if isinstance(exc, OSError | TimeoutError | KafkaError):
        return BrokerUnreachable(f"{address}: not reachable ({type(exc).__name__}: {exc})")
    return TokenheapError(f"{address}: {type(exc).__name__}: {exc}")


_CONN_KEYS = frozenset(
    {"client_id", "security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username",
     "sasl_plain_password"}
)  # fmt: skip


async def check_connection(settings: Settings, timeout_s: float = 10.0) -> None:
    """Connect once to the bootstrap servers as the clients will (TLS, SASL); return at the
    first that lets us in. Otherwise raise `connection_error`'s answer: BrokerRefused if any
    server refused us (fatal), else BrokerUnreachable. One attempt per server, no retries:
    that is the caller's policy."""
    kwargs = client_kwargs(settings, "tokenheap-probe")
    conn_kwargs = {k: v for k, v in kwargs.items() if k in _CONN_KEYS}
    request_ms = max(1, int(timeout_s * 1000))
    errors: list[TokenheapError] = []
    for host, port, _family in collect_hosts(settings.bootstrap_servers, randomize=False):
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(host, port, request_timeout_ms=request_ms, **conn_kwargs)
        except Exception as exc:
            errors.append(connection_error(exc, settings, address))
            continue
        conn.close()
        return
    refused = [e for e in errors if isinstance(e, BrokerRefused)]
    raise (refused or errors or [BrokerUnreachable("no bootstrap servers")])[0]


def worker_topics(settings: Settings) -> list[str]:
    return [
        settings.requests_topic,
        settings.results_topic,
        settings.alerts_topic,
        settings.dead_letter_topic,
    ]


async def ensure_topics(
    common: dict[str, Any],
    names: Sequence[str],
    partitions: int,
    replication: int,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; returns the ones it created."""
    admin = AIOKafkaAdminClient(**common)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(n, partitions, replication) for n in missing],
            timeout_ms=int(timeout_s * 1000),
        )
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                detail = rest[0] if rest else ""
                raise ConfigError(
                    f"could not create topic {topic!r}: {for_code(code).__name__} {detail}; "
                    "create it by hand or check the principal's CREATE permission"
                )
        async with asyncio.timeout(timeout_s):  # wait until every new partition has a leader
            while True:
                if _all_led(await admin.describe_topics(missing), partitions):
                    break
                await asyncio.sleep(0.1)
        log.info("created topics %s (%d partitions each)", ", ".join(missing), partitions)
        return missing
    finally:
        await admin.close()


async def partitions_of(common: dict[str, Any], topic: str) -> list[int]:
    """The topic's partition ids; ConfigError if it does not exist."""
    admin = AIOKafkaAdminClient(**common)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0 or not described["partitions"]:
        raise ConfigError(f"topic {topic!r} does not exist (or is not visible to this principal)")
    return sorted(p["partition"] for p in described["partitions"])


def _all_led(described: list[Any], partitions: int) -> bool:
    return all(
        t["error_code"] == 0
        and len(t["partitions"]) == partitions
        and all(p["leader"] >= 0 for p in t["partitions"])
        for t in described
    )
