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
    misses: int = 0
    waiting: bool = False
    """Some refs are futures (else every count is known: the common case, no futures)."""
    gaps: bool = False
    """Some texts were empty (they have no ref and count 0)."""

    @property
    def futures(self) -> list[Future[list[int]]]:
        if not self.waiting:
            return []
        return list({id(f): f for r in self.refs if isinstance(r, tuple) for f in (r[0],)}.values())

    def result(self) -> tuple[list[int], int, int]:
        """(counts in input order, cache hits, misses); blocks until the parts are counted."""
        values: list[int]
        if self.waiting:
            parts: dict[int, list[int]] = {}
            values = []
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
        else:
            values = self.refs  # type: ignore[assignment]  # all ints when not waiting
        if self.gaps:
            found = iter(values)
            values = [next(found) if t else 0 for t in self.texts]
        return values, self.hits, self.misses


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
        self.here = False
        """Count every miss on the caller's thread: for a process that already has a core
        of its own to itself (a `fit --jobs` fork), where the counting threads only add
        hand-offs and contention (measured: cold files 0.88x the time)."""

    def use(self, backend: Backend) -> None:
        """Count with `backend` from now on (an exact one: the counts do not change, only
        how fast they are made; calls already started finish with the previous one)."""
        self.backend = backend
        self.method = backend.name

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
        gaps = False
        for t in texts:
            if not t:  # empty names and ids are common and cost nothing
                gaps = True
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
        pending = Pending(self, texts, refs, [], hits, gaps=gaps)
        if missing:
            self._submit_missing(missing, pending)
        return pending

    def _submit_missing(self, missing: list[tuple[int, str]], pending: Pending) -> None:
        """The digest tier, then the pieces being counted, then the counting threads, for
        the texts the exact tier did not know. Misses small enough to count here are
        counted at once, with no future and no in-flight entry."""
        refs = pending.refs
        keys = [digest(t) for _, t in missing]
        cached = self.cache.get_many(self.namespace, keys)
        put = self._memo.put
        todo: dict[bytes, int] = {}
        todo_texts: list[str] = []
        waiting: list[tuple[bytes, int]] = []  # (key, position in refs) awaiting a count
        for key, (at, text), hit in zip(keys, missing, cached, strict=True):
            if hit is not None:
                refs[at] = hit
                put(text, hit)
                pending.hits += 1
                continue
            if key not in todo:
                todo[key] = len(todo_texts)
                todo_texts.append(text)
            waiting.append((key, at))
        pending.misses = len(waiting)
        if not todo_texts:
            return
        if self.here or sum(map(len, todo_texts)) <= self.backend.inline_chars:
            counts = self.backend.count_many(todo_texts)
            for key, at in waiting:
                refs[at] = counts[todo[key]]
            self.cache.put_many(self.namespace, zip(todo, counts, strict=True))
            for text, count in zip(todo_texts, counts, strict=True):
                put(text, count)
            return
        owned = pending.owned
        with self._lock:
            inflight = self._inflight
            pairs = list(zip(todo, todo_texts, strict=True))
            fresh = [text for key, text in pairs if key not in inflight]
            slots = iter(self._submit_parts(fresh)) if fresh else iter(())
            for key, text in pairs:
                if key not in inflight:
                    fut, j = next(slots)
                    inflight[key] = (fut, j)
                    owned.append((key, text, fut, j))
            for key, at in waiting:
                refs[at] = inflight[key]
        pending.waiting = True

    def count(self, texts: Sequence[str]) -> tuple[list[int], int, int]:
        """Blocking form of `submit(...).result()`; not for use on the counting threads."""
        return self.submit(texts).result()

    def _submit_parts(self, texts: list[str]) -> list[tuple[Future[list[int]], int]]:
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
