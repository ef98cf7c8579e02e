"""What the worker sends, as Kafka messages: results, alerts and dead letters.

Built from the contract models only (never from raw prompt text); the publishers in
`publish.py` send them. Also the sizes that bound a message, and the record digest that
lets a dead letter refer to an original too large to copy.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256

from worker.engine.result import ErrorInfo, FitResult
from worker.stream.messages import DeadLetter, Header, OriginalReference
from worker.telemetry.alerts import AlertMessage

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


_RESULT_JSON = FitResult.__pydantic_serializer__


def result_json(result: FitResult) -> bytes:
    """`result.model_dump_json(exclude_none=True).encode()` without the `str` between:
    pydantic writes UTF-8 bytes, which `model_dump_json` decodes only for us to encode
    again (~10 us of a resent 33 KB conversation's ~75 us dump, 1000 results timed)."""
    return _RESULT_JSON.to_json(result, exclude_none=True)


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
    value = result_json(result)
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
        value = result_json(result)
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
