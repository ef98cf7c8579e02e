"""Sending: results, alerts and dead letters as Kafka messages, through one of two publishers.

    IdempotentPublisher     at-least-once: one idempotent producer; a record counts as done
                            when every message it caused is acknowledged.
    TransactionalPublisher  exactly-once: one transactional producer per input partition
                            (aiokafka has no KIP-447 group fencing, so the transactional id
                            is what fences a zombie owner of that partition); a record counts
                            as done once its messages are in the open transaction, which
                            commits together with the consumed offsets.

Every message carries the trace context of the span that sent it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from worker.engine.result import ErrorInfo, FitResult
from worker.errors import TransactionFailed
from worker.stream.messages import DeadLetter, Header, OriginalReference
from worker.telemetry.alerts import AlertMessage
from worker.telemetry.hooks import Telemetry

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""The broker's default `message.max.bytes` (1 MiB): the default of TOKENHEAP_MAX_MESSAGE_BYTES,
which becomes the producer's `max_request_size`."""
RECORD_OVERHEAD_BYTES = 16_384
"""Room kept for key, headers and record framing when sizing a value."""
MAX_VALUE_BYTES = DEFAULT_MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES
"""What one value may take under the default message size."""
REQUEST_ID_HEADER = "request_id"
"""Header of every result and alert: the request it answers (match on it, not on the key)."""


def value_limit(max_message_bytes: int) -> int:
    """What one value may take when messages may be `max_message_bytes` long."""
    return max(1, max_message_bytes - RECORD_OVERHEAD_BYTES)


Done = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to send; built from a contract model, never from raw prompt text."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


# -- messages -------------------------------------------------------------------------


def result_message(
    topic: str, result: FitResult, key: str, max_value_bytes: int = MAX_VALUE_BYTES
) -> Outgoing:
    """A result keyed by conversation (else request) so one conversation stays in order; the
    `request_id` header says which request it answers."""
    value = result.model_dump_json(exclude_none=True).encode()
    if len(value) > max_value_bytes:
        log.warning("%s: result of %d bytes is too large to publish", result.request_id, len(value))
        result = FitResult(
            request_id=result.request_id,
            status="error",
            model=result.model,
            error=ErrorInfo(
                code="result_too_large",
                message=f"the fitted result is {len(value)} bytes, over the "
                f"{max_value_bytes}-byte message limit; lower budget.max_context_tokens "
                "or raise TOKENHEAP_MAX_MESSAGE_BYTES (and the broker's message.max.bytes)",
            ),
            tenant=result.tenant,
            pipeline=result.pipeline,
            conversation_id=result.conversation_id,
            metadata=result.metadata,
        )
        value = result.model_dump_json(exclude_none=True).encode()
    return Outgoing(topic, key.encode(), value, _request_header(result.request_id))


def alert_message(topic: str, alert: AlertMessage) -> Outgoing:
    key = alert.request_id or alert.type
    value = alert.model_dump_json(exclude_none=True).encode()
    return Outgoing(topic, key.encode(), value, _request_header(alert.request_id))


def _request_header(request_id: str | None) -> tuple[tuple[str, bytes], ...]:
    return ((REQUEST_ID_HEADER, request_id.encode()),) if request_id else ()


@dataclass(frozen=True, slots=True)
class Source:
    """Where a consumed record came from, and its raw parts (for a dead letter)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()


HEAD_BYTES = 4096
"""How much of a referenced original's value a letter keeps, to show what it was."""
MAX_REASON_CHARS = 4096
"""A reason longer than this is cut in a referenced letter, which must always fit."""


def dead_letter_message(
    topic: str,
    source: Source,
    *,
    reason_code: str,
    reason: str,
    group_id: str,
    max_bytes: int = MAX_VALUE_BYTES,
) -> Outgoing:
    """The original record (key, value, headers: null, empty and binary kept apart) in base64,
    with why and where from. When that letter would not fit in `max_bytes` (an original over
    about three quarters of the limit), the record is kept by reference instead: its position,
    digests, size and first bytes; `dlq replay` re-reads it from the source topic."""
    letter = DeadLetter(
        reason_code=reason_code,
        reason=reason,
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        source_timestamp_ms=source.timestamp_ms,
        original="inline",
        key_b64=_b64(source.key),
        value_b64=_b64(source.value),
        headers=[Header(key=k, value_b64=_b64(v)) for k, v in source.headers],
        group_id=group_id,
        failed_at=datetime.now(UTC),
    )
    value = _letter_bytes(letter)
    if _size(source.key, value) <= max_bytes:
        return Outgoing(topic, source.key, value)
    letter = letter.model_copy(
        update={
            "original": "reference",
            "reason": reason[:MAX_REASON_CHARS],
            "key_b64": None,
            "value_b64": None,
            "headers": [],
            "reference": OriginalReference(
                record_sha256=record_digest(source.key, source.value, source.headers),
                value_sha256=None if source.value is None else sha256(source.value).hexdigest(),
                value_size=None if source.value is None else len(source.value),
                key_size=None if source.key is None else len(source.key),
                header_count=len(source.headers),
                head_b64=_b64((source.value or b"")[:HEAD_BYTES]) or "",
            ),
        }
    )
    value = _letter_bytes(letter)
    # The letter's own key only partitions the DLQ: drop it rather than the letter.
    key = source.key if _size(source.key, value) <= max_bytes else None
    return Outgoing(topic, key, value)


