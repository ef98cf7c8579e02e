"""`tokenheap fit --jobs N`: blocks of lines fitted in N forked processes, output in order.

Once counts come from the cache, the Python work around them (decoding, allocating,
rendering, serializing) is what a file of requests costs, and one interpreter runs it on
one core. The parent loads the vocabulary before forking, so children start with it for
free; each child keeps its own count cache and event loop across blocks. A conversation
resent in blocks handled by different children is counted at most once per child.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from worker.cli.fitfile import fit_lines
from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.result import FitResult
from worker.runtime import settle_heap

BLOCK = 64
Format = Callable[[FitResult], str]

_child: tuple[Engine, Limits, Format, asyncio.AbstractEventLoop] | None = None


def fit_parallel(
    make_engine: Callable[[], Engine],
    lines: Iterable[str],
    limits: Limits,
    fmt: Format,
    jobs: int,
    preload: Iterable[str] = ("o200k_base",),
) -> Iterator[tuple[str, int]]:
    """Yield (formatted block, failed count) per block of lines, in input order."""
    global _child
    engine = make_engine()
    engine.preload(list(preload))  # loaded once here, shared with the children by fork
    loop = asyncio.new_event_loop()
    _child = (engine, limits, fmt, loop)
    settle_heap()  # frozen before the fork: children do not copy pages to collect them
    ctx = multiprocessing.get_context("fork")
    blocks = _blocks(lines)
    try:
        with ctx.Pool(jobs) as pool:
            yield from pool.imap(_fit_block, blocks, chunksize=1)
    finally:
        _child = None
        loop.close()


def _blocks(lines: Iterable[str]) -> Iterator[list[str]]:
    it = (line for line in lines if line.strip())
    while block := list(islice(it, BLOCK)):
        yield block


def _fit_block(block: list[str]) -> tuple[str, int]:
    if _child is None:  # pragma: no cover - only reached in a child forked without state
        raise RuntimeError("fit worker started without an engine")
    engine, limits, fmt, loop = _child

    async def run() -> tuple[str, int]:
        parts: list[str] = []
        failed = 0
        async for result in fit_lines(engine, block, limits):
            failed += result.status != "ok"
            parts.append(fmt(result))
        return "".join(parts), failed

    return loop.run_until_complete(run())
