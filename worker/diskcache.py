"""Parsed forms of tokenheap's own files kept in the user's cache directory between runs.

A `tokenheap fit` is a short process, and parsing what it reads at every start shows:
the vocabularies' rank tables (~0.3 s for o200k_base) and the YAML config (importing
PyYAML alone is ~15 ms). Each cached file is named by what it was made from (a sha256 of
the source), so an edited source simply misses, and carries a sha256 of itself, so a
damaged or altered copy is ignored and rebuilt. A read-only or missing home costs only
the faster start. `TOKENHEAP_DISK_CACHE=0` turns it off (`XDG_CACHE_HOME` moves it).

Stdlib only: it is read before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from pathlib import Path
from typing import Any

SWITCHES = ("TOKENHEAP_DISK_CACHE", "TOKENHEAP_VOCAB_CACHE")
"""Either set to 0 turns the cache off (the second is the switch's name in earlier releases)."""


def cache_file(name: str) -> Path | None:
    """Where the cached form called `name` lives; None when caching is off."""
    if any(os.environ.get(switch) == "0" for switch in SWITCHES):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tokenheap" / f"{name}.marshal"


def load(path: Path) -> Any | None:
    """The value stored at `path`, or None when it is missing or does not check out."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head, body = blob[:32], blob[32:]
    if hashlib.sha256(body).digest() != head:
        return None
    try:
        return marshal.loads(body)
    except (EOFError, ValueError, TypeError):
        return None


def store(path: Path, value: Any) -> None:
    """Keep `value` at `path` (atomically); values marshal cannot write are not kept."""
    try:
        body = marshal.dumps(value)
    except ValueError:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(hashlib.sha256(body).digest() + body)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the faster start
