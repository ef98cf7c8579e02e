"""The telemetry interface the transport calls; one object, created once per process.

The worker only ever talks to `Telemetry`; span, metric and alert details live behind it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.engine.stage import SpanLike
from worker.telemetry.alerts import AlertMessage

if TYPE_CHECKING:  # the OpenTelemetry API loads only when telemetry is on
    from worker.telemetry.instruments import KafkaSource

KafkaHeaders = Sequence[tuple[str, bytes]]


class Telemetry(Protocol):
    def process(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        group: str,
        key: bytes | None,
        headers: KafkaHeaders,
    ) -> AbstractContextManager[SpanLike]:
        """A CONSUMER `process <topic>` span, child of the trace context in `headers`."""
        ...

    def on_result(
        self, req: AssemblyRequest | None, result: FitResult, duration_s: float
    ) -> list[AlertMessage]:
        """Record tokens, drops and alerts of a result on the current span and in metrics;
        return the alert messages to publish (per request, and sustained raises/clears)."""
        ...

    def on_dead_letter(self, *, reason_code: str, topic: str) -> None: ...

    def outgoing_headers(self) -> list[tuple[str, bytes]]:
        """W3C trace context (and baggage) of the current span, for a message we send."""
        ...

    @contextmanager
    def send(self, *, topic: str) -> Iterator[SpanLike]:
        """A PRODUCER `send <topic>` span around one publish."""
        ...

    def watch_kafka(self, source: KafkaSource) -> None:
        """Observe the consuming side's state (lag, in flight, paused) at each collection."""
        ...

    def on_rebalance(self, *, kind: str, partitions: int) -> None:
        """`partitions` were assigned (`kind="assigned"`) or revoked."""
        ...

    def on_commit(self, duration_s: float) -> None:
        """One offset (or transaction) commit took `duration_s`."""
        ...

    def on_kafka_outage_start(self) -> None:
        """The broker stopped answering (counted when it starts, so it shows during it)."""
        ...

    def on_kafka_outage_end(self, duration_s: float) -> None:
        """The broker answers again after `duration_s` seconds."""
        ...


class _NoSpan:
    def is_recording(self) -> bool:
        return False


class NoopTelemetry:
    """Records nothing and raises no alerts; for tests of the transport alone."""

    @contextmanager
    def process(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        group: str,
        key: bytes | None,
        headers: KafkaHeaders,
    ) -> Iterator[SpanLike]:
        yield _NoSpan()

    def on_result(
        self, req: AssemblyRequest | None, result: FitResult, duration_s: float
    ) -> list[AlertMessage]:
        return []

    def on_dead_letter(self, *, reason_code: str, topic: str) -> None:
        return None

    def outgoing_headers(self) -> list[tuple[str, bytes]]:
        return []

    @contextmanager
    def send(self, *, topic: str) -> Iterator[SpanLike]:
        yield _NoSpan()

    def watch_kafka(self, source: KafkaSource) -> None:
        return None

    def on_rebalance(self, *, kind: str, partitions: int) -> None:
        return None

    def on_commit(self, duration_s: float) -> None:
        return None

    def on_kafka_outage_start(self) -> None:
        return None

    def on_kafka_outage_end(self, duration_s: float) -> None:
        return None
