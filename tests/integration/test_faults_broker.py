"""The worker against a broker that dies: killed under load and restarted on the same data
directory, down when SIGTERM arrives, not there yet at start-up, gone for a long outage.

Each test has a broker of its own (`private_kafka_broker`): it is SIGKILLed (`kill -9`, no
clean shutdown) and started again on the same ports and data directory. Requests are Claude
requests counted by a slow local count-API stand-in, so records are in flight when the
broker goes. Worker processes are real `python -m worker worker` processes with their logs
in files, so log volume and exit codes are the operator's view.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from tests.integration import worker_kit as kit
from tests.integration.conftest import load_broker_module, new_topics, unique_name
from tests.support.anthropic_server import AnthropicServer
from worker.settings import Settings
from worker.stream.publish import transactional_id
from worker.stream.service import serve

pytestmark = pytest.mark.kafka
MODES = ["at-least-once", "exactly-once"]
CLAUDE = "claude-sonnet-4-5"
FAST_FAILOVER: dict[str, Any] = {
    # Client timeouts short enough that a 20 s outage outlasts every one of them (a delivery,
    # a request, the default 10 s group session), so what a 60 s outage does to the worker
    # happens here too.
    "kafka_request_timeout_s": 5.0,
    "kafka_delivery_timeout_s": 5.0,
}


@pytest.fixture
def count_api() -> Iterator[AnthropicServer]:
    with AnthropicServer(latency=0.1) as server:
        yield server


async def _names(broker: Any, partitions: int = 3) -> kit.Names:
    names = [unique_name("f") for _ in range(4)]
    await new_topics(broker.bootstrap, names, partitions)
    req, res, alerts, dlq = names
    return kit.Names(req, res, alerts, dlq, f"{req}-group", partitions)


def _settings(broker: Any, names: kit.Names, api: AnthropicServer, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "health_port": kit.free_port(),
        "anthropic_base_url": api.base_url,
        "max_in_flight": 6,
        "log_format": "text",
        **FAST_FAILOVER,
    }
    values.update(over)
    return kit.settings_for(broker.bootstrap, names, **values)


async def _produce(
    broker: Any, names: kit.Names, n: int, *, distinct: bool = False
) -> list[kit.Sent]:
    values = [kit.request(i, model=CLAUDE, distinct=distinct) for i in range(n)]
    return await kit.produce(
        broker.bootstrap, names.requests, values, partition_of=lambda i: i % names.partitions
    )


async def _kill(broker: Any) -> None:
    """kill -9 the broker, keeping its data directory for `_revive`."""
    os.kill(broker.pid, signal.SIGKILL)
    await asyncio.to_thread(_reaped, broker)


def _reaped(broker: Any) -> None:
    while broker.is_running():  # polls (and so reaps) the child
        time.sleep(0.05)


async def _revive(broker: Any) -> None:
    """Start the killed broker again: same ports, same data (recovery after a crash)."""
    await asyncio.to_thread(broker.restart)


async def _until_committed(broker: Any, group: str, at_least: int) -> None:
    async with asyncio.timeout(60):
        while True:
            if sum((await kit.committed_offsets(broker.bootstrap, group)).values()) >= at_least:
                return
            await asyncio.sleep(0.2)


async def _all_results(broker: Any, names: kit.Names, n: int, *, committed_only: bool) -> list[str]:
    """Request ids of the results topic (from the beginning) once all `n` are there."""
    async with kit.Reader(
        broker.bootstrap, [names.results], names.partitions, committed_only=committed_only
    ) as r:
        await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 120)
        await asyncio.sleep(1.0)  # let any duplicate show up before counting
    return r.ids(names.results)


def _no_duplicates(ids: list[str]) -> None:
    dupes = {i: k for i, k in Counter(ids).items() if k > 1}
    assert not dupes, f"published more than once: {sorted(dupes)[:10]}"


def _count(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log))


@pytest.mark.parametrize("delivery", MODES)
async def test_broker_killed_under_load_and_restarted_loses_nothing(
    private_kafka_broker: Any, count_api: AnthropicServer, tmp_path: Path, delivery: str
) -> None:
    """The broker is SIGKILLed while the worker has records in flight, then started again on
    the same data directory. The worker rides it out without a restart of its own: every
    request gets a result (at-least-once), exactly one in a read_committed read
    (exactly-once); it says once that Kafka went and once that it came back."""
    broker = private_kafka_broker
    names = await _names(broker)
    n = 150
    await _produce(broker, names, n)
    worker = kit.WorkerProcess(_settings(broker, names, count_api, delivery=delivery),
                               tmp_path / "worker.log")  # fmt: skip
    try:
        await worker.wait_ready()
        await _until_committed(broker, names.group, 20)
        await _kill(broker)
        await asyncio.sleep(3.0)
        await _revive(broker)
        ids = await _all_results(broker, names, n, committed_only=delivery == "exactly-once")
        assert worker.proc.poll() is None, worker.log_tail()
        assert await worker.terminate() == 0, worker.log_tail()
    finally:
        worker.cleanup()
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    if delivery == "exactly-once":
        _no_duplicates(ids)
    log = worker.log_path.read_text()
    assert _count(log, r"Kafka \S+ unreachable") == 1, log[-4000:]
    assert _count(log, r"reachable again after \d+\.\d s") == 1, log[-4000:]


@pytest.mark.parametrize("delivery", MODES)
async def test_sigterm_while_the_broker_is_down_exits_within_the_drain_timeout(
    private_kafka_broker: Any, count_api: AnthropicServer, tmp_path: Path, delivery: str
) -> None:
    """SIGTERM with the broker gone and records in flight: the worker stops within
    TOKENHEAP_DRAIN_TIMEOUT_S (the commits it cannot make are given up at the deadline, the
    client timeouts are left at their long defaults to show they do not matter), exits 0,
    and what it had not committed is processed by the next worker: nothing is lost."""
    broker = private_kafka_broker
    names = await _names(broker)
    n = 90
    drain_s = 6.0
    await _produce(broker, names, n)
    settings = _settings(
        broker, names, count_api, delivery=delivery, drain_timeout_s=drain_s,
        kafka_request_timeout_s=30.0, kafka_delivery_timeout_s=30.0,
    )  # fmt: skip
    first = kit.WorkerProcess(settings, tmp_path / "first.log")
    second = None
    try:
        await first.wait_ready()
        await _until_committed(broker, names.group, 10)
        await _kill(broker)
        await asyncio.sleep(1.0)
        assert first.proc.poll() is None, first.log_tail()
        # The bound under test: the drain timeout, plus a little for the interpreter to exit.
        assert await first.terminate(timeout_s=drain_s + 4.0) == 0, first.log_tail()
        await _revive(broker)
        second = kit.WorkerProcess(settings, tmp_path / "second.log")
        # ready first: the first worker may have published everything before the outage,
        # and a SIGTERM that lands while the second is still importing is not a drain
        await second.wait_ready()
        ids = await _all_results(broker, names, n, committed_only=delivery == "exactly-once")
        assert await second.terminate() == 0, second.log_tail()
    finally:
        first.cleanup()
        if second is not None:
            second.cleanup()
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    if delivery == "exactly-once":
        _no_duplicates(ids)


async def test_a_worker_started_before_the_broker_waits_live_and_not_ready(
    private_kafka_broker: Any, count_api: AnthropicServer, tmp_path: Path
) -> None:
    """Started while the broker is down: the worker says what it waits for, answers /livez
    and not /readyz, and once the broker is up it joins, becomes ready and processes."""
    broker = private_kafka_broker
    names = await _names(broker)
    await _kill(broker)
    settings = _settings(broker, names, count_api, kafka_startup_timeout_s=120.0)
    worker = kit.WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await worker.wait_log("waiting for Kafka at", 60)
        assert await kit.http_status(settings.health_port, "/livez") == 200
        assert await kit.http_status(settings.health_port, "/readyz") == 503
        await _revive(broker)
        await worker.wait_ready(90)
        n = 12
        await _produce(broker, names, n)
        ids = await _all_results(broker, names, n, committed_only=False)
        assert await worker.terminate() == 0, worker.log_tail()
    finally:
        worker.cleanup()
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    log = worker.log_path.read_text()
    assert _count(log, "waiting for Kafka at") == 1, log[-4000:]
    assert _count(log, r"Kafka reachable after \d+\.\d s") == 1, log[-4000:]


async def test_the_start_up_deadline_ends_the_wait_with_a_clear_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens at the bootstrap address: the worker gives up after
    TOKENHEAP_KAFKA_STARTUP_TIMEOUT_S with exit code 1 and says why, in a few lines."""
    names = kit.Names("r", "s", "a", "d", "g", 1)
    settings = kit.settings_for(
        f"127.0.0.1:{kit.free_port()}", names, kafka_startup_timeout_s=2.0, health_port=0
    )
    caplog.set_level("INFO")
    assert await asyncio.wait_for(serve(settings, stop=asyncio.Event()), 60) == 1
    messages = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert any("TOKENHEAP_KAFKA_STARTUP_TIMEOUT_S" in m for m in messages), messages
    assert len(messages) <= 4, messages


