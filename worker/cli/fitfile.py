"""`tokenheap fit` over JSON or JSONL: many requests, counted together, results in input order.

Lines are decoded here (a line that cannot be decoded becomes an error result in its
place) and fitted by `Engine.fit_many`, which pipelines counting with allocation: a
conversation resent turn after turn or a popular chunk is tokenized once per process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

from worker.engine.decode import Limits, decode_request
from worker.engine.engine import Engine, Item
from worker.engine.report import error_result
from worker.engine.result import FitResult
from worker.errors import TokenheapError


def fit_lines(engine: Engine, lines: Iterable[str], limits: Limits) -> AsyncIterator[FitResult]:
    """One result per non-blank line, in order; a bad line yields an error result."""
    return engine.fit_many(_decode(line, limits) for line in lines if line.strip())


def _decode(line: str, limits: Limits) -> Item:
    try:
        return decode_request(line, limits)
    except TokenheapError as exc:
        return error_result(_request_id_of(line), "", exc)


def _request_id_of(line: str) -> str:
    """Best effort, so the caller can match an error to what it sent."""
    try:
        doc = json.loads(line)
    except ValueError:
        return ""
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else ""
