"""Claude requests through the engine: the real SDK against a local count_tokens server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest

from worker.catalog import Catalog
from worker.count.anthropic_api import make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.limiter import RateLimiter
from worker.engine.engine import Engine
from worker.engine.fit_api import OnUnavailable
from worker.engine.request import AssemblyRequest

MakeRequest = Callable[..., AssemblyRequest]


@pytest.fixture
async def claude_engine(
    catalog: Catalog, anthropic_server: Any
) -> AsyncIterator[Callable[[OnUnavailable], Engine]]:
    engines: list[Engine] = []
    pool = ThreadPoolExecutor(1)

    def make(policy: OnUnavailable = "fail") -> Engine:
        cache = CountCache(1024 * 1024)

        def counter() -> PayloadConfirmer:
            client = make_client("test-key", anthropic_server.base_url, 2.0, 1)
            return PayloadConfirmer(
                client, RateLimiter(1e6, burst=8), attempts=2, backoff_s=0.01, deadline_s=5.0
            )

        engine = Engine(
            catalog=catalog,
            cache=cache,
            executor=pool,
            anthropic_factory=counter,
            on_unavailable=policy,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()
    pool.shutdown()


def _claude(make_request: MakeRequest, **kw: Any) -> AssemblyRequest:
    base: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "history": [
            {"role": "user", "content": "Earlier question?"},
            {"role": "assistant", "content": "Earlier answer."},
        ],
        "chunks": [
            {"id": "k1", "text": "Fact one about keys."},
            {"id": "k2", "text": "Fact two about rotation."},
        ],
    }
    base.update(kw)
    return make_request(**base)


async def test_total_is_the_confirmed_count_of_the_emitted_payload(
    claude_engine: Callable[[OnUnavailable], Engine],
    make_request: MakeRequest,
    anthropic_server: Any,
    anthropic_server_module: ModuleType,
) -> None:
    result = await claude_engine("fail").fit(_claude(make_request))
    assert result.status == "ok", result.error
    assert result.count_method == "anthropic:count_tokens"
    assert result.exact is True
    assert result.system == "You are helpful."
    assert all(m.role in ("user", "assistant") for m in result.messages)
    payload = [{"role": m.role, "content": m.content} for m in result.messages]
    expected = anthropic_server_module.expected_tokens(result.system, payload)
    assert result.usage is not None
    assert result.usage.total_tokens == expected
    # the last call the server saw is the confirmation of exactly this payload
    last = anthropic_server.requests[-1].body
    assert last["messages"] == payload


async def test_a_repeated_payload_is_not_recounted(
    claude_engine: Callable[[OnUnavailable], Engine],
    make_request: MakeRequest,
    anthropic_server: Any,
) -> None:
    engine = claude_engine("fail")
    first = await engine.fit(_claude(make_request))
    assert len(anthropic_server.requests) == 1  # one count: the payload, not its pieces
    again = await engine.fit(_claude(make_request, request_id="r2"))
    # the same payload bytes were counted before: answered from the digest cache
    assert len(anthropic_server.requests) == 1
    assert again.usage is not None and first.usage is not None
    assert again.usage.total_tokens == first.usage.total_tokens


async def test_api_down_fails_retriably_or_estimates_by_policy(
    claude_engine: Callable[[OnUnavailable], Engine],
    make_request: MakeRequest,
    anthropic_server: Any,
    fault: Any,
) -> None:
    anthropic_server.script(*[fault.status(503, retry_after_ms=1)] * 50)
    failed = await claude_engine("fail").fit(_claude(make_request))
    assert failed.status == "error"
    assert failed.error is not None
    assert (failed.error.code, failed.error.retriable) == ("counting_unavailable", True)
    estimated = await claude_engine("estimate").fit(_claude(make_request))
    assert estimated.status == "ok"
    assert estimated.exact is False
    assert estimated.count_method is not None and estimated.count_method.startswith("estimate")


async def test_confirmed_overflow_trims_until_it_fits(
    claude_engine: Callable[[OnUnavailable], Engine],
    make_request: MakeRequest,
    anthropic_server: Any,
    anthropic_server_module: ModuleType,
) -> None:
    chunks = [{"id": f"c{i}", "text": " ".join(["word"] * 30)} for i in range(12)]
    req = _claude(
        make_request, chunks=chunks, budget={"max_context_tokens": 300, "output_reserve": 20}
    )
    result = await claude_engine("fail").fit(req)
    assert result.status == "ok", result.error
    assert result.usage is not None
    assert result.usage.total_tokens <= 280
    payload = [{"role": m.role, "content": m.content} for m in result.messages]
    assert result.usage.total_tokens == anthropic_server_module.expected_tokens(
        result.system, payload
    )
    assert any(d.slot == "context" for d in result.dropped)


async def test_concurrent_identical_requests_share_one_call(
    claude_engine: Callable[[OnUnavailable], Engine],
    make_request: MakeRequest,
    anthropic_server: Any,
) -> None:
    import asyncio

    engine = claude_engine("fail")
    reqs = [_claude(make_request, request_id=f"r{i}") for i in range(10)]
    results = await asyncio.gather(*(engine.fit(r) for r in reqs))
    assert all(r.status == "ok" for r in results)
    # ten requests with the same payload in flight at once: one count_tokens call
    assert len(anthropic_server.requests) == 1
