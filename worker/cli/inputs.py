"""Requests from a file or stdin, JSON or JSON lines told apart by content, not by name.

A pretty-printed document piped on stdin used to be read line by line (21 lines, 21
`invalid_request` results); a `.ndjson` file was read as one document. The rule now: when
the first non-blank line is a JSON value on its own, the input is JSON lines (streamed);
otherwise it is one document. A document that does not parse falls back to lines, so a
JSONL whose first line is broken still gets one error per bad line, not one in all.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import TextIO

from worker.errors import ConfigError


class InputError(ConfigError):
    """The input itself cannot be read (missing, a directory, not text): a usage error."""

    code = "bad_input"


@dataclass
class Requests:
    """What was read: request texts (one per entry), and whether it was one document."""

    texts: Iterator[str]
    document: bool
    stream: TextIO
    name: str
    first: str = ""
    """The first request's text (also the first of `texts`), for a look ahead at its model."""

    def close(self) -> None:
        if self.stream is not sys.stdin:
            self.stream.close()


def open_source(source: str) -> TextIO:
    """The file (or stdin for `-`) as UTF-8 text; InputError in plain words otherwise."""
    if source == "-":
        return sys.stdin
    if os.path.isdir(source):
        raise InputError(f"{source} is a directory; give a .json or .jsonl file, or - for stdin")
    try:
        return open(source, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except PermissionError:
        raise InputError(f"{source}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{source}: {exc.strerror or exc}") from None


def read_requests(source: str) -> Requests:
    """Open and classify; texts are streamed for JSON lines (stdin included)."""
    stream = open_source(source)
    name = "stdin" if source == "-" else source
    try:
        first = ""
        for line in stream:
            if line.strip():
                first = line
                break
        if not first:
            return Requests(iter(()), document=False, stream=stream, name=name)
        if _parses(first):
            lines = (line for line in chain([first], stream) if line.strip())
            return Requests(lines, document=False, stream=stream, name=name, first=first)
        whole = first + stream.read()
    except UnicodeDecodeError as exc:
        stream.close() if stream is not sys.stdin else None
        raise not_text(name, exc) from None
    if _parses(whole) or whole.count("\n") <= 1:
        text = whole.replace("\n", " ")
        return Requests(iter([text]), document=True, stream=stream, name=name, first=text)
    lines = (line for line in whole.splitlines() if line.strip())
    return Requests(lines, document=False, stream=stream, name=name, first=first)


def not_text(name: str, exc: UnicodeDecodeError) -> InputError:
    return InputError(
        f"{name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
        "requests are JSON documents or JSON lines"
    )


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
