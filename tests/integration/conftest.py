"""Fixtures for integration tests against a real Kafka broker.

``kafka_bootstrap`` (session) is ``$KAFKA_BOOTSTRAP_SERVERS`` when set; otherwise a local
single-node KRaft broker is started once per session from ``ops/kafka/broker.py`` (jars are
fetched from Maven Central on first use, ~10 s; the broker starts in ~4 s) and stopped at the
end. Tests that need it are marked ``@pytest.mark.kafka``.

Topics: ``topic_name`` is one fresh, uniquely named topic (3 partitions; parametrize it
indirectly for another count); ``make_topics`` creates more; ``new_topics()`` is the helper
behind both. Topics are not deleted afterwards (names are unique; the local broker's data
is thrown away).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
BROKER_PY = Path(__file__).resolve().parents[2] / "ops" / "kafka" / "broker.py"
DEFAULT_PARTITIONS = 3
_TOPIC_ALREADY_EXISTS = 36

MakeTopics = Callable[..., Awaitable[list[str]]]


def load_broker_module() -> ModuleType:
    """Import ``ops/kafka/broker.py`` by path (there is no ``ops`` package)."""
    name = "tokenheap_ops_kafka_broker"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, BROKER_PY)
    assert spec is not None and spec.loader is not None, BROKER_PY
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unique_name(prefix: str = "t") -> str:
    """A topic / group / transactional id that no other test (or run) uses."""
    return f"tokenheap-{prefix}-{uuid.uuid4().hex[:12]}"


async def new_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int = 1,
    *,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create ``names`` (replication factor 1) and wait until every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=20_000)
    try:
        await admin.start()
        topics = [NewTopic(n, partitions, 1, topic_configs=dict(configs or {})) for n in names]
        response = await admin.create_topics(topics, timeout_ms=int(timeout_s * 1000))
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise for_code(code)(f"creating topic {topic!r}: {rest[0] if rest else ''}")
        async with asyncio.timeout(timeout_s):
            while True:  # metadata propagates asynchronously: poll until all are led
                if _all_led(await admin.describe_topics(list(names)), names, partitions):
                    break
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    return list(names)


def _all_led(described: list[Any], names: Sequence[str], partitions: int) -> bool:
    by_name = {t["topic"]: t for t in described}
    for name in names:
        topic = by_name.get(name)
        if topic is None or topic["error_code"] != 0:
            return False
        parts = topic["partitions"]
        if len(parts) != partitions or any(p["leader"] < 0 for p in parts):
            return False
    return True


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Any | None]:
    """The session's local ``Broker`` object, or None when ``$KAFKA_BOOTSTRAP_SERVERS`` is set.

    Do not stop or kill it in a test: it is shared. Use ``private_kafka_broker`` for that.
    """
    if os.environ.get(BOOTSTRAP_ENV):
        yield None
        return
    broker = load_broker_module().Broker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: Any | None) -> str:
    """``host:port[,host:port]`` of the broker tests should talk to."""
    if kafka_broker is None:
        return os.environ[BOOTSTRAP_ENV]
    return str(kafka_broker.bootstrap)


@pytest.fixture
def private_kafka_broker() -> Iterator[Any]:
    """A dedicated local broker for one test, which may ``kill()`` / ``restart()`` it.

    Always local (ignores ``$KAFKA_BOOTSTRAP_SERVERS``); costs a broker start (~4 s).
    """
    broker = load_broker_module().Broker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def topic_name(kafka_bootstrap: str, request: pytest.FixtureRequest) -> str:
    """A fresh topic with 3 partitions, or ``n`` with
    ``@pytest.mark.parametrize("topic_name", [n], indirect=True)``."""
    partitions = int(getattr(request, "param", DEFAULT_PARTITIONS))
    (name,) = await new_topics(kafka_bootstrap, [unique_name()], partitions)
    return name


@pytest.fixture
def make_topics(kafka_bootstrap: str) -> MakeTopics:
    """``await make_topics(count=1, partitions=3, prefix="t", configs=None) -> [names]``."""

    async def make(
        count: int = 1,
        partitions: int = DEFAULT_PARTITIONS,
        prefix: str = "t",
        configs: Mapping[str, str] | None = None,
    ) -> list[str]:
        names = [unique_name(prefix) for _ in range(count)]
        return await new_topics(kafka_bootstrap, names, partitions, configs=configs)

    return make
