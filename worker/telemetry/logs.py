"""Structured JSON logs (stdlib logging, pydantic-core's JSON writer) with trace ids.

One object per line: `ts`, `level`, `logger`, `message`, `trace_id`/`span_id` when a span is
current, then whatever the call passed in `extra=`. The per-request ledger line is
`log_result`: ids, counts and codes, never prompt text.

    {"ts":"...","level":"INFO","logger":"tokenheap.requests",
     "message":"req-7f3a fit 7412/8192 tokens (dropped 3 history)","request_id":"req-7f3a",
     "model":"gpt-4o","tokens":{"system":31,...},"total_tokens":7412,...}
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from opentelemetry import trace
from pydantic_core import to_json

from worker.engine.result import FitResult
from worker.telemetry import names

REQUEST_LOGGER: Final = "tokenheap.requests"
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "trace_id", "span_id"}
)


_STAMPED: Final = "_trace_stamped"
"""Set on a record once its trace context was looked up (found or not), so the formatter
does not look again: one lookup per record."""


class TraceContextFilter(logging.Filter):
    """Stamps `trace_id`/`span_id` of the span current where the record is created."""

    def filter(self, record: logging.LogRecord) -> bool:
        _stamp(record)
        return True


def _stamp(record: logging.LogRecord) -> None:
    if hasattr(record, "trace_id") or hasattr(record, _STAMPED):
        return
    setattr(record, _STAMPED, True)
    ids = _current_ids()
    if ids is not None:
        record.trace_id, record.span_id = ids


def _current_ids() -> tuple[str, str] | None:
    """`trace_id` and `span_id` of the span current here, as lines carry them."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


_ENCODER: Final = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))
"""What `json.dumps(doc, default=str, ensure_ascii=False, separators=...)` builds anew on
every call; compact, like pydantic-core's lines."""


def _json(doc: dict[str, Any]) -> str:
    """A line's JSON: pydantic-core's writer (in Rust: a ledger line in ~3 us, the stdlib's
    encoder ~14 us), `str` of what it has no JSON for; the stdlib's encoder for a document
    it refuses whole (bytes that are not UTF-8, a key it cannot make a string of)."""
    try:
        return to_json(doc, fallback=str).decode()
    except Exception:  # whatever it refuses, the line is still written
        return _ENCODER.encode(doc)


class _Timestamps:
    """`datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`, with the part up
    to the seconds formatted once per second (every request logs a line)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        micros = round((created - second) * 1e6)  # as fromtimestamp rounds: half to even
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            if second < 0:  # not a clock reading; not worth a cache
                return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
            self._prefix = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:19]
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}+00:00"  # isoformat truncates to ms


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra=` fields are kept, values made JSON-safe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ts = _Timestamps()

    def head(
        self, created: float, level: str, name: str, message: str, ids: tuple[Any, Any] | None
    ) -> dict[str, Any]:
        """The keys every line starts with, in this order (a record's, or `log_result`'s
        own line): when, how bad, whose, what, and the ids of the span current then."""
        doc: dict[str, Any] = {
            "ts": self._ts(created),
            "level": level,
            "logger": name,
            "message": message,
        }
        if ids is not None:
            doc["trace_id"], doc["span_id"] = ids
        return doc

    def format(self, record: logging.LogRecord) -> str:
        _stamp(record)  # a no-op after the TraceContextFilter of this handler
        trace_id = getattr(record, "trace_id", None)
        ids = None if trace_id is None else (trace_id, getattr(record, "span_id", None))
        doc = self.head(record.created, record.levelname, record.name, record.getMessage(), ids)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            doc["exc"] = self.formatException(record.exc_info)
        return _json(doc)


def configure_logging(
    level: int | str = "INFO", *, stream: TextIO | None = None, json_lines: bool = True
) -> logging.Handler:
    """Root handler to `stream` (stderr): JSON lines with trace ids, or plain text.

    Replaces a handler this function installed before, so calling it twice is harmless.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.set_name("tokenheap")
    global _JSON_HANDLER
    _JSON_HANDLER = handler if json_lines else None
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "tokenheap"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class _ProcessTag(logging.Filter):
    """`worker_process` on every record of a child of `TOKENHEAP_PROCESSES`, so the lines
    the children write to the one stream say whose they are."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker_process = self.index
        return True


def tag_process(index: int) -> None:
    """Mark every line the handler of `configure_logging` writes as child `index`'s."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "tokenheap":
            handler.addFilter(_ProcessTag(index))


