"""Requests from a file or stdin, JSON or JSON lines told apart by content, not by name.

A pretty-printed document piped on stdin used to be read line by line (21 lines, 21
`invalid_request` results); a `.ndjson` file was read as one document. The rule now: when
the first non-blank line is a JSON value on its own, the input is JSON lines (streamed);
otherwise it is one document. A document that does not parse is still one document (one
error, with the parse error's line and column in it) when its first line goes on to the
next (it ends in `{`, `[`, `,` or `:`, which no whole JSON value does: a pretty-printed
`{` alone, say); otherwise it falls back to lines, so a JSONL whose first line is broken
still gets one error per bad line, not one in all. A UTF-8 byte order mark (as Windows
editors write) is skipped; an input with no request at all is a usage error.
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

BOM = "\ufeff"
"""The byte order mark some editors (Windows Notepad) put before UTF-8 text: not JSON."""


class InputError(ConfigError):
    """The input itself cannot be read (missing, a directory, not text, empty): a usage error."""

    code = "bad_input"


@dataclass
class Requests:
    """What was read: request texts (one per entry), and whether it was one document."""

    texts: Iterator[str]
    """JSON lines: the input's lines from the first request on, blank ones included (to be
    skipped) so that each text's place numbers its line; a document: its one text."""
    document: bool
    stream: TextIO
    name: str
    first: str = ""
    """The first request's text (also the first of `texts`), for a look ahead at its model."""
    first_line: int = 0
    """JSON lines: the input line `texts` start on, for an error result to name its line."""

    def close(self) -> None:
        _close(self.stream)


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
    """Open and classify; texts are streamed for JSON lines (stdin included). InputError
    for an input with no request in it: fitting nothing is a mistake (a wrong file, an
    empty pipe), not a success to report with silence and exit 0."""
    stream = open_source(source)
    name = "stdin" if source == "-" else source
    first = ""
    skipped = 0  # blank lines before the first: a broken document's positions count them
    try:
        lines = iter(stream)
        head = next(lines, "").removeprefix(BOM)
        for line in chain([head], lines):
            if line.strip():
                first = line
                break
            skipped += 1
        if not first:
            _close(stream)
            raise InputError(f"{name} holds no requests")
        if _parses(first):
            texts: Iterator[str] = chain([first], lines)
            return Requests(texts, False, stream, name, first=first, first_line=skipped + 1)
        body = first + stream.read()
    except UnicodeDecodeError as exc:
        _close(stream)
        raise not_text(name, exc) from None
    if _parses(body):
        text = body.replace("\n", " ")
        return Requests(iter([text]), document=True, stream=stream, name=name, first=text)
    # split as the stream iterates (text mode has made every line end a \n): splitlines()
    # would also cut at U+2028 and the like, which JSON strings may hold as they are
    split = body.split("\n")
    if len(split) <= 2 or (_goes_on(first) and not any(map(_is_object, split[1:]))):
        # One broken document: its line breaks kept, so that the parse error's line and
        # column are the document's (the skipped blank lines put back for the count), and
        # its trailing ones dropped, so that an end cut short is placed on its last line.
        # A later line that is a JSON object on its own makes it JSON lines after all (a
        # line cut short after a comma), where each good line gets its result; a value of
        # a pretty-printed document may stand alone on a line (`42`, `"x"`), not a whole
        # non-empty object, whose keys the printer puts on lines of their own.
        text = "\n" * skipped + body.rstrip()
        return Requests(iter([text]), document=True, stream=stream, name=name, first=text)
    return Requests(iter(split), False, stream, name, first=first, first_line=skipped + 1)


def _goes_on(line: str) -> bool:
    """Whether a line that does not parse on its own can only be the start of a document
    laid out on several lines: a whole JSON value (a JSON line, even a broken one, is
    meant to be one) never ends in an opening bracket, a comma or a colon."""
    return line.rstrip().endswith(("{", "[", ",", ":"))


def _close(stream: TextIO) -> None:
    if stream is not sys.stdin:
        stream.close()


def not_text(name: str, exc: UnicodeDecodeError) -> InputError:
    return InputError(
        f"{name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
        "requests are JSON documents or JSON lines"
    )


def _is_object(line: str) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and bool(doc)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
