"""A count cache shared across requests, bounded in bytes.

Conversations resend their whole history every turn and popular chunks come back in many
requests: keyed by (namespace, content digest), turn N only pays for what is new. The
namespace is the encoding name for local BPE, or ``anthropic:<model>`` for the count API,
because the same text has different counts under different tokenizers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from xxhash import xxh3_128_digest

# A cached entry costs its key (16-byte digest + namespace ref) and an int, plus the
# OrderedDict node; 120 bytes is a measured-order-of-magnitude figure, used to bound memory.
ENTRY_BYTES = 120


def digest(text: str) -> bytes:
    """16-byte content hash (XXH3-128: 5x cheaper than blake2b on chat-sized text, and
    with 128 bits a collision among a billion entries has odds of about 2^-68)."""
    return xxh3_128_digest(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int


class CountCache:
    """LRU map of (namespace, digest) -> token count, thread-safe, bounded in bytes.

    >>> c = CountCache(max_bytes=10_000)
    >>> c.get("o200k_base", digest("hi")) is None
    True
    >>> c.put("o200k_base", digest("hi"), 1)
    >>> c.get("o200k_base", digest("hi"))
    1
    >>> (c.stats().hits, c.stats().misses)
    (1, 1)
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._max_entries = max(1, max_bytes // ENTRY_BYTES)
        self._data: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, namespace: str, key: bytes) -> int | None:
        with self._lock:
            value = self._data.get((namespace, key))
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end((namespace, key))
            self.hits += 1
            return value

    def get_many(self, namespace: str, keys: Iterable[bytes]) -> list[int | None]:
        """One lock round-trip for a whole request's pieces."""
        out: list[int | None] = []
        with self._lock:
            data = self._data
            for key in keys:
                value = data.get((namespace, key))
                if value is None:
                    self.misses += 1
                else:
                    data.move_to_end((namespace, key))
                    self.hits += 1
                out.append(value)
        return out

    def put(self, namespace: str, key: bytes, count: int) -> None:
        self.put_many(namespace, [(key, count)])

    def put_many(self, namespace: str, items: Iterable[tuple[bytes, int]]) -> None:
        with self._lock:
            data = self._data
            for key, count in items:
                data[(namespace, key)] = count
                data.move_to_end((namespace, key))
            while len(data) > self._max_entries:
                data.popitem(last=False)
                self.evictions += 1

    def stats(self) -> CacheStats:
        with self._lock:
            n = len(self._data)
            return CacheStats(self.hits, self.misses, n, n * ENTRY_BYTES, self.evictions)
