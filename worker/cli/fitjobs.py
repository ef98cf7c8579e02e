"""`tokenheap fit --jobs N`: a JSON lines file cut into N ranges, each fitted by a fork.

Once counts come from the cache, the Python work around them (decoding, allocating,
rendering, serializing) is what a file of requests costs, and one interpreter runs it on
one core. The parent loads the vocabulary and settles its heap before forking, so the
children start with both for free. Each child reads its own byte range of the file (cut at
line ends) and writes its own results: the first straight to stdout, the others to
temporary files the parent copies out in order once the ranges before them are done. The
parent moves no request or result through a pipe, so both cores fit requests instead of
one of them feeding the other (the design before this one pickled every line to a pool).
Output order is input order. A conversation resent in both halves is counted once per
child.
"""

from __future__ import annotations

import asyncio
import functools
import io
import mmap
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import IO, TextIO

from worker.cli.fitfile import fit_lines
from worker.cli.output import OutputError, write, writing
from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.result import FitResult
from worker.runtime import settle_heap

Format = Callable[[FitResult], str]

OK, FAILED, BAD_INPUT, BROKEN_PIPE, NO_OUTPUT, CRASHED = 0, 1, 2, 3, 4, 5
"""Child exit codes: every result ok, some error result, input not UTF-8, reader gone,
output not written (a full disk: the child has said so on stderr), and an exception of
ours (said on stderr in one line): not `FAILED`, which multiprocessing gives any child that
raises, so that a crash is never taken for error results."""


class JobsFailed(RuntimeError):
    """A child died without reporting (killed, out of memory): the output is incomplete."""


