"""BPE backends that count exactly like tiktoken `encode_ordinary`, which stays the reference.

fastokens counts 10-20x faster than tiktoken and agreed with it on every text and every
code point we tried (tests/unit/test_backends.py keeps checking), but it takes about two
seconds to load o200k_base: worth it for a long-running worker, not for a short `fit`.
"""

from __future__ import annotations

import array
from functools import cache
from typing import Any, Literal, Protocol

import tiktoken

from worker.count.vocab import HelperEncoding, verified_bytes, vocab_path

BackendName = Literal["tiktoken", "fastokens", "auto"]


class Backend(Protocol):
    name: str
    self_parallel: bool
    """True when one call already uses every core (the caller should not split work)."""
    inline_chars: int
    """Misses of up to this many characters in all are counted on the caller's thread:
    handing them to a counting thread and waking the caller again costs about as much as
    counting this much text (measured: ~70 us a request in the worker's one-at-a-time
    path, where tiktoken counts ~1 KB and fastokens ~20 KB of prose in that time)."""

    def count_many(self, texts: list[str]) -> list[int]: ...


class TiktokenBackend:
    """tiktoken releases the GIL while encoding, so parts run in parallel on threads."""

    self_parallel = False
    inline_chars = 512

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.enc = enc
        self.name = f"tiktoken:{enc.name}"

    def count_many(self, texts: list[str]) -> list[int]:
        if isinstance(self.enc, HelperEncoding):  # a short `fit`: see worker.count.vocab
            return self.enc.count_ordinary(texts)
        encode = self.enc.encode_ordinary
        return [len(encode(t)) for t in texts]


class FastokensBackend:
    """fastokens' batch call releases the GIL and spreads one batch over all cores."""

    self_parallel = True
    inline_chars = 16 * 1024

    def __init__(self, encoding_name: str) -> None:
        self._tok = fastokens_tokenizer(encoding_name)
        self.name = f"fastokens:{encoding_name}"

    def count_many(self, texts: list[str]) -> list[int]:
        try:
            _, offsets = self._tok.encode_batch_flat(texts, split_special_tokens=True)
        except UnicodeEncodeError:
            # Lone surrogates: tiktoken replaces them with U+FFFD; do the same.
            clean = [_replace_surrogates(t) for t in texts]
            _, offsets = self._tok.encode_batch_flat(clean, split_special_tokens=True)
        ends = array.array("Q")
        ends.frombytes(offsets)
        return [ends[i + 1] - ends[i] for i in range(len(texts))]


@cache
def fastokens_tokenizer(encoding_name: str) -> Any:
    """The fastokens tokenizer of a shipped vocabulary, built once per process (seconds):
    a `TOKENHEAP_PROCESSES` parent builds it before forking, and its children share it."""
    import fastokens

    verified_bytes(encoding_name)  # fastokens does not check the file itself
    return fastokens.Tokenizer.from_tiktoken(str(vocab_path(encoding_name)), encoding=encoding_name)


def _replace_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def fastokens_available() -> bool:
    try:
        import fastokens  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: BackendName) -> Literal["tiktoken", "fastokens"]:
    """`auto` is fastokens when installed, else tiktoken."""
    if name == "fastokens" or (name == "auto" and fastokens_available()):
        return "fastokens"
    return "tiktoken"


def make_backend(enc: tiktoken.Encoding, name: BackendName) -> Backend:
    if resolve_backend(name) == "fastokens":
        return FastokensBackend(enc.name)
    return TiktokenBackend(enc)
