"""`tokenheap dlq list|replay`: look at dead letters, or send their original bytes back.

list:   JSON lines (why, and where each came from), oldest first, up to --limit; reads
        without a consumer group, so listing never moves anything.
replay: re-publishes the original key, value and headers (null, empty and binary header
        values kept apart) to the source topic, up to --limit, under its own consumer group
        (`<group>.dlq-replay`) whose committed offsets remember what was already replayed.
        A letter kept by reference is re-read from its source position and checked against
        its digest. A letter it cannot replay (unreadable, or its original gone or changed)
        is refused and never committed, so its partition stops there; exit 1 says so.
        Fix the cause (limits, producer) first: a message that fails again is simply
        dead-lettered again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from worker.errors import ConfigError, TokenheapError
from worker.settings import Settings
from worker.stream.kafka import BrokerUnreachable, check_connection, client_kwargs, partitions_of
from worker.stream.messages import DeadLetter
from worker.stream.publish import producer_kwargs, record_digest

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
            report = asyncio.run(replay_dead_letters(settings, limit))
            print(f"replayed {report.replayed}; refused {len(report.refused)}", file=sys.stderr)
            for r in report.refused:
                print(
                    f"not replayed, not marked done: {settings.dead_letter_topic}"
                    f"[{r.dlq_partition}]@{r.dlq_offset}: {r.why}; the letters after it in "
                    "that partition wait too",
                    file=sys.stderr,
                )
            return 1 if report.refused else 0
    except BrokerUnreachable as exc:
        print(f"tokenheap dlq: {exc}", file=sys.stderr)
        return 1
    except (KafkaError, TimeoutError) as exc:
        print(f"tokenheap dlq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    raise ConfigError(f"unknown dlq action {action!r}: use list or replay")


async def list_dead_letters(settings: Settings, limit: int, out: TextIO) -> int:
    """Print up to `limit` dead letters as JSON lines; returns how many."""
    await check_connection(settings)  # a refused login stops here, clearly, once
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


class NotReplayable(TokenheapError):
    """A dead letter whose original cannot be sent back: unreadable, or kept by reference and
    no longer (or not the same record) at its position in the source topic."""

    code = "not_replayable"


@dataclass(frozen=True, slots=True)
class Original:
    """The record a dead letter stands for, exactly as it is sent back."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    dlq_partition: int
    dlq_offset: int
    why: str


@dataclass(slots=True)
class ReplayReport:
    """What a replay did. A refused letter is not committed, and neither is anything after it
    in its DLQ partition (offsets only say "up to here"): the next replay starts there."""

    replayed: int = 0
    refused: list[Refusal] = field(default_factory=list)


def parse_letter(raw: bytes | None) -> DeadLetter:
    """The letter in a DLQ record; NotReplayable when it is not one. Letters written before
    `original` existed are read too: there a missing header value meant null."""
    if raw is None:
        raise NotReplayable("the DLQ record has no value")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise NotReplayable("the DLQ record is not JSON") from exc
    if isinstance(doc, dict) and "original" not in doc:
        doc = _from_legacy(doc)
    try:
        return DeadLetter.model_validate(doc)
    except ValidationError as exc:
        raise NotReplayable(
            f"not a dead letter ({exc.error_count()} schema errors, first at "
            f"{'.'.join(map(str, exc.errors()[0]['loc']))})"
        ) from exc


def _from_legacy(doc: dict[str, Any]) -> dict[str, Any]:
    reason = str(doc.get("reason", ""))
    if "value_b64" not in doc and "not kept" in reason:
        raise NotReplayable("an older letter that did not keep the original value")
    headers = doc.get("headers", [])
    if isinstance(headers, list):
        headers = [{"value_b64": None, **h} if isinstance(h, dict) else h for h in headers]
    return {"key_b64": None, "value_b64": None, **doc, "headers": headers, "original": "inline"}


def inline_original(letter: DeadLetter) -> Original:
    """The record an inline letter holds, byte for byte."""
    if letter.original != "inline":
        raise NotReplayable("the original is kept by reference, not in the letter")
    try:
        return Original(
            letter.source_topic,
            _unb64(letter.key_b64),
            _unb64(letter.value_b64),
            tuple((h.key, _unb64(h.value_b64)) for h in letter.headers),
        )
    except ValueError as exc:  # binascii.Error
        raise NotReplayable("the letter holds invalid base64") from exc