def line_ranges(path: str, jobs: int) -> list[tuple[int, int]]:
    """`jobs` byte ranges covering the file, each starting at a line start (some may be
    empty when the file has fewer long lines than jobs)."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, jobs):
            at = max(size * k // jobs, starts[-1])
            if at == 0:
                starts.append(0)
                continue
            f.seek(at - 1)
            f.readline()  # to the end of the line `at - 1` is on (it may end right there)
            starts.append(max(f.tell(), starts[-1]))
    ends = [*starts[1:], size]
    return list(zip(starts, ends, strict=True))


def range_lines(path: str, start: int, end: int, done: Callable[[int], None]) -> Iterator[str]:
    """The lines of one range as the sequential path reads them (universal newlines, no
    byte order mark; UnicodeDecodeError if it is not UTF-8); `done` is told the bytes read
    so far."""
    with open(path, "rb") as f:
        f.seek(start)
        at = start
        while at < end:
            raw = f.readline(end - at)
            if not raw:
                return
            # utf-8-sig only skips a mark at the start of what it decodes: the file's start
            text = raw.decode("utf-8-sig" if at == 0 else "utf-8")
            at += len(raw)
            done(at - start)
            if "\r" in text:  # read as text mode does: a bare CR ends a line too
                yield from io.StringIO(text, newline=None)
            elif text:  # empty only for a file that is a byte order mark alone
                yield text


def lines_before(path: str, at: int) -> int:
    """The lines of the file before byte `at` (a line start), as text mode counts them:
    `\r\n`, a bare `\r` and `\n` each end one. Read in blocks: `at` may be gigabytes."""
    lines = 0
    cr = False  # the block before ended in \r: a \n starting this one ends the same line
    with open(path, "rb") as f:
        while at > 0 and (block := f.read(min(at, 1 << 20))):
            at -= len(block)
            lines += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
            if cr and block.startswith(b"\n"):
                lines -= 1
            cr = block.endswith(b"\r")
    return lines


def fit_ranges(
    make_engine: Callable[[], Engine],
    path: str,
    limits: Limits,
    fmt: Format,
    jobs: int,
    out: TextIO = sys.stdout,
    progress: Callable[[Callable[[], int], Callable[[], bool]], None] | None = None,
    preload: tuple[str, ...] = ("o200k_base",),
) -> int:
    """Fit the file in `jobs` forks; write every result to `out` in input order. Returns
    the exit code: 0 all ok, 1 some error result (or the reader went away), 2 the file is
    not UTF-8 text. `progress(bytes_done, finished)` is run while the children work."""
    engine = make_engine()
    engine.preload(list(preload))  # loaded once here, shared with the children by fork
    ranges = line_ranges(path, jobs)
    ctx = multiprocessing.get_context("fork")
    shared = mmap.mmap(-1, 8 * len(ranges))  # anonymous: the children write, the parent reads
    done = memoryview(shared).cast("q")
    with ExitStack() as stack:
        spills: list[IO[bytes] | None] = [None]
        for _ in ranges[1:]:
            spills.append(stack.enter_context(tempfile.TemporaryFile(prefix="tokenheap-fit-")))
        out.flush()
        settle_heap()  # frozen before the fork: children do not copy pages to collect them
        children = [
            ctx.Process(
                target=_child,
                args=(engine, path, start, end, limits, fmt, spill or out, done, k),
                name=f"tokenheap-fit-{k}",
            )
            for k, ((start, end), spill) in enumerate(zip(ranges, spills, strict=True))
        ]
        try:
            for child in children:
                child.start()
            if progress is not None:
                progress(lambda: sum(done), lambda: all(not c.is_alive() for c in children))
            return _collect(children, spills, out)
        finally:
            for child in children:
                if child.is_alive():
                    child.terminate()
                child.join()
            done.release()
            shared.close()


def _collect(
    children: Sequence[multiprocessing.process.BaseProcess],
    spills: list[IO[bytes] | None],
    out: TextIO,
) -> int:
    codes: list[int] = []
    for child, spill in zip(children, spills, strict=True):
        child.join()
        code = child.exitcode
        if code is None or code not in (OK, FAILED, BAD_INPUT, BROKEN_PIPE, NO_OUTPUT):
            raise JobsFailed(f"{child.name} stopped with exit code {code}: output incomplete")
        if code in (BAD_INPUT, BROKEN_PIPE, NO_OUTPUT):
            return 2 if code == BAD_INPUT else 1
        if spill is not None:
            spill.seek(0)
            with writing():
                out.flush()
                shutil.copyfileobj(spill, out.buffer)
                out.buffer.flush()
        codes.append(code)
    return FAILED if FAILED in codes else OK


def _child(
    engine: Engine,
    path: str,
    start: int,
    end: int,
    limits: Limits,
    fmt: Format,
    sink_to: IO[bytes] | TextIO,
    done: memoryview,
    k: int,
) -> None:
    def advance(n: int) -> None:
        done[k] = n

    engine.count_here()  # one fork per core: counting threads would only compete with it
    # counted only for a line that fails, so a file without errors is read once
    first_line = functools.cache(lambda: lines_before(path, start) + 1)

    sink: IO[str]
    if isinstance(sink_to, io.TextIOBase):  # the first range: the output itself
        sink = sink_to
    else:  # a spill file, closed by os._exit below after the flush
        sink = open(sink_to.fileno(), "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    failed = 0

    async def run() -> None:
        nonlocal failed
        lines = range_lines(path, start, end, advance)
        async for result in fit_lines(engine, lines, limits, first_line):
            failed += result.status != "ok"
            write(sink, fmt(result))
        await engine.aclose()

    try:
        asyncio.run(run())
        with writing():
            sink.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(BROKEN_PIPE)
    except OutputError as exc:  # stdout, or a spill file on a full /tmp
        print(f"tokenheap: {exc}", file=sys.stderr, flush=True)
        os._exit(NO_OUTPUT)
    except UnicodeDecodeError as exc:
        from worker.cli.inputs import not_text

        print(f"tokenheap: {not_text(path, exc)}", file=sys.stderr, flush=True)
        os._exit(BAD_INPUT)
    except Exception as exc:  # a bug, or the file gone: one line, and the parent stops
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(f"tokenheap: --jobs process {k} failed ({why})", file=sys.stderr, flush=True)
        os._exit(CRASHED)
    os._exit(FAILED if failed else OK)


def poll_progress(
    bar: Callable[[int], None], bytes_done: Callable[[], int], finished: Callable[[], bool]
) -> None:
    """Advance `bar` to the bytes the children have read until they are all done."""
    while not finished():
        bar(bytes_done())
        time.sleep(0.1)
    bar(bytes_done())
