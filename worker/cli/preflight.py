"""Checks `tokenheap worker` makes before it starts: a missing requests topic is a clear error.

Subscribed to a topic that does not exist, a consumer joins its group, is assigned nothing
and waits without a word: the worker looked healthy and did nothing. Here the topic is looked
up once; an unreachable broker is left to the service's own start-up handling (it may come
up later), a refusing one or a missing topic stops the worker with exit 2.
"""

from __future__ import annotations

import asyncio

from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.kafka import BrokerUnreachable, check_connection, client_kwargs, partitions_of

PROBE_TIMEOUT_S = 10.0


async def check_requests_topic(settings: Settings) -> None:
    """ConfigError when the broker answers and the requests topic is not there (unless the
    worker is to create it)."""
    if settings.create_topics:
        return
    try:
        await check_connection(settings, timeout_s=PROBE_TIMEOUT_S)
    except BrokerUnreachable:
        return  # the service retries or reports it
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S * 3):
            await partitions_of(
                client_kwargs(settings, "tokenheap-preflight"), settings.requests_topic
            )
    except ConfigError:
        raise ConfigError(
            f"the requests topic {settings.requests_topic!r} does not exist on "
            f"{settings.bootstrap_servers} (or this principal cannot see it): create it, "
            "set TOKENHEAP_REQUESTS_TOPIC to the right name, or set TOKENHEAP_CREATE_TOPICS=true"
        ) from None
    except (TimeoutError, OSError):
        return
