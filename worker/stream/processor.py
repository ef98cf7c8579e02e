"""One Kafka record in, its messages out: a result (plus alerts), or a dead letter.

The service's only contact with the engine: decode, fit, turn the result into messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord

from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.report import error_result
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.errors import BadRequest, TokenheapError
from worker.stream.flow import Publish, decode_record, source_of
from worker.stream.publish import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Outgoing,
    alert_message,
    dead_letter_message,
    result_message,
    value_limit,
)
from worker.telemetry.hooks import Telemetry

log = logging.getLogger("worker")


@dataclass(frozen=True, slots=True)
class Topics:
    results: str
    alerts: str
    dead_letter: str


class Processor:
    """One record in, its messages out: a result (plus alerts), or a dead letter."""

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        telemetry: Telemetry,
        topics: Topics,
        group_id: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._telemetry = telemetry
        self._topics = topics
        self._group_id = group_id
        self._max_value_bytes = value_limit(max_message_bytes)

    async def __call__(self, record: ConsumerRecord[bytes, bytes], publish: Publish) -> None:
        with self._telemetry.process(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            group=self._group_id,
            key=record.key,
            headers=record.headers,
        ):
            await publish(await self._messages(record))

    async def _messages(self, record: ConsumerRecord[bytes, bytes]) -> list[Outgoing]:
        try:
            req = await decode_record(record.value, self._limits)
        except BadRequest as exc:
            self._telemetry.on_dead_letter(reason_code=exc.code, topic=record.topic)
            log.info(
                "%s[%d]@%d dead-lettered (%s)", record.topic, record.partition, record.offset,
                exc.code,
            )  # fmt: skip
            letter = dead_letter_message(
                self._topics.dead_letter,
                source_of(record),
                reason_code=exc.code,
                reason=str(exc),
                group_id=self._group_id,
                max_bytes=self._max_value_bytes,
            )
            answer = await self._answer_rejected(record.value, exc)
            return [letter] if answer is None else [letter, answer]
        began = time.perf_counter()
        result = await self._fit(req)
        alerts = self._telemetry.on_result(req, result, time.perf_counter() - began)
        if req.metadata:
            result = result.model_copy(update={"metadata": req.metadata})
        key = req.conversation_id or req.request_id
        return [
            result_message(self._topics.results, result, key, self._max_value_bytes),
            *(alert_message(self._topics.alerts, a) for a in alerts),
        ]

    async def _answer_rejected(self, value: bytes | None, exc: BadRequest) -> Outgoing | None:
        """An error result for a dead-lettered request whose `request_id` can still be read
        (too large, a schema error), so its caller gets an answer instead of waiting forever;
        None when there is no id to answer to (not JSON, no object, no string id)."""
        doc = await _loose_json(value)
        rid = doc.get("request_id")
        if not isinstance(rid, str) or not rid or len(rid) > 256:
            return None
        model = doc.get("model")
        conversation = doc.get("conversation_id")
        metadata = doc.get("metadata")
        result = error_result(rid, model if isinstance(model, str) else "", exc).model_copy(
            update={
                "conversation_id": conversation if isinstance(conversation, str) else None,
                "metadata": metadata if isinstance(metadata, dict) and metadata else None,
            }
        )
        key = result.conversation_id or rid
        return result_message(self._topics.results, result, key, self._max_value_bytes)

    async def _fit(self, req: AssemblyRequest) -> FitResult:
        """The engine returns error results for requests it rejects; anything it raises is a
        bug, published as an `internal` error so the partition keeps flowing."""
        try:
            return await self._engine.fit(req)
        except TokenheapError as exc:
            return error_result(req.request_id, req.model, exc, req)
        except Exception as exc:
            # The traceback without the message: messages may quote prompt text.
            log.error(
                "%s: fit failed with %s\n%s",
                req.request_id,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            internal = TokenheapError(
                f"internal error ({type(exc).__name__}) while fitting; see the worker log"
            )
            return error_result(req.request_id, req.model, internal, req)


LOOSE_PARSE_OFFLOAD_BYTES = 256 * 1024
"""A rejected value larger than this is parsed for its id off the event loop."""


async def _loose_json(value: bytes | None) -> dict[str, Any]:
    """The value as a JSON object, or {} (best effort: it was already rejected once)."""
    if not value:
        return {}
    try:
        if len(value) > LOOSE_PARSE_OFFLOAD_BYTES:
            doc = await asyncio.to_thread(json.loads, value)
        else:
            doc = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}
