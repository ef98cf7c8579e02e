"""The local counter: small misses counted on the caller's thread, large ones on the
counting threads, the same counts either way, each distinct piece once."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from worker.count.backends import TiktokenBackend
from worker.count.cache import CountCache
from worker.count.local import LocalCounter
from worker.count.vocab import encoding


class _Recording(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(2)
        self.submitted: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted.append(len(args[0]))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def counter() -> Any:
    enc = encoding("o200k_base")
    pool = _Recording()
    yield LocalCounter(enc, cache=CountCache(), executor=pool, backend=TiktokenBackend(enc)), pool
    pool.shutdown()


def test_small_misses_are_counted_here_and_large_ones_on_the_threads(counter: Any) -> None:
    local, pool = counter
    enc = encoding("o200k_base")
    limit = local.backend.inline_chars
    small = ["hello there", "x" * (limit - 20)]
    pending = local.submit(small)
    assert all(f.done() for f in pending.futures) and pool.submitted == []
    assert pending.result()[0] == [len(enc.encode_ordinary(t)) for t in small]
    large = ["word " * (limit // 4), "another text"]
    counts, hits, misses = local.count(large)
    assert pool.submitted == [2]
    assert counts == [len(enc.encode_ordinary(t)) for t in large]
    assert (hits, misses) == (0, 2)
    again, hits, misses = local.count([*small, *large])
    assert again == [*pending.result()[0], *counts] and (hits, misses) == (4, 0)
    assert pool.submitted == [2]  # answered by the cache


def test_preload_loads_every_encoding_once_side_by_side() -> None:
    from worker.engine.engine import Engine

    with Engine() as engine:
        engine.preload(["o200k_base", "cl100k_base", "o200k_base"])
        loaded = dict(engine._local)
        assert sorted(loaded) == ["cl100k_base", "o200k_base"]
        for name, counter in loaded.items():
            assert counter.enc.name == name
            assert counter._roles is not None  # counted during the preload
        engine.preload(["cl100k_base"])
        assert engine._local["cl100k_base"] is loaded["cl100k_base"]


def test_the_exact_text_tier_answers_resent_text_without_the_digest_tier(counter: Any) -> None:
    local, _ = counter
    enc = encoding("o200k_base")
    texts = ["a resent turn", "another one", "a resent turn"]
    first, hits, misses = local.count(texts)
    assert (hits, misses) == (0, 3)  # the repeat within one call is counted once, not hit
    lookups = local.cache.get_many

    def no_digest_lookups(*args: Any) -> Any:
        raise AssertionError("the digest tier was asked for text the exact tier holds")

    local.cache.get_many = no_digest_lookups
    again, hits, misses = local.count(texts)
    assert again == first == [len(enc.encode_ordinary(t)) for t in texts]
    assert (hits, misses) == (3, 0)
    local.cache.get_many = lookups
    assert local.cache.stats().hits >= 3


def test_text_the_exact_tier_let_go_is_still_answered_by_the_digest_tier() -> None:
    enc = encoding("o200k_base")
    with ThreadPoolExecutor(1) as pool:
        cache = CountCache(memo_chars=40)  # two generations of 20 characters
        local = LocalCounter(enc, cache=cache, executor=pool, backend=TiktokenBackend(enc))
        texts = [f"text number {i:04d}" for i in range(6)]  # 16 characters each
        counts, _, misses = local.count(texts)
        assert misses == 6 and cache.stats().memo_chars <= 40
        again, hits, misses = local.count(texts)
        assert again == counts and (hits, misses) == (6, 0)
        assert cache.stats().entries == 6  # the digest tier kept them all


def test_a_large_piece_being_counted_for_one_call_is_not_counted_again(counter: Any) -> None:
    local, pool = counter
    enc = encoding("o200k_base")
    large = "many words " * local.backend.inline_chars
    first = local.submit([large, "first only"])
    second = local.submit(["second only", large])
    assert first.futures and second.futures  # both wait on the counting threads
    assert pool.submitted == [2, 1]  # the large piece went once, with the first call
    want = len(enc.encode_ordinary(large))
    assert second.result()[0][1] == want and first.result()[0][0] == want
    assert local.count([large]) == ([want], 1, 0)


def test_fastokens_loads_behind_while_tiktoken_counts_the_same() -> None:
    pytest.importorskip("fastokens")
    from worker.engine.engine import Engine

    enc = encoding("o200k_base")
    with Engine(backend="fastokens") as engine:
        behind = engine.preload(["o200k_base"], behind=True)
        assert behind is not None
        counter = engine.local("o200k_base")
        first = ["counted before the switch, 🙂 <|endoftext|>"]
        assert counter.count(first)[0] == [len(enc.encode_ordinary(first[0]))]
        assert counter.method == "tiktoken:o200k_base" or behind.done()
        behind.result(timeout=60)
        assert counter.method == "fastokens:o200k_base"
        after = ["and after it, by fastokens: 中文 e\u0301 <|endoftext|>"]
        assert counter.count(after) == ([len(enc.encode_ordinary(after[0]))], 0, 1)


def test_nothing_loads_behind_for_tiktoken() -> None:
    from worker.engine.engine import Engine

    with Engine(backend="tiktoken") as engine:
        assert engine.preload(["o200k_base"], behind=True) is None
        assert engine.local("o200k_base").method == "tiktoken:o200k_base"


def test_a_counter_told_to_count_here_never_hands_off(counter: Any) -> None:
    """A `fit --jobs` fork has a core to itself: even a large miss is counted on the
    caller's thread, with the same count."""
    local, pool = counter
    enc = encoding("o200k_base")
    local.here = True
    large = "words and more words " * local.backend.inline_chars
    pending = local.submit([large, "small"])
    assert not pending.futures and pool.submitted == []
    assert pending.result()[0] == [len(enc.encode_ordinary(large)), 1]


def test_engine_count_here_reaches_every_counter() -> None:
    from worker.engine.engine import Engine

    with Engine(backend="tiktoken") as engine:
        before = engine.local("o200k_base")
        engine.count_here()
        assert before.here and engine.local("cl100k_base").here
