"""`tokenheap fit` over JSON or JSONL: many requests, counted together, results in input order.

Requests are read in batches; the pieces of a whole batch are counted in one call, so a
conversation resent turn after turn or a popular chunk is tokenized once per process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from itertools import islice
from typing import TextIO

from worker.errors import TokenheapError
from worker.pipeline import Engine, error_result
from worker.render.models import FitResult
from worker.request.decode import Limits, decode_request
from worker.request.models import AssemblyRequest

BATCH = 512


async def fit_lines(
    engine: Engine, lines: Iterable[str], limits: Limits
) -> AsyncIterator[FitResult]:
    """One result per non-blank line, in order; a bad line yields an error result."""
    it = (line for line in lines if line.strip())
    while batch := list(islice(it, BATCH)):
        for result in await fit_batch(engine, [_decode(line, limits) for line in batch]):
            yield result


async def fit_batch(engine: Engine, reqs: list[AssemblyRequest | FitResult]) -> list[FitResult]:
    local_idx: list[int] = []
    remote_idx: list[int] = []
    for i, r in enumerate(reqs):
        if isinstance(r, AssemblyRequest):
            try:
                provider = engine.catalog.model(r.model).provider
            except TokenheapError as exc:
                reqs[i] = error_result(r.request_id, r.model, exc, r)
                continue
            (local_idx if provider == "openai" else remote_idx).append(i)
    out: list[FitResult | None] = [r if isinstance(r, FitResult) else None for r in reqs]
    remote = asyncio.gather(*(engine.fit(_req(reqs[i])) for i in remote_idx))
    local = await asyncio.to_thread(engine.fit_many, [_req(reqs[i]) for i in local_idx])
    for i, res in zip(local_idx, local, strict=True):
        out[i] = res
    for i, res in zip(remote_idx, await remote, strict=True):
        out[i] = res
    return [r for r in out if r is not None]


def _req(r: AssemblyRequest | FitResult) -> AssemblyRequest:
    assert isinstance(r, AssemblyRequest)
    return r


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


def read_single(stream: TextIO, limits: Limits) -> AssemblyRequest | FitResult:
    return _decode(stream.read(), limits)
