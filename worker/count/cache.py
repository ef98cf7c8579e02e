"""A count cache shared across requests, bounded in bytes, with an exact-text tier in front.

Conversations resend their whole history every turn and popular chunks come back in many
requests: keyed by (namespace, content digest), turn N only pays for what is new. The
namespace is the encoding name for local BPE, or ``anthropic:<model>`` for the count API,
because the same text has different counts under different tokenizers.

In front of the digests, `TextMemo` keeps the most recent texts themselves as dict keys:
a string's hash is computed in C and kept on the string, and equal keys are compared byte
for byte, so a resent turn is answered exactly by one dict lookup instead of encoding it
to UTF-8, hashing it and moving an LRU node (measured: a third of the per-text cost of a
request whose counts are all cached). Holding text costs memory, so that tier is bounded
in characters, separately.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from xxhash import xxh3_128_digest

from worker.values import value

# A cached entry costs its key (16-byte digest + namespace ref) and an int, plus the
# OrderedDict node; 120 bytes is a measured-order-of-magnitude figure, used to bound memory.
ENTRY_BYTES = 120


def digest(text: str) -> bytes:
    """16-byte content hash (XXH3-128: 5x cheaper than blake2b on chat-sized text, and
    with 128 bits a collision among a billion entries has odds of about 2^-68)."""
    return xxh3_128_digest(text.encode("utf-8", "surrogatepass"))


class TextMemo:
    """Exact text -> count for one namespace, bounded in characters held.

    Two generations instead of an LRU list: lookups go to the young dict, a hit in the old
    one is moved up, and when the young one has taken `max_chars / 2` characters it becomes
    the old one (the previous old one is let go). What a conversation resends every turn
    stays young; at most `max_chars` characters are held in all. Safe under the GIL without
    a lock: a lost update only costs a recount.

    >>> m = TextMemo(max_chars=10)
    >>> m.put("hello", 1); m.get("hello"), m.get("other")
    (1, None)
    """

    __slots__ = ("_chars", "_half", "_old", "hits", "young")

    def __init__(self, max_chars: int) -> None:
        self.young: dict[str, int] = {}
        """Read directly by the counting hot path (`young.get`), then `get` for the rest."""
        self._old: dict[str, int] = {}
        self._chars = 0
        self._half = max(0, max_chars // 2)
        self.hits = 0
        """Lookups answered here (added by the caller once per request, not per lookup)."""

    def get(self, text: str) -> int | None:
        value = self.young.get(text)
        if value is None:
            value = self._old.get(text)
            if value is not None:
                self.put(text, value)
        return value

    def put(self, text: str, count: int) -> None:
        if len(text) > self._half:
            return  # bigger than a generation: the digest tier keeps it
        young = self.young
        if text not in young:
            self._chars += len(text)
            if self._chars > self._half:
                self._old, self.young = young, {}
                young = self.young
                self._chars = len(text)
        young[text] = count

    @property
    def chars(self) -> int:
        """Characters held, both generations."""
        return sum(map(len, self.young)) + sum(map(len, self._old))


@value
class CacheStats:
    hits: int
    """Lookups answered by either tier."""
    misses: int
    entries: int
    """Digest tier entries, and `bytes` their estimated size."""
    bytes: int
    evictions: int
    memo_chars: int = 0
    """Characters of text the exact tier holds (a walk over it: for tests and diagnostics)."""


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

    def __init__(
        self, max_bytes: int = 64 * 1024 * 1024, memo_chars: int = 16 * 1024 * 1024
    ) -> None:
        self._max_entries = max(1, max_bytes // ENTRY_BYTES)
        self._memo_chars = memo_chars
        self._memos: dict[str, TextMemo] = {}
        self._data: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def memo(self, namespace: str) -> TextMemo:
        """The exact-text tier of one namespace (created on first use)."""
        memo = self._memos.get(namespace)
        if memo is None:
            memo = self._memos.setdefault(namespace, TextMemo(self._memo_chars))
        return memo

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
            memos = list(self._memos.values())
            hits = self.hits + sum(m.hits for m in memos)
            chars = sum(m.chars for m in memos)
            return CacheStats(hits, self.misses, n, n * ENTRY_BYTES, self.evictions, chars)
