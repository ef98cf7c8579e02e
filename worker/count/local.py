"""Exact OpenAI token counts with a local BPE: each distinct piece once, misses on both cores.

`submit` looks the pieces up (exact text first, then content digest), answers what the
cache knows and hands the rest to the counting threads without waiting, so a caller can
prepare the next batch (the CLI) or serve the event loop (the worker) while they count.
A piece already being counted for another call is not counted twice.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import tiktoken

from worker.count.backends import Backend
from worker.count.cache import CountCache, digest

ROLES = ("system", "user", "assistant", "tool", "developer")
# Misses are cut into parts of about this many characters, so both threads get work and
# a big request does not wait behind one long part.
PART_CHARS = 256 * 1024


@dataclass(slots=True)
class Pending:
    """Counts of one `submit`, some still being computed on the counting threads."""

    counter: LocalCounter
    texts: Sequence[str]
    refs: list[int | tuple[Future[list[int]], int]]
    """Per non-empty text: its count, or (future of its part, position in the part)."""
    owned: list[tuple[bytes, str, Future[list[int]], int]]
    """Misses this call submitted: cached and released from the in-flight map on result()."""
    hits: int

    @property
    def futures(self) -> list[Future[list[int]]]:
        return list({id(f): f for r in self.refs if isinstance(r, tuple) for f in (r[0],)}.values())

    def result(self) -> tuple[list[int], int, int]:
        """(counts in input order, cache hits, misses); blocks until the parts are counted."""
        parts: dict[int, list[int]] = {}
        values: list[int] = []
        for r in self.refs:
            if isinstance(r, int):
                values.append(r)
                continue
            fut, j = r
            part = parts.get(id(fut))
            if part is None:
                part = parts[id(fut)] = fut.result()
            values.append(part[j])
        self.counter._settle(self.owned)
        found = iter(values)
        counts = [next(found) if t else 0 for t in self.texts]
        return counts, self.hits, len(values) - self.hits


class LocalCounter:
    """Counts with one encoding through a backend (tiktoken, or an exact faster one)."""

    def __init__(
        self,
        enc: tiktoken.Encoding,
        *,
        cache: CountCache,
        executor: Executor,
        backend: Backend,
    ) -> None:
        self.enc = enc
        self.cache = cache
        self.namespace = enc.name
        self.method = backend.name  # e.g. tiktoken:o200k_base, fastokens:o200k_base
        self.backend = backend
        self._executor = executor
        self._memo = cache.memo(self.namespace)
        self._inflight: dict[bytes, tuple[Future[list[int]], int]] = {}
        self._lock = threading.Lock()
        self._roles: dict[str, int] | None = None

    def role_tokens(self) -> dict[str, int]:
        """Tokens of each chat role string, counted once per counter."""
        if self._roles is None:
            self._roles = dict(zip(ROLES, self.backend.count_many(list(ROLES)), strict=True))
        return self._roles

    def submit(self, texts: Sequence[str]) -> Pending:
        """Start counting `texts` (text that looks like a special token is ordinary text,
        as it is for the provider inside a message); never blocks on counting."""
        memo = self._memo
        young = memo.young.get
        refs: list[int | tuple[Future[list[int]], int]] = []
        missing: list[tuple[int, str]] = []  # (position in refs, text) not in the young tier
        for t in texts:
            if not t:  # empty names and ids are common and cost nothing
                continue
            hit = young(t)
            if hit is None:
                hit = memo.get(t)
                if hit is None:
                    missing.append((len(refs), t))
                    refs.append(0)
                    continue
            refs.append(hit)
        hits = len(refs) - len(missing)
        memo.hits += hits
        owned: list[tuple[bytes, str, Future[list[int]], int]] = []
        if missing:
            hits += self._submit_missing(missing, refs, owned)
        return Pending(self, texts, refs, owned, hits)

    def _submit_missing(
        self,
        missing: list[tuple[int, str]],
        refs: list[int | tuple[Future[list[int]], int]],
        owned: list[tuple[bytes, str, Future[list[int]], int]],
    ) -> int:
        """The digest tier, then the pieces being counted, then the counting threads, for
        the texts the exact tier did not know; returns how many the digest tier knew."""
        keys = [digest(t) for _, t in missing]
        cached = self.cache.get_many(self.namespace, keys)
        put = self._memo.put
        todo: dict[bytes, int] = {}
        todo_texts: list[str] = []
        waiting: list[tuple[bytes, int]] = []  # (key, position in refs) awaiting a part
        found = 0
        with self._lock:
            for key, (at, text), hit in zip(keys, missing, cached, strict=True):
                if hit is not None:
                    refs[at] = hit
                    put(text, hit)
                    found += 1
                    continue
                other = self._inflight.get(key)
                if other is not None:
                    refs[at] = other
                    continue
                if key not in todo:
                    todo[key] = len(todo_texts)
                    todo_texts.append(text)
                waiting.append((key, at))
            if todo_texts:
                slots = self._submit_parts(todo_texts)
                for key, pos in todo.items():
                    fut, j = slots[pos]
                    self._inflight[key] = (fut, j)
                    owned.append((key, todo_texts[pos], fut, j))
                for key, at in waiting:
                    refs[at] = self._inflight[key]
        return found

    def count(self, texts: Sequence[str]) -> tuple[list[int], int, int]:
        """Blocking form of `submit(...).result()`; not for use on the counting threads."""
        return self.submit(texts).result()

    def _submit_parts(self, texts: list[str]) -> list[tuple[Future[list[int]], int]]:
        if sum(map(len, texts)) <= self.backend.inline_chars:  # cheaper than the hop
            done: Future[list[int]] = Future()
            done.set_result(self.backend.count_many(texts))
            return [(done, j) for j in range(len(texts))]
        parts: list[list[str]] = [[]]
        size = 0
        for t in texts:
            if size >= PART_CHARS and not self.backend.self_parallel:
                parts.append([])
                size = 0
            parts[-1].append(t)
            size += len(t)
        slots: list[tuple[Future[list[int]], int]] = []
        for part in parts:
            fut = self._executor.submit(self.backend.count_many, part)
            slots += [(fut, j) for j in range(len(part))]
        return slots

    def _settle(self, owned: list[tuple[bytes, str, Future[list[int]], int]]) -> None:
        if not owned:
            return
        items = [(key, fut.result()[j]) for key, _, fut, j in owned]
        self.cache.put_many(self.namespace, items)
        put = self._memo.put
        for (_, text, _, _), (_, count) in zip(owned, items, strict=True):
            put(text, count)
        with self._lock:
            for key, _, _, _ in owned:
                self._inflight.pop(key, None)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode_prefix(self, tokens: list[int]) -> str:
        """Text of the first tokens, dropping a UTF-8 sequence split at the cut."""
        return self.enc.decode_bytes(tokens).decode("utf-8", errors="ignore")
