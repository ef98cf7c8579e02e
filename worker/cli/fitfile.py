"""`tokenheap fit` over JSON or JSONL: many requests, counted together, results in input order.

Lines are decoded here (a line that cannot be decoded becomes an error result in its
place) and fitted by `Engine.fit_many`, which pipelines counting with allocation: a
conversation resent turn after turn or a popular chunk is tokenized once per process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable

from worker.engine.decode import Limits, decode_request
from worker.engine.engine import Engine, Item
from worker.engine.report import error_result
from worker.engine.result import FitResult
from worker.errors import TokenheapError

_INVALID_JSON = "Invalid JSON: "
"""How decode_request words a request that is not JSON (pydantic's message after it)."""


def fit_lines(
    engine: Engine,
    lines: Iterable[str],
    limits: Limits,
    first_line: Callable[[], int] | None = None,
) -> AsyncIterator[FitResult]:
    """One result per non-blank line, in order; a bad line yields an error result. Given
    `first_line` (JSON lines: the input line number of the first of `lines`, which are
    every line from there, blank ones too), that error result names its input line. It is
    asked for only then: a `--jobs` range finds it by counting the file's lines before it."""
    if first_line is None:
        return engine.fit_many(_decode(line, limits) for line in lines if line.strip())
    return engine.fit_many(
        _decode(line, limits, first_line, k) for k, line in enumerate(lines) if line.strip()
    )


def _decode(
    line: str, limits: Limits, first_line: Callable[[], int] | None = None, k: int = 0
) -> Item:
    try:
        return decode_request(line, limits)
    except TokenheapError as exc:
        if first_line is not None:
            exc = _on_line(exc, line, first_line() + k, limits)
        return error_result(_request_id_of(line), "", exc)


def _on_line(exc: TokenheapError, line: str, number: int, limits: Limits) -> TokenheapError:
    """`exc`, saying which input line it is about, a JSON fault placed by its column in that
    line: the parser's position counts the line as a document of its own, and puts the end
    of a line cut short past its line break (`line 2 column 0`), confusing for line 3."""
    message = str(exc)
    if message.startswith(_INVALID_JSON):
        try:  # decoded again without the break: bad lines only, so good ones pay nothing
            decode_request(line.rstrip("\r\n"), limits)  # stdin keeps a CRLF's \r
        except TokenheapError as again:
            message = str(again)
        fault = message.removeprefix(_INVALID_JSON).replace(" at line 1 column ", " at column ")
        message = f"invalid JSON: {fault}"
    return type(exc)(f"line {number}: {message}")


def _request_id_of(line: str) -> str:
    """Best effort, so the caller can match an error to what it sent."""
    try:
        doc = json.loads(line)
    except ValueError:
        return ""
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else ""