async def test_a_long_outage_is_survived_live_quiet_and_counted_once(
    private_kafka_broker: Any, count_api: AnthropicServer, tmp_path: Path
) -> None:
    """Exactly-once (a producer per partition: the noisiest case) through a 20 s outage
    with records in flight. Their deliveries and commits time out (5 s): the worker replaces
    its clients rather than hanging or exiting, answers /livez all along and /readyz not
    while Kafka is gone, logs the outage once each way, holds the client's repeats back
    (a bounded number of lines however long it lasts), and every request gets exactly one
    committed result afterwards."""
    broker = private_kafka_broker
    names = await _names(broker)
    n = 120
    outage_s = 20.0
    # Distinct payloads (one count call each) and slow count calls keep records in flight
    # when the broker dies (6 at a time, ~6 s for all): a worker that finished the lot
    # before the kill (identical payloads cost one call in all) would test nothing here.
    count_api.latency = 0.3
    await _produce(broker, names, n, distinct=True)
    settings = _settings(broker, names, count_api, delivery="exactly-once")
    worker = kit.WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await worker.wait_ready()
        await _until_committed(broker, names.group, 10)
        await _kill(broker)
        before = len(worker.log_path.read_text().splitlines())
        began = asyncio.get_running_loop().time()
        ready_seen = set()
        while asyncio.get_running_loop().time() - began < outage_s:
            assert worker.proc.poll() is None, worker.log_tail()
            assert await kit.http_status(settings.health_port, "/livez") == 200
            ready_seen.add(await kit.http_status(settings.health_port, "/readyz"))
            await asyncio.sleep(1.0)
        during = worker.log_path.read_text().splitlines()[before:]
        await _revive(broker)
        await worker.wait_ready(90)
        ids = await _all_results(broker, names, n, committed_only=True)
        assert await worker.terminate() == 0, worker.log_tail()
    finally:
        worker.cleanup()
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    _no_duplicates(ids)
    assert 503 in ready_seen
    # A handful of lines of our own (outage, restart, cut-offs) and at most one per
    # distinct client message; thousands without the filter.
    assert len(during) <= 40, "\n".join(during)
    log = worker.log_path.read_text()
    assert _count(log, r"Kafka \S+ unreachable") == 1, log[-4000:]
    assert _count(log, r"reachable again after \d+\.\d s") == 1, log[-4000:]
    assert "restarting the Kafka clients" in log


