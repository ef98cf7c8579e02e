"""A progress bar on stderr while a long file of requests is read, only on a terminal.

Measured in bytes read, which runs slightly ahead of the results (fitting is pipelined);
transient, so it leaves nothing behind in the terminal's scrollback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # rich takes ~35 ms to import: only a bar that is drawn pays for it
    from rich.console import Console

PROGRESS_MIN_BYTES = 1024 * 1024
"""Files smaller than this finish before a bar would be worth drawing."""


def wants_progress(size: int, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> bool:
    """A bar on stderr when it is a terminal and stdout is not (the results are the
    progress when both are the terminal)."""
    return size >= PROGRESS_MIN_BYTES and err.isatty() and not out.isatty()


def with_progress(
    lines: Iterable[str], total_bytes: int, console: Console | None = None
) -> Iterator[str]:
    """`lines`, unchanged, advancing a bar by the UTF-8 size of each."""
    with byte_bar(total_bytes, console) as advance:
        read = 0
        for line in lines:
            read += len(line.encode("utf-8"))
            advance(read)
            yield line


@contextmanager
def byte_bar(total_bytes: int, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A transient bar; the callback sets the bytes done so far."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("fitting"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with progress:
        task = progress.add_task("fit", total=total_bytes)
        yield lambda done: progress.update(task, completed=done)
