"""Writing stdout: an OSError there (a full disk, `> /dev/full`) is the output's, reported in
one line, never a traceback. Its own module: `main` and `fitjobs` share it, and neither may
import the other (the import contract refuses a cycle)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


class OutputError(Exception):
    """Stdout cannot be written (a full disk, /dev/full): the output is cut short, exit 1
    as for a closed pipe. Raised only where stdout is written, so that an OSError from
    anything else is never reported as the output's."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write the output: {exc.strerror or exc}")


@contextmanager
def writing() -> Iterator[None]:
    """Around writes to stdout, off the per-result path (which has `write`)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc) from None


def write(out: IO[str], text: str) -> None:
    """`out.write(text)` on the per-result path: what `writing()` does, without a context
    manager's cost for every result."""
    try:
        out.write(text)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc) from None
