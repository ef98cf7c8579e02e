"""tiktoken encodings built from the vocabularies shipped in this package: no network, ever.

tiktoken would download its rank files on first use; these copies are byte-identical
(sha256 equals tiktoken's own expected hash) and are verified again on load. Each
encoding's split pattern and special tokens ship beside them in `vocab/encodings.json`
(copied from tiktoken's own constructors, and checked against them by a test), so the
`tiktoken.Encoding` is built directly, with no loader to patch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import marshal
import os
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken

from worker.errors import ConfigError

VOCAB_DIR = Path(__file__).with_name("vocab")
_SPECS: dict[str, dict[str, Any]] = json.loads(
    (VOCAB_DIR / "encodings.json").read_text(encoding="utf-8")
)["encodings"]
SHA256: dict[str, str] = {name: spec["sha256"] for name, spec in _SPECS.items()}


def vocab_path(name: str) -> Path:
    if name not in SHA256:
        raise ConfigError(f"encoding {name!r} is not shipped; shipped: {', '.join(sorted(SHA256))}")
    return VOCAB_DIR / f"{name}.tiktoken"


def verified_bytes(name: str) -> bytes:
    data = vocab_path(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise ConfigError(f"{vocab_path(name)} does not match its sha256: reinstall tokenheap")
    return data


def ranks(name: str) -> dict[bytes, int]:
    """The verified rank table. Parsed here rather than by tiktoken's loader, which would
    copy the file into a cache directory and skips its hash check when that is disabled.

    Parsing takes ~0.3 s for o200k_base; a marshal copy in the user cache loads in ~0.05 s
    and carries a sha256 of itself, so a damaged or altered copy is ignored and rebuilt.
    """
    cached = _cache_path(name)
    if cached is not None:
        table = _read_marshal(cached)
        if table is not None:
            return table
    data = verified_bytes(name)
    it = iter(data.split())
    b64 = base64.b64decode
    table = {b64(token): int(rank) for token, rank in zip(it, it, strict=True)}
    if cached is not None:
        _write_marshal(cached, table)
    return table


def _cache_path(name: str) -> Path | None:
    if os.environ.get("TOKENHEAP_VOCAB_CACHE", "1") == "0":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tokenheap" / f"{name}-{SHA256[name][:16]}.marshal"


def _read_marshal(path: Path) -> dict[bytes, int] | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head, body = blob[:32], blob[32:]
    if hashlib.sha256(body).digest() != head:
        return None
    table = marshal.loads(body)
    return table if isinstance(table, dict) else None


def _write_marshal(path: Path, table: dict[bytes, int]) -> None:
    body = marshal.dumps(table)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(hashlib.sha256(body).digest() + body)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the faster start


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken Encoding for `name`, built from the shipped, verified vocabulary."""
    vocab_path(name)  # refuses an encoding that is not shipped
    spec = _SPECS[name]
    return tiktoken.Encoding(
        name=name,
        pat_str=spec["pat_str"],
        mergeable_ranks=ranks(name),
        special_tokens=spec["special_tokens"],
    )