def result_fields(result: FitResult, duration_s: float) -> dict[str, Any]:
    """The ledger fields of one result: ids, tokens per slot, budget, drops, alert types."""
    fields: dict[str, Any] = {
        "request_id": result.request_id,
        "model": result.model,
        "provider": result.provider,
        "profile": result.profile,
        "tenant": result.tenant,
        "pipeline": result.pipeline,
        "status": result.status,
        "duration_ms": round(duration_s * 1000, 3),
    }
    usage = result.usage
    if usage is not None:
        fields["tokens"] = {slot: int(getattr(usage, slot)) for slot in names.SLOTS}
        fields["total_tokens"] = usage.total_tokens
        fields["budget_tokens"] = usage.budget_tokens
        fields["utilization"] = usage.utilization
        fields["count_method"] = result.count_method
        fields["exact"] = result.exact
    if result.dropped:
        dropped: dict[str, int] = {}
        for d in result.dropped:
            dropped[d.slot] = dropped.get(d.slot, 0) + 1
        fields["dropped"] = dropped
    if result.alerts:
        fields["alerts"] = [a.type for a in result.alerts]
    if result.error is not None:
        fields["error_code"] = result.error.code
    return {k: v for k, v in fields.items() if v is not None}


def ledger_line(result: FitResult) -> str:
    """`req-7f3a fit 7412/8192 tokens (dropped 3 history)`, or the error code.

    >>> from worker.engine.result import ErrorInfo
    >>> ledger_line(FitResult(request_id="r1", status="error", model="m",
    ...                       error=ErrorInfo(code="over_budget", message="x")))
    'r1 failed (over_budget)'
    """
    if result.error is not None or result.usage is None:
        code = result.error.code if result.error else "no usage"
        return f"{result.request_id} failed ({code})"
    u = result.usage
    parts = []
    dropped: dict[str, int] = {}
    for d in result.dropped:
        dropped[d.slot] = dropped.get(d.slot, 0) + 1
    parts += [f"dropped {n} {slot}" for slot, n in sorted(dropped.items())]
    if result.truncated:
        parts.append(f"truncated {len(result.truncated)} context")
    verdict = ", ".join(parts) or "all kept"
    return f"{result.request_id} fit {u.total_tokens}/{u.budget_tokens} tokens ({verdict})"


def log_result(logger: logging.Logger, result: FitResult, duration_s: float) -> None:
    """The one INFO line per request.

    When its only way out is the JSON handler of `configure_logging` (the worker's and the
    CLI's own set-up), the line is written by that handler's stream directly: the same
    JSON the handler would write (the tests compare the two), without the `LogRecord`
    and the passes of `logging` that only a handler or a filter of someone else's would
    need (~38 us a line instead of 80-90, a few percent of the worker's time per request).
    Otherwise the record is made here rather than by `logger.info`, which would walk the
    stack to find this very function: same fields, same handlers and filters."""
    if not logger.isEnabledFor(logging.INFO):
        return
    message, fields = ledger_line(result), result_fields(result, duration_s)
    handler = _only_handler(logger)
    if handler is not None and _write_direct(handler, logger.name, message, fields):
        return
    here = sys._getframe()
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        here.f_code.co_filename,
        here.f_lineno,
        message,
        (),
        None,
        here.f_code.co_name,
        fields,
    )
    logger.handle(record)


_JSON_HANDLER: logging.StreamHandler[TextIO] | None = None
"""The JSON handler `configure_logging` installed last."""
_OUR_FILTERS: Final = (TraceContextFilter, _ProcessTag)


def _only_handler(logger: logging.Logger) -> logging.StreamHandler[TextIO] | None:
    """The JSON handler of `configure_logging` when an INFO record of `logger` would reach
    it and nothing else: no filter on `logger`, no handler up its chain but that one on
    the root, which has no filters of its own, and only ours on the handler."""
    handler = _JSON_HANDLER
    if handler is None or logger.filters or handler.level > logging.INFO:
        return None
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None  # records of another shape (an instrumentation's extra fields)
    if logging.getLevelName(logging.INFO) != "INFO":
        return None  # the level named otherwise (`logging.addLevelName`)
    if type(handler.formatter) is not JsonFormatter:
        return None
    if any(type(f) not in _OUR_FILTERS for f in handler.filters):
        return None
    root = logging.root
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    if node is not root or root.filters or len(root.handlers) != 1:
        return None
    return handler if root.handlers[0] is handler else None


def _write_direct(
    handler: logging.StreamHandler[TextIO], name: str, message: str, fields: dict[str, Any]
) -> bool:
    """What `handler` would write for an INFO record of `name` with `fields` as extras, in
    the order `JsonFormatter` writes them; False when the stream refused it (the caller
    then goes the standard way, whose `handleError` reports it)."""
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    # held from the timestamp on, as `Handler.handle` holds it to format
    with handler.lock or nullcontext():
        doc = formatter.head(time.time(), "INFO", name, message, _current_ids())
        doc.update(fields)
        for f in handler.filters:
            if type(f) is _ProcessTag:
                doc["worker_process"] = f.index
        stream = handler.stream
        try:
            stream.write(_json(doc) + handler.terminator)
        except RecursionError:
            raise
        except Exception:  # not written: written (or reported) the standard way instead
            return False
        flush = getattr(stream, "flush", None)
        try:
            if flush is not None:
                flush()
        except RecursionError:
            raise
        except Exception:  # written, not flushed: reported as `StreamHandler` reports it
            handler.handleError(logging.LogRecord(name, logging.INFO, "", 0, message, (), None))
    return True