def record_digest(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> str:
    """Hex SHA-256 over the key, the value and the headers in order, each part prefixed by its
    length as 8 big-endian bytes (all ones for null), so null, empty and a different split of
    the same bytes all give different digests."""
    h = sha256()

    def part(data: bytes | None) -> None:
        h.update(_NULL_LEN if data is None else len(data).to_bytes(8, "big"))
        h.update(data or b"")

    part(key)
    part(value)
    h.update(len(headers).to_bytes(8, "big"))
    for k, v in headers:
        part(k.encode())
        part(v)
    return h.hexdigest()


_NULL_LEN = b"\xff" * 8


def _letter_bytes(letter: DeadLetter) -> bytes:
    # Not exclude_none: a null header value, key or value is data, and must be written.
    return letter.model_dump_json().encode()


def _size(key: bytes | None, value: bytes) -> int:
    return len(key or b"") + len(value)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# -- sending --------------------------------------------------------------------------


async def _send(producer: AIOKafkaProducer, msg: Outgoing, telemetry: Telemetry) -> Any:
    """Queue one message inside a `send` span; returns its delivery future."""
    with telemetry.send(topic=msg.topic):
        headers = [*msg.headers, *telemetry.outgoing_headers()]
        return await producer.send(msg.topic, msg.value, key=msg.key, headers=headers)


def _when_all(futures: Sequence[asyncio.Future[Any]], done: Done | None) -> asyncio.Future[None]:
    """A future for all deliveries; `done` runs only if every one succeeded. Cancelling the
    result never cancels a delivery (that would not unsend it)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[None] = loop.create_future()
    left = len(futures)
    errors: list[BaseException] = []

    def one(fut: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if fut.cancelled():
            errors.append(asyncio.CancelledError())
        elif (exc := fut.exception()) is not None:
            errors.append(exc)
        if left == 0 and not out.done():
            if errors:
                out.set_exception(errors[0])
            else:
                if done is not None:
                    done()
                out.set_result(None)

    if not futures:
        if done is not None:
            done()
        out.set_result(None)
    for fut in futures:
        fut.add_done_callback(one)
    return out


def producer_kwargs(
    common: dict[str, Any], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Durable and ordered: idempotence implies acks=all and no reordering on retry."""
    return {
        **common,
        "enable_idempotence": True,
        "max_request_size": max_message_bytes,
        "max_batch_size": 256 * 1024,
        "linger_ms": 2,
    }


class IdempotentPublisher:
    """At-least-once: the consumer commits offsets once deliveries are acknowledged."""

    commits_offsets = False

    def __init__(
        self,
        common: dict[str, Any],
        telemetry: Telemetry,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(common, max_message_bytes))
        self._telemetry = telemetry
        self._healthy = False

    async def start(self) -> None:
        await self._producer.start()
        self._healthy = True

    async def stop(self) -> None:
        self._healthy = False
        await self._producer.stop()

    def ready(self) -> bool:
        return self._healthy

    async def assigned(self, tps: Collection[TopicPartition]) -> None:
        return None

    async def revoked(self, tps: Collection[TopicPartition]) -> None:
        return None

    async def publish(
        self, tp: TopicPartition, messages: Sequence[Outgoing], done: Done
    ) -> asyncio.Future[None]:
        """Queue in call order (so per partition in offset order); `done` after the acks."""
        futures = [await _send(self._producer, m, self._telemetry) for m in messages]
        delivered = _when_all(futures, done)
        delivered.add_done_callback(self._watch)
        return delivered

    def _watch(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._healthy = False

    async def commit(
        self, tps: Collection[TopicPartition], offset_of: Callable[[TopicPartition], int | None]
    ) -> dict[TopicPartition, int]:
        raise NotImplementedError("at-least-once offsets are committed by the consumer")

    async def abort(self, tp: TopicPartition) -> None:
        return None


@dataclass(slots=True)
class _Txn:
    producer: AIOKafkaProducer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = False
    closed: bool = False
    deliveries: list[asyncio.Future[Any]] = field(default_factory=list)


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """Stable per (group, input partition): whoever owns the partition next fences us."""
    return f"tokenheap-{group_id}-{tp.topic}-{tp.partition}"


class TransactionalPublisher:
    """Exactly-once: consume-transform-produce in per-partition transactions."""

    commits_offsets = True

    def __init__(
        self,
        common: dict[str, Any],
        group_id: str,
        telemetry: Telemetry,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._common = common
        self._max_message_bytes = max_message_bytes
        self._group_id = group_id
        self._telemetry = telemetry
        self._txns: dict[TopicPartition, _Txn] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.revoked(list(self._txns))

    def ready(self) -> bool:
        return all(not t.closed for t in self._txns.values())

    async def assigned(self, tps: Collection[TopicPartition]) -> None:
        """Start a producer per new partition. Starting registers the transactional id, which
        aborts (or waits out) whatever the previous owner left open, so offsets read after
        this are stable."""
        new = [tp for tp in tps if tp not in self._txns]
        producers = {
            tp: AIOKafkaProducer(
                **producer_kwargs(self._common, self._max_message_bytes),
                transactional_id=transactional_id(self._group_id, tp),
            )
            for tp in new
        }
        results = await asyncio.gather(
            *(p.start() for p in producers.values()), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(p.stop() for p in producers.values()), return_exceptions=True)
            raise failed[0]
        for tp, producer in producers.items():
            self._txns[tp] = _Txn(producer)

    async def revoked(self, tps: Collection[TopicPartition]) -> None:
        """Close the partitions' producers; a transaction still open is aborted."""
        await asyncio.gather(*(self._close(tp) for tp in tps if tp in self._txns))

    async def _close(self, tp: TopicPartition) -> None:
        txn = self._txns.pop(tp)
        async with txn.lock:
            txn.closed = True
            if txn.open:
                await self._abort_quietly(tp, txn)
            await txn.producer.stop()

    async def publish(
        self, tp: TopicPartition, messages: Sequence[Outgoing], done: Done
    ) -> asyncio.Future[None]:
        """Send into the partition's open transaction; `done` runs under the same lock a
        commit takes, so a commit never splits one record's messages from its offset."""
        txn = self._txns.get(tp)
        if txn is None:
            raise TransactionFailed(f"{tp.topic}[{tp.partition}] has no producer: not assigned")
        async with txn.lock:
            if txn.closed:
                raise TransactionFailed(f"{tp.topic}[{tp.partition}] was revoked")
            if not txn.open:
                await txn.producer.begin_transaction()
                txn.open = True
            for m in messages:
                txn.deliveries.append(await _send(txn.producer, m, self._telemetry))
            done()
        return _when_all([], None)

    async def commit(
        self, tps: Collection[TopicPartition], offset_of: Callable[[TopicPartition], int | None]
    ) -> dict[TopicPartition, int]:
        """Commit each partition's open transaction with its next offset; raises
        TransactionFailed (after aborting) if any could not commit."""
        results = await asyncio.gather(
            *(self._commit_one(tp, offset_of) for tp in tps if tp in self._txns),
            return_exceptions=True,
        )
        committed: dict[TopicPartition, int] = {}
        failure: BaseException | None = None
        for r in results:
            if isinstance(r, BaseException):
                failure = failure or r
            elif r is not None:
                committed[r[0]] = r[1]
        if failure is not None:
            raise failure
        return committed

    async def _commit_one(
        self, tp: TopicPartition, offset_of: Callable[[TopicPartition], int | None]
    ) -> tuple[TopicPartition, int] | None:
        txn = self._txns.get(tp)
        if txn is None:
            return None
        async with txn.lock:
            if not txn.open or txn.closed:
                return None
            offset = offset_of(tp)  # under the lock: exactly the records sent so far
            try:
                if offset is not None:
                    await txn.producer.send_offsets_to_transaction({tp: offset}, self._group_id)
                await txn.producer.commit_transaction()
            except Exception as exc:
                # Poisoned: the ledger counts the aborted records as done, so nothing more
                # may be sent or committed for this partition by this process.
                txn.closed = True
                await self._abort_quietly(tp, txn)
                raise TransactionFailed(
                    f"{tp.topic}[{tp.partition}]: transaction commit failed "
                    f"({type(exc).__name__}: {exc}); its records will be read again"
                ) from exc
            finally:
                txn.open = False
                _settle(txn.deliveries)
                txn.deliveries = []
        return (tp, offset) if offset is not None else None

    async def abort(self, tp: TopicPartition) -> None:
        """Throw away the open transaction (a record was cut off half-sent)."""
        txn = self._txns.get(tp)
        if txn is None:
            return
        async with txn.lock:
            if txn.open:
                await self._abort_quietly(tp, txn)

    async def _abort_quietly(self, tp: TopicPartition, txn: _Txn) -> None:
        try:
            await txn.producer.abort_transaction()
        except Exception as exc:  # the next owner's producer aborts it anyway
            log.warning("%s[%d]: abort failed (%s)", tp.topic, tp.partition, type(exc).__name__)
        finally:
            txn.open = False
            _settle(txn.deliveries)
            txn.deliveries = []


def _settle(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Read the outcome of finished deliveries so asyncio does not warn about them."""
    for fut in futures:
        if fut.done() and not fut.cancelled():
            fut.exception()
        else:
            fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
