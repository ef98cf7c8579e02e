"""Stage spans of the engine, on the OpenTelemetry API alone.

The engine opens them unconditionally; they record only under a recording span (the
worker's `process` span, set up by `worker.telemetry`), so neither the engine nor a short
`tokenheap fit` imports the SDK. The names they use are defined here, below the telemetry
package, which re-exports them in `worker.telemetry.names`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Final, Literal, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

SCOPE: Final = "tokenheap"
"""Instrumentation scope of every tokenheap span and metric."""
Stage = Literal["prepare", "count", "allocate", "truncate", "render", "confirm"]
ATTR_STAGE: Final = "tokenheap.stage"
ERROR_TYPE: Final = "error.type"


class SpanLike(Protocol):
    def is_recording(self) -> bool: ...


_ACTIVE_TRACER: ContextVar[Tracer | None] = ContextVar("tokenheap_tracer", default=None)
"""The tracer of the OtelTelemetry in charge (set by its scopes), else the global one."""


def stage(name: Stage, **attributes: AttributeValue) -> AbstractContextManager[SpanLike]:
    """A child span `<name>` (count, allocate, ...) of whatever span is current.

    Records nothing outside a recording span (the batched CLI path, a worker with no
    exporter), so the engine can call it unconditionally: it is then the current span
    itself as a context, not a generator made, entered and closed three times a request.
    Work handed to a thread pool runs outside the caller's context: wrap the `await` on
    the executor, or run the job under `contextvars.copy_context()`. Attributes must be
    counts or ids, never text.
    """
    parent = trace.get_current_span()
    if not parent.is_recording():
        return nullcontext(parent)
    return _recording(name, attributes)


@contextmanager
def _recording(name: Stage, attributes: dict[str, AttributeValue]) -> Iterator[SpanLike]:
    tracer = _ACTIVE_TRACER.get() or trace.get_tracer(SCOPE)
    attrs: dict[str, AttributeValue] = {ATTR_STAGE: name, **attributes}
    with tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            record_failure(span, exc=exc)
            raise


def record_failure(span: Span, *, exc: BaseException) -> None:
    """An exception by its type only: `error.type`, an `exception` event, ERROR status.

    The SDK's own recording would add the message and traceback text, which may quote
    input; the type is enough to find the log line that has the details.
    """
    if not span.is_recording():
        return
    kind = type(exc).__qualname__
    span.set_attribute(ERROR_TYPE, kind)
    span.add_event("exception", {"exception.type": kind})
    span.set_status(Status(StatusCode.ERROR, kind))
