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

    def count_here(self, texts: list[str]) -> list[int]:
        """`count_many` on the caller's thread alone: for the small misses counted inline,
        where waking other threads costs more than the counting."""
        ...

    def warm(self) -> None:
        """Build now what the backend would build on its first call (once a process)."""
        ...


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

    count_here = count_many  # tiktoken counts on the calling thread anyway

    def warm(self) -> None:
        """Nothing to build: tiktoken's encodings are ready when made."""


class FastokensBackend:
    """fastokens' batch call releases the GIL and spreads one batch over all cores."""

    self_parallel = True
    inline_chars = 16 * 1024

    def __init__(self, encoding_name: str) -> None:
        self._tok = fastokens_tokenizer(encoding_name)
        self.encoding_name = encoding_name
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

    def count_here(self, texts: list[str]) -> list[int]:
        """One text at a time on this thread. The batch call hands even three short texts
        to its thread pool, whose threads must wake (and then spin) for each request's few
        new turns: measured in process on the reuse requests, about half the counting CPU
        this way, with the same counts (`encode_ordinary` matches no special token, as
        `split_special_tokens` does not)."""
        encode = self._tok.encode_ordinary
        try:
            return [len(encode(t)) for t in texts]
        except UnicodeEncodeError:
            return [len(encode(_replace_surrogates(t))) for t in texts]

    def warm(self) -> None:
        """Build what fastokens builds on a first call, now, on this thread, once a process:
        most of it per tokenizer (0.2-0.4 s on this project's machine), the rest per
        thread (that thread's caches, about 70 MB, 0.05-0.1 s). A worker loading fastokens
        behind calls this on the loading thread, so its event loop's first count pays only
        its own thread's part; a `TOKENHEAP_PROCESSES` parent calls it on the thread it
        forks from, so a child's event loop starts with all of it (shared until written)
        and the child's own load behind, finding it done, builds no caches it won't use."""
        if self.encoding_name not in _WARM:
            self.count_here(["warm"])
            _WARM.add(self.encoding_name)


_WARM: set[str] = set()
"""Encodings whose fastokens tokenizer has made its first count in this process (a forked
child inherits its parent's)."""


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
