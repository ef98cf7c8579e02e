"""The real broker does what the worker relies on: partitions, idempotent produce, consumer
groups, and exactly-once consume-transform-produce with read_committed readers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

N = 30
PARTITIONS = 3


async def drain(
    consumer: AIOKafkaConsumer, count: int, timeout_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Records until ``count`` have arrived (fails on timeout)."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    async with asyncio.timeout(timeout_s):
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
    return records


async def read_to_end(
    bootstrap: str, topic: str, isolation_level: str, timeout_s: float = 30.0
) -> list[bytes]:
    """Every value in ``topic`` up to its current end, as seen at ``isolation_level``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        async with asyncio.timeout(timeout_s):
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                batch = await consumer.getmany(timeout_ms=200)
                values.extend(r.value for part in batch.values() for r in part)
    finally:
        await consumer.stop()
    return values


@pytest.mark.kafka
async def test_broker_supports_groups_idempotence_and_transactions(
    kafka_bootstrap: str, make_topics: Callable[..., Awaitable[list[str]]]
) -> None:
    src, dst = await make_topics(2, partitions=PARTITIONS, prefix="smoke")
    expected = {f"m{i}".encode() for i in range(N)}

    # -- idempotent producer, explicit partitions --------------------------------------
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(src, f"m{i}".encode(), key=b"k%d" % i, partition=i % 3)
            for i in range(N)
        ]
    finally:
        await producer.stop()
    per_partition = {p: sorted(md.offset for md in sent if md.partition == p) for p in range(3)}
    assert per_partition == {p: list(range(N // PARTITIONS)) for p in range(PARTITIONS)}

    # -- consumer group -----------------------------------------------------------------
    group = f"{src}-group"
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records = await drain(consumer, N)
        assert {r.value for r in records} == expected
        assert len(records) == N  # no duplicates
        assert {r.partition for r in records} == set(range(PARTITIONS))
        await consumer.commit()
        assert consumer.assignment() == {TopicPartition(src, p) for p in range(PARTITIONS)}
        committed = [await consumer.committed(tp) for tp in sorted(consumer.assignment())]
        assert committed == [N // PARTITIONS] * PARTITIONS
    finally:
        await consumer.stop()

    # -- transactional consume-transform-produce ------------------------------------------
    txn_group = f"{src}-txn"
    source = AIOKafkaConsumer(
        src,
        bootstrap_servers=kafka_bootstrap,
        group_id=txn_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    txn = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{src}-tx")
    await source.start()
    await txn.start()
    try:
        records = await drain(source, N)
        async with txn.transaction():
            for r in records:
                assert r.value is not None
                await txn.send(dst, r.value.upper(), key=r.key, partition=r.partition)
            offsets: dict[TopicPartition, int] = {}
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
            await txn.send_offsets_to_transaction(offsets, txn_group)

        # An aborted transaction: its records must stay invisible to read_committed readers.
        await txn.begin_transaction()
        for p in range(PARTITIONS):
            await txn.send_and_wait(dst, b"ABORTED", partition=p)
        await txn.abort_transaction()
    finally:
        await txn.stop()
        await source.stop()

    committed_values = await read_to_end(kafka_bootstrap, dst, "read_committed")
    assert sorted(committed_values) == sorted(v.upper() for v in expected)

    raw_values = await read_to_end(kafka_bootstrap, dst, "read_uncommitted")
    assert raw_values.count(b"ABORTED") == PARTITIONS  # written, then hidden by the abort
    assert len(raw_values) == N + PARTITIONS

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        group_offsets = await admin.list_consumer_group_offsets(txn_group)
    finally:
        await admin.close()
    assert {tp: meta.offset for tp, meta in group_offsets.items()} == {
        TopicPartition(src, p): N // PARTITIONS for p in range(PARTITIONS)
    }
