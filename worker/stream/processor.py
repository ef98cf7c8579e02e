"""One Kafka record in, its messages out: a result (plus alerts), or a dead letter.

The service's only contact with the engine: decode, fit, turn the result into messages.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.report import error_result
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.errors import BadRequest, TokenheapError
from worker.stream.flow import Publish, decode_record, source_of
from worker.stream.publish import Outgoing, alert_message, dead_letter_message, result_message
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
        self, engine: Engine, limits: Limits, telemetry: Telemetry, topics: Topics, group_id: str
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._telemetry = telemetry
        self._topics = topics
        self._group_id = group_id

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
            )
            return [letter]
        began = time.perf_counter()
        result = await self._fit(req)
        alerts = self._telemetry.on_result(req, result, time.perf_counter() - began)
        key = req.conversation_id or req.request_id
        return [
            result_message(self._topics.results, result, key),
            *(alert_message(self._topics.alerts, a) for a in alerts),
        ]

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