async def _leave_forgotten_transaction(
    bootstrap: str, txid: str, tp: TopicPartition, known: TopicPartition
) -> None:
    """What a broker that crashes mid-commit can leave behind: a batch of this transactional
    id in `tp` whose transaction the coordinator counts as complete, with no marker in `tp`.
    Made here by not telling the coordinator about `tp` (the broker's partition verification
    is off) and committing a transaction it knows through `known`: the coordinator writes
    markers only where it knows of the transaction."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=txid, enable_idempotence=True
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        producer._txn_manager._txn_partitions.add(tp)  # "added": no AddPartitionsToTxn
        forgotten = json.dumps({"request_id": "forgotten"}).encode()
        await (await producer.send(tp.topic, forgotten, partition=tp.partition))
        await (await producer.send(known.topic, forgotten, partition=known.partition))
        await producer.commit_transaction()
    finally:
        await producer.stop()


async def test_exactly_once_aborts_a_transaction_its_predecessor_left_without_markers(
    tmp_path: Path,
) -> None:
    """A batch of the worker's own transactional id left open without a marker (as a broker
    killed mid-commit can leave one) must neither hold read_committed readers back forever
    nor be committed by the worker's next transaction in that partition: the worker aborts
    it when it takes the partition, and every request is published exactly once."""
    broker = load_broker_module().Broker(
        overrides={"transaction.partition.verification.enable": "false"}
    )
    broker.start()
    try:
        names = await _names(broker, partitions=2)
        for source in range(names.partitions):
            txid = transactional_id(names.group, TopicPartition(names.requests, source))
            await _leave_forgotten_transaction(
                broker.bootstrap,
                txid,
                TopicPartition(names.results, source),
                TopicPartition(names.alerts, source),
            )
        n = 40
        values = [kit.request(i) for i in range(n)]
        await kit.produce(broker.bootstrap, names.requests, values,
                          partition_of=lambda i: i % names.partitions)  # fmt: skip
        settings = kit.settings_for(
            broker.bootstrap, names, health_port=kit.free_port(), delivery="exactly-once"
        )
        async with kit.InProcessWorker(settings) as worker:
            await worker.wait_ready()
            async with kit.Reader(
                broker.bootstrap, [names.results], names.partitions, committed_only=True
            ) as r:
                await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 60)
                await asyncio.sleep(1.0)  # let a committed leftover show up too
            assert await worker.stop() == 0
    finally:
        broker.stop()
    ids = r.ids(names.results)
    assert "forgotten" not in ids
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    _no_duplicates(ids)
