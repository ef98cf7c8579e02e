"""`tokenheap dlq list|replay`: look at dead letters, or send their original bytes back.

list:   JSON lines (why, and where each came from), oldest first, up to --limit; reads
        without a consumer group, so listing never moves anything.
replay: re-publishes the original key, value and headers to the source topic, up to
        --limit, under its own consumer group (`<group>.dlq-replay`) whose committed offsets
        remember what was already replayed. Fix the cause (limits, producer) first: a
        message that fails again is simply dead-lettered again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.kafka import client_kwargs, partitions_of
from worker.stream.messages import DeadLetter
from worker.stream.publish import producer_kwargs

POLL_MS = 500
READ_TIMEOUT_S = 60.0


def replay_group(group_id: str) -> str:
    return f"{group_id}.dlq-replay"


def run_dlq(settings: Settings, action: str, limit: int) -> int:
    if limit < 1:
        raise ConfigError("--limit must be at least 1")
    try:
        if action == "list":
            asyncio.run(list_dead_letters(settings, limit, sys.stdout))
            return 0
        if action == "replay":
            replayed, skipped = asyncio.run(replay_dead_letters(settings, limit))
            print(
                f"replayed {replayed}; skipped {skipped} (unreadable, or value not kept)",
                file=sys.stderr,
            )
            return 0
    except (KafkaError, TimeoutError) as exc:
        print(f"tokenheap dlq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    raise ConfigError(f"unknown dlq action {action!r}: use list or replay")


async def list_dead_letters(settings: Settings, limit: int, out: TextIO) -> int:
    """Print up to `limit` dead letters as JSON lines; returns how many."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings, "tokenheap-dlq"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    try:
        await consumer.start()
        n = 0
        partitions = await partitions_of(client_kwargs(settings), settings.dead_letter_topic)
        records = _records(consumer, settings.dead_letter_topic, partitions, limit, grouped=False)
        async for record in records:
            out.write(json.dumps(_summary(record)) + "\n")
            n += 1
        out.flush()
        return n
    finally:
        await consumer.stop()


async def replay_dead_letters(settings: Settings, limit: int) -> tuple[int, int]:
    """Re-publish up to `limit` dead letters; returns (replayed, skipped)."""
    common = client_kwargs(settings, "tokenheap-dlq")
    consumer = AIOKafkaConsumer(
        **common,
        group_id=replay_group(settings.group_id),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(**producer_kwargs(common))
    replayed = skipped = 0
    try:
        await consumer.start()
        await producer.start()
        partitions = await partitions_of(common, settings.dead_letter_topic)
        records = _records(consumer, settings.dead_letter_topic, partitions, limit, grouped=True)
        async for record in records:
            letter = _letter(record)
            if letter is None or letter.value_b64 is None:
                skipped += 1
            else:
                await producer.send_and_wait(
                    letter.source_topic,
                    _unb64(letter.value_b64),
                    key=_unb64(letter.key_b64),
                    headers=[(h.key, _unb64(h.value_b64)) for h in letter.headers],
                )
                replayed += 1
            # Acknowledged first, then remembered: a crash in between replays it twice.
            tp = TopicPartition(record.topic, record.partition)
            await consumer.commit({tp: record.offset + 1})
    finally:
        await producer.stop()
        await consumer.stop()
    return replayed, skipped


async def _records(
    consumer: AIOKafkaConsumer, topic: str, partitions: list[int], limit: int, *, grouped: bool
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Records from where the group left off (or the beginning) up to the end as it was
    when we started: a replay that feeds the DLQ again cannot loop forever."""
    loop = asyncio.get_running_loop()
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    if not grouped:
        await consumer.seek_to_beginning(*tps)
    end = await consumer.end_offsets(tps)
    left = {tp for tp in tps if await consumer.position(tp) < end[tp]}
    n = 0
    last_progress = loop.time()
    while left and n < limit:
        batch = await consumer.getmany(*left, timeout_ms=POLL_MS, max_records=limit - n)
        if batch:
            last_progress = loop.time()
        elif loop.time() - last_progress > READ_TIMEOUT_S:
            raise TimeoutError(f"no dead letters arrived for {READ_TIMEOUT_S:.0f} s")
        for tp, records in sorted(batch.items()):
            for record in records:
                if record.offset >= end[tp] or n >= limit:
                    break
                n += 1
                yield record
        left = {tp for tp in left if await consumer.position(tp) < end[tp]}


def _summary(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    """Why and where from; never the payload (it may hold prompt text)."""
    doc: dict[str, Any] = {"dlq_partition": record.partition, "dlq_offset": record.offset}
    letter = _letter(record)
    if letter is None:
        doc["reason_code"] = "unreadable"
        return doc
    doc.update(
        reason_code=letter.reason_code,
        reason=letter.reason,
        source_topic=letter.source_topic,
        source_partition=letter.source_partition,
        source_offset=letter.source_offset,
        group_id=letter.group_id,
        failed_at=letter.failed_at.isoformat(),
        value_kept=letter.value_b64 is not None,
    )
    return doc


def _letter(record: ConsumerRecord[bytes, bytes]) -> DeadLetter | None:
    if record.value is None:
        return None
    try:
        return DeadLetter.model_validate_json(record.value)
    except ValidationError:
        return None


def _unb64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data)
