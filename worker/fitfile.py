"""`tokenheap fit` over JSON or JSONL: many requests, counted together, results in input order.

Every piece goes through the shared count cache (and pieces being counted for another
request are awaited, not recounted), so a conversation resent turn after turn or a popular
chunk is tokenized once per process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from itertools import islice

from worker.errors import TokenheapError
from worker.pipeline import Engine, Started, error_result
from worker.render.models import FitResult
from worker.request.decode import Limits, decode_request
from worker.request.models import AssemblyRequest

BATCH = 64


async def fit_lines(
    engine: Engine, lines: Iterable[str], limits: Limits
) -> AsyncIterator[FitResult]:
    """One result per non-blank line, in order; a bad line yields an error result.

    Batch k+1 is decoded and its counting started before batch k is finished, so the
    counting threads and the allocation/rendering on this thread overlap.
    """
    it = (line for line in lines if line.strip())
    ahead: _Batch | None = None
    while True:
        batch = list(islice(it, BATCH))
        nxt = _Batch.start(engine, [_decode(line, limits) for line in batch]) if batch else None
        if ahead is not None:
            for result in await ahead.finish(engine):
                yield result
        if nxt is None:
            return
        ahead = nxt


class _Batch:
    """Requests in input order: OpenAI ones counting on the threads, Claude ones as tasks."""

    def __init__(self, items: list[Started | FitResult | asyncio.Task[FitResult]]) -> None:
        self.items = items

    @classmethod
    def start(cls, engine: Engine, reqs: list[AssemblyRequest | FitResult]) -> _Batch:
        items: list[Started | FitResult | asyncio.Task[FitResult]] = []
        for r in reqs:
            if isinstance(r, FitResult):
                items.append(r)
                continue
            try:
                provider = engine.catalog.model(r.model).provider
            except TokenheapError as exc:
                items.append(error_result(r.request_id, r.model, exc, r))
                continue
            if provider == "openai":
                items.append(engine.start(r))
            else:
                items.append(asyncio.ensure_future(engine.fit(r)))
        return cls(items)

    async def finish(self, engine: Engine) -> list[FitResult]:
        out: list[FitResult] = []
        for item in self.items:
            if isinstance(item, asyncio.Task):
                out.append(await item)
            else:
                out.append(engine.finish(item))
        return out


def _decode(line: str, limits: Limits) -> AssemblyRequest | FitResult:
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
