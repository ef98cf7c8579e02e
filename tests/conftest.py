"""Shared fixtures: a real engine with the shipped vocabularies, and a request factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import settings

from worker.catalog import Catalog, load_catalog
from worker.count.cache import CountCache
from worker.count.vocab import encoding
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

settings.register_profile(
    "default", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))
)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _clean_tokenheap_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without TOKENHEAP_* variables: a developer's shell (or a CI job)
    exporting TOKENHEAP_BOOTSTRAP_SERVERS must not change what a test sees. Tests that want
    one set it with monkeypatch."""
    for name in list(os.environ):
        if name.startswith("TOKENHEAP_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def engine(catalog: Catalog) -> Iterator[Engine]:
    with Engine(catalog=catalog, cache=CountCache(8 * 1024 * 1024)) as engine:
        yield engine


def chat_tokens(messages: list[dict[str, Any]], enc_name: str) -> int:
    """The OpenAI cookbook's num_tokens_from_messages, computed independently of the engine."""
    enc = encoding(enc_name)
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode_ordinary(value))
            if key == "name":
                total += 1
    return total


@pytest.fixture
def make_request() -> Callable[..., AssemblyRequest]:
    def make(**overrides: Any) -> AssemblyRequest:
        doc: dict[str, Any] = {
            "request_id": "r1",
            "model": "gpt-4o",
            "system": "You are helpful.",
            "history": [],
            "chunks": [],
            "query": "What is the answer?",
        }
        doc.update(overrides)
        return AssemblyRequest.model_validate(doc)

    return make


@pytest.fixture(scope="session")
def make_engine(catalog: Catalog) -> Iterator[Callable[[], Engine]]:
    """Engines for hypothesis tests (function fixtures do not reset between examples)."""
    pool = ThreadPoolExecutor(2)
    yield lambda: Engine(catalog=catalog, cache=CountCache(1024 * 1024), executor=pool)
    pool.shutdown()
