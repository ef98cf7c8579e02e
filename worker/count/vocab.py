"""tiktoken encodings built from the vocabularies shipped in this package: no network, ever.

tiktoken would download its rank files on first use; these copies are byte-identical
(sha256 equals tiktoken's own expected hash) and are verified again on load.
"""

from __future__ import annotations

import hashlib
import threading
from functools import cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
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


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken Encoding for `name`, with tiktoken's own pattern and special tokens.

    tiktoken's constructor for `name` is run with its loader pointed at the shipped file,
    so the pattern and special tokens stay tiktoken's (they live inside that function).
    """
    path = vocab_path(name)
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]

    def load_shipped(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return load_tiktoken_bpe(str(path), expected_hash=expected_hash or SHA256[name])

    with _LOCK:
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = load_shipped
        try:
            spec = constructor()
        finally:
            openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)
