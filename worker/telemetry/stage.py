"""Stage spans for the engine, on the OpenTelemetry API alone.

Kept apart from `otel.py` so the engine (and a short `tokenheap fit`) does not import the
SDK and its exporters just to open spans that record nothing without a provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from worker.telemetry import names, spans
from worker.telemetry.hooks import SpanLike

_ACTIVE_TRACER: ContextVar[Tracer | None] = ContextVar("tokenheap_tracer", default=None)
"""The tracer of the OtelTelemetry in charge (set by its scopes), else the global one."""


@contextmanager
def stage(name: names.Stage, **attributes: AttributeValue) -> Iterator[SpanLike]:
    """A child span `<name>` (count, allocate, ...) of whatever span is current.

    Records nothing outside a recording span (the batched CLI path), so the engine can call
    it unconditionally. Work handed to a thread pool runs outside the caller's context:
    wrap the `await` on the executor, or run the job under `contextvars.copy_context()`.
    Attributes must be counts or ids, never text.
    """
    parent = trace.get_current_span()
    if not parent.is_recording():
        yield parent
        return
    tracer = _ACTIVE_TRACER.get() or trace.get_tracer(names.SCOPE)
    attrs: dict[str, AttributeValue] = {names.ATTR_STAGE: name, **attributes}
    with tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            spans.record_failure(span, exc=exc)
            raise
