"""Connection settings every aiokafka client shares (servers, SASL, TLS), and topic creation.

One function turns `Settings` into keyword arguments so the consumer, the producers, the
admin client and the DLQ tool cannot disagree about how to reach the cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code
from aiokafka.helpers import create_ssl_context

from worker.errors import ConfigError
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