def check_referenced(letter: DeadLetter, record: ConsumerRecord[bytes, bytes] | None) -> Original:
    """The referenced original, from the record now at the letter's source position (None:
    nothing there), if it is the same record: same offset and the same digest."""
    ref = letter.reference
    where = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
    if ref is None:
        raise NotReplayable("a reference letter without its reference")
    if record is None or record.offset != letter.source_offset:
        raise NotReplayable(f"the original is no longer in {where} (retention or compaction)")
    headers = tuple(record.headers)
    if record_digest(record.key, record.value, headers) != ref.record_sha256:
        raise NotReplayable(f"the record now at {where} is not the original (digest differs)")
    return Original(letter.source_topic, record.key, record.value, headers)


async def replay_dead_letters(settings: Settings, limit: int) -> ReplayReport:
    """Re-publish up to `limit` dead letters (inline: from the letter; by reference: re-read
    from the source topic and checked against the digest). A letter that cannot be replayed
    is refused: neither it nor the later letters of its partition are marked done."""
    await check_connection(settings)
    common = client_kwargs(settings, "tokenheap-dlq")
    consumer = AIOKafkaConsumer(
        **common,
        group_id=replay_group(settings.group_id),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    sources = AIOKafkaConsumer(**common, enable_auto_commit=False, isolation_level="read_committed")
    producer = AIOKafkaProducer(**producer_kwargs(common, settings.max_message_bytes))
    report = ReplayReport()
    blocked: set[TopicPartition] = set()
    try:
        await consumer.start()
        await sources.start()
        await producer.start()
        partitions = await partitions_of(common, settings.dead_letter_topic)
        records = _records(consumer, settings.dead_letter_topic, partitions, limit, grouped=True)
        async for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp in blocked:
                continue
            try:
                letter = parse_letter(record.value)
                if letter.original == "inline":
                    original = inline_original(letter)
                else:
                    original = check_referenced(letter, await _read_at(sources, letter))
            except NotReplayable as exc:
                blocked.add(tp)
                report.refused.append(Refusal(record.partition, record.offset, str(exc)))
                continue
            await _send_original(producer, original, letter.source_partition)
            report.replayed += 1
            # Acknowledged first, then remembered: a crash in between replays it twice.
            await consumer.commit({tp: record.offset + 1})
    finally:
        await producer.stop()
        await sources.stop()
        await consumer.stop()
    return report


async def _send_original(producer: AIOKafkaProducer, original: Original, partition: int) -> None:
    """Send the record back, keyed as it was. Kafka allows a record with neither key nor value
    (headers only) but aiokafka's `send` refuses one; its batch API does not, and with no key
    there is no partitioner's choice to keep, so it goes back to the partition it came from."""
    headers = list(original.headers)
    if original.key is not None or original.value is not None:
        await producer.send_and_wait(original.topic, original.value, key=original.key,
                                     headers=headers)  # fmt: skip
        return
    batch = producer.create_batch()
    batch.append(key=None, value=None, timestamp=None, headers=headers)
    batch.close()
    partitions = await producer.partitions_for(original.topic)
    target = partition if partition in partitions else min(partitions)
    await (await producer.send_batch(batch, original.topic, partition=target))


async def _read_at(
    consumer: AIOKafkaConsumer, letter: DeadLetter
) -> ConsumerRecord[bytes, bytes] | None:
    """The first record at or after the letter's source offset, None if the partition holds
    nothing there (trimmed by retention, or the topic was recreated shorter)."""
    tp = TopicPartition(letter.source_topic, letter.source_partition)
    consumer.assign([tp])
    first = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    if not first <= letter.source_offset < end:
        return None
    consumer.seek(tp, letter.source_offset)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_TIMEOUT_S
    while loop.time() < deadline:
        if await consumer.position(tp) >= end:
            return None  # only transaction markers or aborted data from there on
        batch = await consumer.getmany(tp, timeout_ms=POLL_MS, max_records=1)
        for got in batch.get(tp, []):
            return got
    raise TimeoutError(f"the source record did not arrive in {READ_TIMEOUT_S:.0f} s")


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
    try:
        letter = parse_letter(record.value)
    except NotReplayable as exc:
        doc.update(reason_code="unreadable", reason=str(exc))
        return doc
    doc.update(
        reason_code=letter.reason_code,
        reason=letter.reason,
        source_topic=letter.source_topic,
        source_partition=letter.source_partition,
        source_offset=letter.source_offset,
        group_id=letter.group_id,
        failed_at=letter.failed_at.isoformat(),
        original=letter.original,
    )
    if letter.reference is not None:
        doc.update(value_size=letter.reference.value_size,
                   value_sha256=letter.reference.value_sha256)  # fmt: skip
    return doc


def _unb64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data, validate=True)
