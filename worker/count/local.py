"""Exact OpenAI token counts with a local BPE: each distinct piece once, misses on both cores.

tiktoken is the reference. A faster exact backend (see `backends.py`) is used only when
installed and only for encodings where the differential test against tiktoken holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import tiktoken

from worker.count.cache import CountCache, digest

ROLES = ("system", "user", "assistant", "tool", "developer")
# Below this many characters of misses, one thread is faster than handing work to the pool.
PARALLEL_MIN_CHARS = 64 * 1024


class LocalCounter:
    """Counts with one encoding; blocking calls, meant to run off the event loop."""

    def __init__(
        self,
        enc: tiktoken.Encoding,
        *,
        cache: CountCache,
        executor: Executor | None = None,
        workers: int = 2,
        count_one: Callable[[str], int] | None = None,
        backend: str = "tiktoken",
    ) -> None:
        self.enc = enc
        self.cache = cache
        self.namespace = enc.name
        self.method = f"tiktoken:{enc.name}"
        self.backend = backend
        self._executor = executor
        self._workers = max(1, workers)
        self._count_one = count_one or self._tiktoken_count
        self._roles: dict[str, int] | None = None

    def role_tokens(self) -> dict[str, int]:
        """Tokens of each chat role string, counted once per counter."""
        if self._roles is None:
            self._roles = {r: self._count_one(r) for r in ROLES}
        return self._roles

    def _tiktoken_count(self, text: str) -> int:
        return len(self.enc.encode_ordinary(text))

    def count(self, texts: Sequence[str]) -> tuple[list[int], int, int]:
        """Token counts of `texts` in order, plus (cache hits, misses) of this call.

        Text that looks like a special token (`<|endoftext|>`) is ordinary text here, as it
        is for the provider when it arrives inside a message.
        """
        keys = [digest(t) for t in texts]
        cached = self.cache.get_many(self.namespace, keys)
        todo: dict[bytes, str] = {}
        for key, text, hit in zip(keys, texts, cached, strict=True):
            if hit is None:
                todo.setdefault(key, text)
        fresh = dict(zip(todo, self.count_distinct(list(todo.values())), strict=True))
        if fresh:
            self.cache.put_many(self.namespace, fresh.items())
        out = [
            hit if hit is not None else fresh[key] for key, hit in zip(keys, cached, strict=True)
        ]
        misses = sum(1 for hit in cached if hit is None)
        return out, len(texts) - misses, misses

    def count_distinct(self, texts: list[str]) -> list[int]:
        """Count without the cache, splitting big batches across the executor's threads."""
        total_chars = sum(map(len, texts))
        if self._executor is None or self._workers == 1 or total_chars < PARALLEL_MIN_CHARS:
            return [self._count_one(t) for t in texts]
        parts = _split_by_size(texts, self._workers)
        futures = [self._executor.submit(self._count_list, part) for part in parts]
        out: list[int] = []
        for fut in futures:
            out.extend(fut.result())
        return out

    def _count_list(self, texts: list[str]) -> list[int]:
        return [self._count_one(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode_prefix(self, tokens: list[int]) -> str:
        """Text of the first tokens, dropping a UTF-8 sequence split at the cut."""
        return self.enc.decode_bytes(tokens).decode("utf-8", errors="ignore")


def _split_by_size(texts: list[str], n: int) -> list[list[str]]:
    """Contiguous parts of about equal character count, so results stay in order."""
    total = sum(map(len, texts))
    target = total / n
    parts: list[list[str]] = [[]]
    acc = 0
    for text in texts:
        if acc >= target * len(parts) and len(parts) < n:
            parts.append([])
        parts[-1].append(text)
        acc += len(text)
    return parts
