"""tiktoken encodings built from the vocabularies shipped in this package: no network, ever.

tiktoken would download its rank files on first use; these copies are byte-identical
(sha256 equals tiktoken's own expected hash) and are verified again on load.
"""

from __future__ import annotations

import base64
import hashlib
import marshal
import os
import threading
from functools import cache
from pathlib import Path

import tiktoken
from tiktoken_ext import openai_public

from worker.errors import ConfigError

VOCAB_DIR = Path(__file__).with_name("vocab")

SHA256: dict[str, str] = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


def vocab_path(name: str) -> Path:
    if name not in SHA256:
        raise ConfigError(f"encoding {name!r} is not shipped; shipped: {', '.join(sorted(SHA256))}")
    return VOCAB_DIR / f"{name}.tiktoken"


def verified_bytes(name: str) -> bytes:
    data = vocab_path(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise ConfigError(f"{vocab_path(name)} does not match its sha256: reinstall tokenheap")
    return data


_LOCK = threading.Lock()


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


def _tiktoken_spec(name: str) -> tuple[str, dict[str, int]]:
    """tiktoken's pattern and special tokens for `name`. They live inside its constructor,
    which is run with its loader stubbed out, so they never drift from tiktoken's."""
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    with _LOCK:
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = lambda *_a, **_k: {}
        try:
            spec = constructor()
        finally:
            openai_public.load_tiktoken_bpe = original
    return spec["pat_str"], spec["special_tokens"]


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken Encoding for `name`, built from the shipped, verified vocabulary."""
    pat_str, special = _tiktoken_spec(name)
    return tiktoken.Encoding(
        name=name, pat_str=pat_str, mergeable_ranks=ranks(name), special_tokens=special
    )
