"""Differential test: every fast backend counts exactly as tiktoken, the reference."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.corpus import paragraphs
from worker.catalog import Catalog
from worker.count.backends import FastokensBackend, TiktokenBackend
from worker.count.vocab import encoding
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

ENCODINGS = ["o200k_base", "cl100k_base"]


@cache
def fast(name: str) -> FastokensBackend:
    return FastokensBackend(name)


def reference(name: str, texts: list[str]) -> list[int]:
    return TiktokenBackend(encoding(name)).count_many(texts)


TRICKY = [
    "",
    "<|endoftext|> is text here, as are <|fim_prefix|> and <|endofprompt|>",
    "don't won't y'all'd've 'S 'LL",
    "a" * 20_000,
    " " * 5000 + "\n" * 300 + "\t\r\n" * 50,
    "中文字符和日本語のテキスト、한국어 텍스트",
    "emoji 👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and math 𝔸𝔹ℂ",
    "e\u0301 combining, ﬁ ligature, \u00a0nbsp, zero\u200bwidth",
    "lone surrogate \ud800 and pair \ud83d\ude00",
    "1234567890 3.14159 -42 1e10 0x1F",
    "def f(x):\n    return x**2  # comment\n",
]


@pytest.mark.parametrize("name", ENCODINGS)
def test_real_text_and_tricky_strings_count_the_same(name: str) -> None:
    texts = [*paragraphs(), *TRICKY, "\n\n".join(paragraphs()[:200])]
    assert fast(name).count_many(texts) == reference(name, texts)


@pytest.mark.parametrize("name", ENCODINGS)
@given(texts=st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=20))
def test_arbitrary_unicode_counts_the_same(name: str, texts: list[str]) -> None:
    assert fast(name).count_many(texts) == reference(name, texts)


def test_engine_results_are_identical_with_the_fast_backend(catalog: Catalog) -> None:
    paras = paragraphs()
    req = AssemblyRequest.model_validate(
        {
            "request_id": "same",
            "model": "gpt-4o",
            "system": paras[0],
            "history": [
                {"role": "user" if i % 2 == 0 else "assistant", "content": p}
                for i, p in enumerate(paras[1:30])
            ],
            "chunks": [{"id": f"c{i}", "text": p} for i, p in enumerate(paras[30:80])],
            "query": paras[80],
            "budget": {"max_context_tokens": 6000},
        }
    )
    pool = ThreadPoolExecutor(2)
    try:
        results = [
            Engine(catalog=catalog, executor=pool, backend=backend).fit_many_sync([req])[0]
            for backend in ("tiktoken", "fastokens")
        ]
    finally:
        pool.shutdown()
    slow, quick = (r.model_dump(exclude={"count_method"}) for r in results)
    assert slow == quick
    assert results[1].count_method == "fastokens:o200k_base"
    assert slow["dropped"], "the request should be over budget so drops are compared too"
