"""Cost, prompt-cache facts and breakpoints in the engine's results, end to end."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from tests.support.sdk_types import ANTHROPIC_MESSAGES, ANTHROPIC_SYSTEM, sdk_valid
from worker.catalog import Catalog
from worker.cli.table import render_table
from worker.count.cache import CountCache
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

MakeRequest = Callable[..., AssemblyRequest]
LONG_SYSTEM = "Answer in one short paragraph, citing the context by id. " * 120


def test_gpt5_cost_bills_the_system_prefix_in_whole_cached_blocks(
    engine: Engine, make_request: MakeRequest
) -> None:
    res = engine.fit_sync(make_request(model="gpt-5", system=LONG_SYSTEM))
    assert res.usage is not None and res.usage.cost is not None and res.prompt_cache is not None
    u, cost = res.usage, res.usage.cost
    # the system message (content, 3 framing tokens, 1 for the role) opens every turn
    head = u.system + 4
    assert res.prompt_cache.prefix_tokens == head
    cached = head // 128 * 128
    assert cached >= 1024 and cost.cached_tokens == cached and cost.cache_write_tokens == 0
    # gpt-5: $1.25 / M input, $0.125 / M cached, $10 / M output
    expected = (Decimal(u.total_tokens - cached) * Decimal("1.25") + cached * Decimal("0.125")) / (
        10**6
    )
    assert cost.input == pytest.approx(float(expected), abs=1e-9)
    assert cost.output_worst_case == pytest.approx(u.output_reserve * 10 / 1e6, abs=1e-9)
    assert cost.total_worst_case == pytest.approx(cost.input + cost.output_worst_case, abs=2e-9)
    assert cost.currency == "USD" and "openai.com" in cost.price_source


def test_short_prefix_is_not_cached(engine: Engine, make_request: MakeRequest) -> None:
    res = engine.fit_sync(make_request(model="gpt-5"))
    assert res.usage is not None and res.usage.cost is not None
    assert res.usage.cost.cached_tokens == 0  # under OpenAI's 1,024-token minimum
    assert res.usage.cost.input == pytest.approx(res.usage.total_tokens * 1.25e-6, abs=1e-9)


def test_a_model_without_prices_reports_no_cost_and_says_why(
    catalog: Catalog, make_request: MakeRequest
) -> None:
    models = dict(catalog.models)
    models["gpt-4o"] = models["gpt-4o"].model_copy(update={"prices": None})
    with Engine(catalog=catalog.model_copy(update={"models": models})) as engine:
        res = engine.fit_sync(make_request())
        capped = engine.fit_sync(make_request(budget={"max_input_cost": "0.01"}))
    assert res.status == "ok" and res.usage is not None
    assert res.usage.cost is None and res.usage.cost_unavailable is not None
    assert "gpt-4o" in res.usage.cost_unavailable
    assert capped.status == "error" and capped.error is not None
    assert capped.error.code == "invalid_request"


def test_max_input_cost_lowers_the_budget_and_alerts_when_it_binds(
    engine: Engine, make_request: MakeRequest
) -> None:
    chunks = [{"id": f"c{i}", "text": f"{i} " + "fact " * 300} for i in range(10)]
    res = engine.fit_sync(
        make_request(model="gpt-5", chunks=chunks, budget={"max_input_cost": "0.002"})
    )
    assert res.status == "ok" and res.usage is not None and res.usage.cost is not None
    # $0.002 at $1.25 / M uncached input: 1,600 tokens
    assert res.usage.budget_tokens == 1600
    assert res.usage.cost.max_input_cost == 0.002
    assert res.usage.cost.input <= 0.002
    assert any(d.reason == "context_budget" for d in res.dropped)
    assert [a.type for a in res.alerts if a.type == "input_cost_cap"] == ["input_cost_cap"]
    roomy = engine.fit_sync(make_request(model="gpt-5", budget={"max_input_cost": "10"}))
    assert roomy.usage is not None and roomy.usage.budget_tokens == 272_000
    assert not any(a.type == "input_cost_cap" for a in roomy.alerts)


@pytest.mark.parametrize(
    ("mode", "extra", "key"),
    [
        (None, {}, None),
        ("off", {}, None),
        ("conversation", {}, "conv-1"),
        ("conversation", {"conversation_id": None}, "acme/support"),
        ("pipeline", {}, "acme/support"),
        ("pipeline", {"tenant": None}, "support"),
    ],
)
def test_prompt_cache_key(
    engine: Engine, make_request: MakeRequest, mode: str | None, extra: dict[str, Any], key: str
) -> None:
    doc: dict[str, Any] = {"conversation_id": "conv-1", "tenant": "acme", "pipeline": "support"}
    doc.update(extra)
    res = engine.fit_sync(make_request(budget={"prompt_cache_key": mode}, **doc))
    assert res.prompt_cache_key == key


def test_prompt_cache_key_setting_and_long_keys(
    catalog: Catalog, make_request: MakeRequest
) -> None:
    caching = catalog.caching.model_copy(update={"prompt_cache_key": "conversation"})
    with Engine(catalog=catalog.model_copy(update={"caching": caching})) as engine:
        res = engine.fit_sync(make_request(conversation_id="x" * 200))
        off = engine.fit_sync(make_request(conversation_id="c", budget={"prompt_cache_key": "off"}))
    assert res.prompt_cache_key is not None and len(res.prompt_cache_key) == 64
    assert res.prompt_cache_key != "x" * 64 and off.prompt_cache_key is None


def claude_request(ttl: str | None = None, **budget: Any) -> AssemblyRequest:
    history = []
    for t in range(6):
        history.append({"role": "user", "content": f"question {t} " + "detail " * 150})
        history.append({"role": "assistant", "content": f"answer {t} " + "reply " * 150})
    return AssemblyRequest.model_validate(
        {
            "request_id": "claude-1",
            "model": "claude-sonnet-4-5",
            "system": LONG_SYSTEM,
            "history": history,
            "query": "And the last one?",
            "budget": {"cache_ttl": ttl, **budget},
        }
    )


def claude_engine(catalog: Catalog) -> Engine:
    return Engine(catalog=catalog, cache=CountCache(1 << 20), on_unavailable="estimate")


@pytest.mark.parametrize("ttl", [None, "1h"])
def test_claude_breakpoints_in_the_emitted_payload(catalog: Catalog, ttl: str | None) -> None:
    with claude_engine(catalog) as engine:
        res = engine.fit_sync(claude_request(ttl))
    assert res.status == "ok" and res.prompt_cache is not None and res.usage is not None
    cache = res.prompt_cache
    assert cache.anthropic is not None and cache.breakpoints_placed_by == "tokenheap"
    sdk_valid(ANTHROPIC_MESSAGES, cache.anthropic.messages)
    sdk_valid(ANTHROPIC_SYSTEM, cache.anthropic.system)
    # same payload as the result's, in block form
    assert [b["text"] for b in cache.anthropic.system or []] == [res.system]
    assert [(m["role"], m["content"][0]["text"]) for m in cache.anthropic.messages] == [
        (m.role, m.content) for m in res.messages
    ]
    marks = [
        (m_i, block["cache_control"])
        for m_i, m in enumerate(cache.anthropic.messages)
        for block in m["content"]
        if "cache_control" in block
    ]
    system_marks = [
        b["cache_control"] for b in cache.anthropic.system or [] if "cache_control" in b
    ]
    assert 1 <= len(marks) + len(system_marks) <= 4
    want = {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}
    assert all(c == want for _, c in marks) and system_marks == [want]
    # the last history message carries one (the final user message never does: it changes)
    assert marks[-1][0] == len(res.messages) - 2
    assert [b.section for b in cache.breakpoints] == ["system", "messages"]
    cost = res.usage.cost
    assert cost is not None and cost.write_ttl == (ttl or "5m")
    # sonnet-4.5 rates: $3 input, $0.3 read, $3.75 (5m) or $6 (1h) write, per million
    write = 6 if ttl == "1h" else 3.75
    fresh = res.usage.total_tokens - cost.cached_tokens - cost.cache_write_tokens
    expected = (fresh * 3 + cost.cached_tokens * 0.3 + cost.cache_write_tokens * write) / 1e6
    assert cost.input == pytest.approx(expected, abs=1e-8)
    # steady state: the previous turn wrote the prefix it shared, this turn reads it and
    # writes only the newest exchange
    assert cost.cached_tokens == cache.prefix_tokens
    assert cost.cache_write_tokens == cache.breakpoints[-1].prefix_tokens - cache.prefix_tokens


def test_claude_breakpoints_can_be_switched_off(catalog: Catalog) -> None:
    caching = catalog.caching.model_copy(update={"anthropic_breakpoints": False})
    with claude_engine(catalog.model_copy(update={"caching": caching})) as engine:
        res = engine.fit_sync(claude_request())
    assert res.prompt_cache is not None and res.prompt_cache.anthropic is None
    assert res.usage is not None and res.usage.cost is not None
    assert res.usage.cost.cached_tokens == 0


def test_table_shows_the_cost(engine: Engine, make_request: MakeRequest) -> None:
    res = engine.fit_sync(make_request(model="gpt-5"))
    assert res.usage is not None and res.usage.cost is not None
    lines = [line for line in render_table(res).splitlines() if line.strip().startswith("cost")]
    assert len(lines) == 1 and f"${res.usage.cost.input:.6f}" in lines[0]


async def test_claude_counted_by_the_api_gets_breakpoints_on_the_confirmed_payload(
    catalog: Catalog, anthropic_server: Any
) -> None:
    from worker.count.anthropic_api import make_client
    from worker.count.claude_confirm import PayloadConfirmer
    from worker.count.limiter import RateLimiter

    cache = CountCache(1 << 20)

    def counter() -> PayloadConfirmer:
        client = make_client("test-key", anthropic_server.base_url, 2.0, 1)
        return PayloadConfirmer(client, RateLimiter(1e6, burst=8), deadline_s=5.0)

    async with Engine(catalog=catalog, cache=cache, anthropic_factory=counter) as engine:
        res = await engine.fit(claude_request())
    assert res.status == "ok" and res.exact and res.usage is not None
    assert res.prompt_cache is not None and res.prompt_cache.anthropic is not None
    sdk_valid(ANTHROPIC_MESSAGES, res.prompt_cache.anthropic.messages)
    sdk_valid(ANTHROPIC_SYSTEM, res.prompt_cache.anthropic.system)
    cost = res.usage.cost
    assert cost is not None
    last = res.prompt_cache.breakpoints[-1].prefix_tokens
    assert cost.cached_tokens + cost.cache_write_tokens == last < res.usage.total_tokens
