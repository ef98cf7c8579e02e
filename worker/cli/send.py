"""`tokenheap send` and `tokenheap tail`: talk to a running worker through Kafka.

send: the results topic is read from its end *before* anything is produced (positions are
resolved first), so no answer can slip past; each result is matched to what was sent by
its `request_id` header and printed as it arrives; after `timeout_s` whatever is still
unanswered is named on stderr. Exit 0 when every request got an ok result, 1 when some got
an error result or none at all.

tail: one topic as JSON lines, `read_committed` (an aborted exactly-once transaction is
never shown), from the end (follow) or from the beginning.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.kafka import check_connection, client_kwargs, partitions_of
from worker.stream.publish import REQUEST_ID_HEADER, producer_kwargs

POLL_MS = 200


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request to produce: its id (to match the answer), key and bytes."""

    request_id: str
    key: bytes
    value: bytes


def outbound(texts: Sequence[str]) -> list[Outbound]:
    """Requests as they will be sent; ConfigError (nothing is sent) for an entry that is not
    a JSON object with a string `request_id`, or for an id used twice (answers could not be
    told apart). Everything else is the worker's to judge: it answers with an error result."""
    out: list[Outbound] = []
    seen: set[str] = set()
    for n, text in enumerate(texts, 1):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"request {n} is not JSON ({exc}); nothing was sent") from None
        rid = doc.get("request_id") if isinstance(doc, dict) else None
        if not isinstance(rid, str) or not rid:
            raise ConfigError(f"request {n} has no string request_id; nothing was sent")
        if rid in seen:
            raise ConfigError(f"request_id {rid!r} is used twice; nothing was sent")
        seen.add(rid)
        conversation = doc.get("conversation_id")
        key = conversation if isinstance(conversation, str) and conversation else rid
        compact = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        out.append(Outbound(rid, key.encode(), compact))
    return out


def request_id_of(record: ConsumerRecord[bytes, bytes]) -> str | None:
    """The request a result answers: its header (results of older workers: the body)."""
    for key, value in record.headers:
        if key == REQUEST_ID_HEADER and value is not None:
            return str(value.decode("utf-8", "replace"))
    try:
        doc = json.loads(record.value or b"")
    except ValueError:
        return None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else None


@dataclass(slots=True)
class SendReport:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    unsent: int = 0
    missing: int = 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok == self.sent and not self.unsent else 1


async def send(
    settings: Settings,
    requests: Sequence[Outbound],
    *,
    timeout_s: float,
    emit: Callable[[bytes], None],
    err: TextIO,
) -> SendReport:
    """Produce `requests` to the requests topic and `emit` each matching result's value as it
    arrives, until every request is answered or `timeout_s` has passed since the last send."""
    await check_connection(settings)
    common = client_kwargs(settings, "tokenheap-send")
    partitions = await partitions_of(common, settings.results_topic)
    _ = await partitions_of(common, settings.requests_topic)  # a clear error if missing
    consumer = AIOKafkaConsumer(
        **common, enable_auto_commit=False, isolation_level="read_committed"
    )
    producer = AIOKafkaProducer(**producer_kwargs(common, settings.max_message_bytes))
    report = SendReport()
    try:
        await consumer.start()
        tps = [TopicPartition(settings.results_topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve now: an answer produced after this point is seen
            await consumer.position(tp)
        await producer.start()
        pending = await _produce(producer, settings.requests_topic, requests, report, err)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=POLL_MS)
            for records in batch.values():
                for record in records:
                    rid = request_id_of(record)
                    if rid is None or rid not in pending:
                        continue  # someone else's answer, or a duplicate of ours
                    pending.discard(rid)
                    emit(record.value or b"")
                    if _status_of(record.value) == "ok":
                        report.ok += 1
                    else:
                        report.errors += 1
        for rid in sorted(pending):
            err.write(f"tokenheap: no answer for {rid!r} within {timeout_s:g} s\n")
        report.missing = len(pending)
    finally:
        await producer.stop()
        await consumer.stop()
    return report


async def _produce(
    producer: AIOKafkaProducer,
    topic: str,
    requests: Sequence[Outbound],
    report: SendReport,
    err: TextIO,
) -> set[str]:
    """Send all (queued at once, acknowledged together); the ids that went out."""
    futures: list[tuple[Outbound, asyncio.Future[Any]]] = []
    for req in requests:
        try:
            futures.append((req, await producer.send(topic, req.value, key=req.key)))
        except KafkaError as exc:  # e.g. over max_request_size: refused before sending
            report.unsent += 1
            err.write(f"tokenheap: {req.request_id!r} not sent: {_why(exc)}\n")
    pending: set[str] = set()
    for req, fut in futures:
        try:
            await fut
        except KafkaError as exc:
            report.unsent += 1
            err.write(f"tokenheap: {req.request_id!r} not sent: {_why(exc)}\n")
            continue
        pending.add(req.request_id)
        report.sent += 1
    return pending


def _why(exc: KafkaError) -> str:
    name = type(exc).__name__
    if name == "MessageSizeTooLargeError":
        return (
            f"{exc}; raise TOKENHEAP_MAX_MESSAGE_BYTES (and the broker's message.max.bytes) "
            "or send a smaller request"
        )
    return f"{name}: {exc}"


def _status_of(value: bytes | None) -> str | None:
    try:
        doc = json.loads(value or b"")
    except ValueError:
        return None
    status = doc.get("status") if isinstance(doc, dict) else None
    return status if isinstance(status, str) else None


async def tail(
    settings: Settings,
    topic: str,
    *,
    from_beginning: bool,
    limit: int | None,
    idle_s: float | None,
    emit: Callable[[bytes], None],
) -> int:
    """`emit` each record's value of `topic` (read_committed), oldest first per partition;
    stop after `limit` records or `idle_s` seconds without one (None: follow forever).
    Returns how many it emitted."""
    await check_connection(settings)
    common = client_kwargs(settings, "tokenheap-tail")
    partitions = await partitions_of(common, topic)
    consumer = AIOKafkaConsumer(
        **common, enable_auto_commit=False, isolation_level="read_committed"
    )
    shown = 0
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while limit is None or shown < limit:
            batch = await consumer.getmany(timeout_ms=POLL_MS)
            if batch:
                last = loop.time()
            elif idle_s is not None and loop.time() - last >= idle_s:
                break
            for records in batch.values():
                for record in records:
                    if limit is not None and shown >= limit:
                        break
                    emit(record.value or b"null")
                    shown += 1
    finally:
        await consumer.stop()
    return shown
