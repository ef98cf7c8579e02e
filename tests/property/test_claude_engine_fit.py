"""Invariants of a Claude fit through the engine, against the bytes-counting server: whatever
the request, the total is the server's count of the emitted payload and within budget."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.anthropic_server import AnthropicServer, bytes_expected_tokens
from worker.catalog import Catalog
from worker.count.anthropic_api import make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.limiter import RateLimiter
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

# Printable text with some multi-byte characters; never whitespace only (the API refuses it).
TEXT = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=300
).filter(lambda t: t.strip() != "")


@pytest.fixture(scope="module")
def claude(catalog: Catalog) -> Iterator[Engine]:
    with AnthropicServer(counting="bytes") as server:
        pool = ThreadPoolExecutor(2)
        engine = Engine(
            catalog=catalog,
            cache=CountCache(8 << 20),
            executor=pool,
            anthropic_factory=lambda: PayloadConfirmer(
                make_client("sk-test", server.base_url, 5.0, 0), RateLimiter(1e6, burst=8)
            ),
        )
        with engine:
            yield engine
        pool.shutdown()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    system=TEXT,
    history=st.lists(TEXT, max_size=8),
    chunks=st.lists(TEXT, max_size=20),
    query=TEXT,
    window=st.integers(min_value=200, max_value=3000),
)
def test_total_is_the_apis_count_and_within_budget(
    claude: Engine, system: str, history: list[str], chunks: list[str], query: str, window: int
) -> None:
    roles = ("user", "assistant")
    req = AssemblyRequest.model_validate(
        {
            "request_id": "p",
            "model": "claude-sonnet-4-5",
            "system": system,
            "history": [{"role": roles[i % 2], "content": t} for i, t in enumerate(history)],
            "chunks": [{"id": f"c{i}", "text": t} for i, t in enumerate(chunks)],
            "query": query,
            "budget": {"max_context_tokens": window, "output_reserve": 0},
        }
    )
    result = claude.fit_sync(req)
    if result.status == "error":
        assert result.error is not None and result.error.code == "over_budget"
        return
    usage = result.usage
    assert usage is not None and result.exact
    body: dict[str, Any] = {"model": result.model, "system": result.system}
    body["messages"] = [{"role": m.role, "content": m.content} for m in result.messages]
    assert usage.total_tokens == bytes_expected_tokens(body)
    assert usage.total_tokens <= usage.budget_tokens
    slots = usage.system + usage.history + usage.context + usage.query + usage.tools
    assert slots + usage.framing == usage.total_tokens
    texts = [_text(m.content) for m in result.messages]
    assert query in texts[-1]
    # the kept history is its newest part; a trailing user turn may share the final message
    # with the context and query (Claude's roles alternate)
    kept = [t for t in texts[:-1]]
    last = result.messages[-1].content
    if isinstance(last, list) and len(last) > 1 and history:
        kept.append(_text(last[:1]))
    assert kept == history[len(history) - len(kept) :]


def _text(content: Any) -> str:
    """A message's text: the string, or its text blocks joined (the final turn may hold
    a trailing user turn's blocks and then the context and query)."""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")
