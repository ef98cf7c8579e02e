"""The engine end to end on OpenAI models: exact counts, drops reported, errors not crashes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import chat_tokens
from worker.count.vocab import encoding
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

MakeRequest = Callable[..., AssemblyRequest]


def _msgs(result: Any) -> list[dict[str, str]]:
    return [m.model_dump(exclude_none=True) for m in result.messages]


@pytest.mark.parametrize(
    ("model", "enc"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-5", "o200k_base"),
    ],
)
def test_total_equals_the_cookbook_count_of_the_emitted_payload(
    engine: Engine, make_request: MakeRequest, model: str, enc: str
) -> None:
    req = make_request(
        model=model,
        history=[
            {"role": "user", "content": "Hi there", "name": "ann"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
        chunks=[{"id": "a", "text": "Alpha is first."}, {"id": "b", "text": "Beta; second."}],
    )
    [result] = engine.fit_many_sync([req])
    assert result.status == "ok"
    assert result.count_method == f"tiktoken:{enc}"
    assert result.exact is True
    assert result.usage is not None
    assert result.usage.total_tokens == chat_tokens(_msgs(result), enc)


def test_special_token_text_is_counted_as_ordinary_text(
    engine: Engine, make_request: MakeRequest
) -> None:
    req = make_request(query="Explain <|endoftext|> and <|fim_prefix|> please")
    [result] = engine.fit_many_sync([req])
    assert result.status == "ok"
    assert result.usage is not None
    assert result.usage.query == len(encoding("o200k_base").encode_ordinary(req.query))
    assert result.usage.total_tokens == chat_tokens(_msgs(result), "o200k_base")


def test_every_dropped_item_is_reported_with_its_tokens(
    engine: Engine, make_request: MakeRequest
) -> None:
    long = "word " * 400
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"q{i} {long}"},
            {"role": "assistant", "content": f"a{i} {long}"},
        ]
    chunks = [{"id": f"c{i}", "text": f"{i} {long}"} for i in range(8)]
    req = make_request(
        history=history, chunks=chunks, budget={"max_context_tokens": 4000, "output_reserve": 400}
    )
    [result] = engine.fit_many_sync([req])
    assert result.usage is not None
    assert result.usage.total_tokens <= 3600
    # packing: a full budget is used nearly to its end
    assert result.usage.total_tokens > 3600 * 0.85
    kept_turns = sum(1 for m in result.messages if m.content.startswith(("q", "a")))
    dropped_turns = [d for d in result.dropped if d.slot == "history"]
    assert kept_turns + len(dropped_turns) == 12
    # whole exchanges: a user turn never survives without its reply
    assert kept_turns % 2 == 0
    assert all(d.tokens > 400 for d in result.dropped)
    kept_chunks = result.messages[-1].content.count("\n\n[c")
    assert kept_chunks + sum(d.slot == "context" for d in result.dropped) == 8


def test_duplicate_and_empty_chunks_are_sent_once_and_reported(
    engine: Engine, make_request: MakeRequest
) -> None:
    chunks = [
        {"id": "a", "text": "same text"},
        {"id": "b", "text": "same text"},
        {"id": "c", "text": "   "},
    ]
    [result] = engine.fit_many_sync([make_request(chunks=chunks)])
    final = result.messages[-1].content
    assert final.count("same text") == 1
    reasons = {d.id: d.reason for d in result.dropped}
    assert reasons == {"b": "duplicate", "c": "empty"}


def test_top_chunk_dropped_and_utilization_alerts(
    engine: Engine, make_request: MakeRequest
) -> None:
    chunks = [{"id": "big", "text": "x " * 3000}, {"id": "small", "text": "fits"}]
    req = make_request(chunks=chunks, budget={"max_context_tokens": 1000, "output_reserve": 100})
    [result] = engine.fit_many_sync([req])
    types = {a.type for a in result.alerts}
    assert "top_chunk_dropped" in types
    dropped = {d.id: d.reason for d in result.dropped}
    assert dropped == {"big": "context_budget"}
    full = make_request(
        history=[{"role": "user", "content": "y " * 380}],
        budget={"max_context_tokens": 500, "output_reserve": 50},
    )
    [r2] = engine.fit_many_sync([full])
    assert r2.usage is not None
    assert r2.usage.utilization >= 0.8
    assert any(a.type == "utilization_high" and a.threshold == 0.8 for a in r2.alerts)


def test_system_and_query_over_budget_is_an_error_result(
    engine: Engine, make_request: MakeRequest
) -> None:
    req = make_request(system="s " * 600, budget={"max_context_tokens": 500, "output_reserve": 0})
    [result] = engine.fit_many_sync([req])
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "over_budget"
    assert result.messages == []


def test_unknown_model_and_profile_are_error_results(
    engine: Engine, make_request: MakeRequest
) -> None:
    [r1, r2] = engine.fit_many_sync(
        [make_request(model="gpt-9-turbo-max"), make_request(budget={"profile": "nope"})]
    )
    assert r1.error is not None and r1.error.code == "unknown_model"
    assert r2.error is not None and r2.error.code == "unknown_profile"


def test_truncation_cuts_at_a_token_boundary_within_budget(
    engine: Engine, make_request: MakeRequest
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 200
    req = make_request(
        chunks=[{"id": "long", "text": text}],
        budget={"max_context_tokens": 600, "output_reserve": 100, "truncate_chunks": True},
    )
    [result] = engine.fit_many_sync([req])
    assert result.usage is not None
    assert [t.id for t in result.truncated] == ["long"]
    cut = result.truncated[0]
    assert cut.kept_tokens < cut.original_tokens
    assert result.usage.total_tokens <= 500
    assert result.usage.total_tokens == chat_tokens(_msgs(result), "o200k_base")
    assert result.usage.total_tokens > 500 - 10


def test_profiles_shape_the_split(engine: Engine, make_request: MakeRequest) -> None:
    turn = "talk " * 200
    history = [{"role": r, "content": turn} for r in ["user", "assistant"] * 10]
    chunks = [{"id": f"c{i}", "text": f"{i} " + "fact " * 200} for i in range(20)]
    common = {"max_context_tokens": 8000, "reflow": False, "stable_history": False}
    rag, support = engine.fit_many_sync(
        [
            make_request(
                history=history, chunks=chunks, budget={**common, "profile": "rag-chatbot"}
            ),
            make_request(
                history=history, chunks=chunks, budget={**common, "profile": "support-agent"}
            ),
        ]
    )
    assert rag.usage is not None and support.usage is not None
    assert rag.usage.context > support.usage.context
    assert support.usage.history > rag.usage.history
    assert rag.usage.history <= 0.30 * 8000
    assert rag.usage.context <= 0.55 * 8000


def test_repeated_pieces_hit_the_cache(engine: Engine, make_request: MakeRequest) -> None:
    history = [
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": "first reply"},
    ]
    req = make_request(history=history)
    engine.fit_many_sync([req])
    before = engine.cache.stats()
    longer = make_request(history=[*history, {"role": "user", "content": "second turn"}])
    engine.fit_many_sync([longer])
    after = engine.cache.stats()
    assert after.entries - before.entries == 1  # only the new turn was counted
    assert after.hits > before.hits


async def test_async_fit_matches_batch_fit(engine: Engine, make_request: MakeRequest) -> None:
    req = make_request(chunks=[{"id": "a", "text": "alpha"}])
    one = await engine.fit(req)
    [batch] = [r async for r in engine.fit_many([req])]
    assert one.messages == batch.messages
    assert one.usage == batch.usage


def test_a_window_over_the_models_is_fitted_to_the_model_and_said(
    engine: Engine, make_request: MakeRequest
) -> None:
    """`budget.max_context_tokens` can lower the model's window, never raise it: a payload
    fitted to a larger one would be refused by the provider."""
    window = engine.catalog.model("gpt-4o").context_window
    chunks = [{"id": f"c{i}", "text": "word " * 20_000} for i in range(3)]  # ~60k tokens each
    [asked, plain] = engine.fit_many_sync(
        [
            make_request(chunks=chunks, budget={"max_context_tokens": 10 * window}),
            make_request(chunks=chunks),
        ]
    )
    assert asked.usage is not None and plain.usage is not None
    assert asked.usage.max_context_tokens == window
    assert asked.usage.total_tokens <= asked.usage.budget_tokens < window
    assert asked.usage.model_dump() == plain.usage.model_dump()
    assert [d.id for d in asked.dropped] == [d.id for d in plain.dropped] != []
    [alert] = [a for a in asked.alerts if a.type == "window_capped"]
    assert alert.value == 10 * window and alert.threshold == window
    assert not any(a.type == "window_capped" for a in plain.alerts)
    [lower] = engine.fit_many_sync([make_request(budget={"max_context_tokens": 5000})])
    assert lower.usage is not None and lower.usage.max_context_tokens == 5000
    assert not any(a.type == "window_capped" for a in lower.alerts)


@pytest.mark.parametrize("bad", [True, 8192.0, 8192.5, "8192"])
def test_budget_numbers_are_numbers(make_request: MakeRequest, bad: object) -> None:
    """JSON `true` is not a window of 1 token, nor a string or a fraction a token count."""
    with pytest.raises(ValueError, match="max_context_tokens"):
        make_request(budget={"max_context_tokens": bad})
    with pytest.raises(ValueError, match="output_reserve"):
        make_request(budget={"output_reserve": bad})


def test_orphan_tool_turn_is_refused(engine: Engine, make_request: MakeRequest) -> None:
    """A plain history has no `tool_calls`, so a plain `tool` turn answers no call: OpenAI
    would refuse the payload, so the request is refused, with the turn's path."""
    req = make_request(
        history=[
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "t1", "content": "x"},
        ]
    )
    [result] = engine.fit_many_sync([req])
    assert result.error is not None and result.error.code == "invalid_request"
    assert "history[1].tool_call_id" in result.error.message
    answered = make_request(
        history=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "x"},
        ]
    )
    [ok] = engine.fit_many_sync([answered])
    assert ok.status == "ok"
    assert [m.model_dump(exclude_none=True)["role"] for m in ok.messages][-2] == "tool"
