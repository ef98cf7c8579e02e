"""Provider-native payloads end to end through the engine: contract, counting, output shapes."""

from __future__ import annotations

import base64
import copy
import io
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.sdk_types import (
    ANTHROPIC_MESSAGES,
    ANTHROPIC_SYSTEM,
    ANTHROPIC_TOOLS,
    OPENAI_MESSAGES,
    OPENAI_TOOL_CHOICE,
    OPENAI_TOOLS,
    sdk_valid,
)
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.providers import anthropic as an
from worker.providers import openai as oa

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "native"
PLAIN = EXAMPLES.parent

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA",
                },
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _example(name: str, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    doc.update(over)
    return doc


def _fit(engine: Engine, doc: dict[str, Any]) -> FitResult:
    return engine.fit_sync(AssemblyRequest.model_validate(doc))


def _dumps(result: FitResult) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in result.messages]


def check_openai_output(result: FitResult) -> None:
    """SDK types and the API's ordering rules hold for an OpenAI result."""
    messages = _dumps(result)
    sdk_valid(OPENAI_MESSAGES, messages)
    if result.tools is not None:
        sdk_valid(OPENAI_TOOLS, result.tools)
    if result.tool_choice is not None:
        sdk_valid(OPENAI_TOOL_CHOICE, result.tool_choice)
    oa.check_history(oa.parse_history(messages), result.model)


def check_anthropic_output(result: FitResult) -> None:
    messages = _dumps(result)
    sdk_valid(ANTHROPIC_MESSAGES, messages)
    if result.system is not None:
        sdk_valid(ANTHROPIC_SYSTEM, result.system)
    if result.tools is not None:
        sdk_valid(ANTHROPIC_TOOLS, result.tools)
    an.check_history(an.parse_history(messages), result.model)
    roles = [m["role"] for m in messages]
    assert all(a != b for a, b in itertools.pairwise(roles)), roles


def test_cookbook_tool_example_gives_the_count_the_api_reported(
    make_engine: Callable[[], Engine],
) -> None:
    # openai-cookbook How_to_count_tokens_with_tiktoken, section 7: 101 for gpt-4o.
    doc = {
        "request_id": "cookbook",
        "model": "gpt-4o",
        "system": "You are a helpful assistant that can answer to questions about the weather.",
        "query": "What's the weather like in San Francisco?",
        "tools": [WEATHER],
    }
    result = _fit(make_engine(), doc)
    assert result.status == "ok", result.error
    assert result.usage is not None
    assert result.usage.total_tokens == 101
    assert result.exact is True and result.inexact == []
    assert result.usage.tools > 0
    assert result.tools == [WEATHER]


def test_agent_example_passes_through_and_adds_up(make_engine: Callable[[], Engine]) -> None:
    doc = _example("openai-agent-request.json")
    result = _fit(make_engine(), doc)
    assert result.status == "ok", result.error
    check_openai_output(result)
    sent = _dumps(result)
    assert sent[0] == {"role": "system", "content": doc["system"]}
    history = [{k: v for k, v in m.items() if k != "pin"} for m in doc["history"]]
    for m in history:
        if m.get("content") is None:
            m.pop("content", None)
    assert sent[1:-1] == history
    u = result.usage
    assert u is not None
    assert u.total_tokens == u.system + u.history + u.context + u.query + u.framing + u.tools
    assert result.exact is False
    assert "tool_calls: undocumented framing" in result.inexact
    assert result.tool_choice == "auto"


@pytest.mark.parametrize("window", [700, 800, 900, 1000, 1200, 1600])
def test_tool_units_and_pins_survive_tight_budgets(
    make_engine: Callable[[], Engine], window: int
) -> None:
    doc = _example("openai-agent-request.json")
    doc["budget"] = {"max_context_tokens": window, "output_reserve": 50}
    result = _fit(make_engine(), doc)
    if result.status == "error":
        assert result.error is not None and result.error.code == "over_budget"
        return
    check_openai_output(result)  # no orphan call or result
    sent = _dumps(result)
    assert sent[1]["content"] == doc["history"][0]["content"], "the pinned turn stays"
    dropped = [d for d in result.dropped if d.slot == "history"]
    by_unit: dict[int | None, list[int]] = {}
    for d in dropped:
        by_unit.setdefault(d.unit, []).append(d.index or 0)
    if 3 in {i for ix in by_unit.values() for i in ix}:  # the tool_calls message dropped...
        assert {3, 4, 5, 6} <= {i for ix in by_unit.values() for i in ix}  # ...with its results


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("pinned", [False, True])
def test_a_dropped_message_names_its_exchange_among_all_of_them(
    make_engine: Callable[[], Engine], native: bool, pinned: bool
) -> None:
    """`unit` is the exchange's position among every exchange of the history, pinned ones
    included: with the first exchange pinned, the first one dropped is exchange 1."""
    words = [
        "tokens",
        "budget",
        "window",
        "context",
        "slot",
        "history",
        "chunk",
        "query",
        "reserve",
    ]

    def turn(role: str, k: int) -> dict[str, Any]:
        text = " ".join(words[(k + j) % len(words)] for j in range(60))
        content: Any = [{"type": "text", "text": text}] if native else text
        return {"role": role, "content": content}

    history = [turn(role, 2 * e + (role == "assistant")) for e in range(5)
               for role in ("user", "assistant")]  # fmt: skip
    if pinned:
        history[0]["pin"] = True
    doc = {
        "request_id": "units",
        "model": "gpt-4o",
        "system": "Be brief.",
        "history": history,
        "query": "And now?",
        "budget": {"max_context_tokens": 420, "output_reserve": 16, "stable_history": False},
    }
    result = _fit(make_engine(), doc)
    assert result.status == "ok", result.error
    dropped = [d for d in result.dropped if d.slot == "history"]
    assert dropped, "the window is meant to drop some history"
    for d in dropped:
        assert d.index is not None
        exchange = sum(1 for m in history[: d.index + 1] if m["role"] == "user") - 1
        assert d.unit == exchange, (d.index, d.unit)
    if pinned:
        assert 0 not in {d.index for d in dropped}, "the pinned exchange is kept"


def test_image_worked_example_in_the_query(make_engine: Callable[[], Engine]) -> None:
    # OpenAI vision guide: gpt-4o, 1024x1024, detail high = 765 tokens.
    url = "data:image/png;base64," + _png(1024, 1024)
    doc = {
        "request_id": "img",
        "model": "gpt-4o",
        "query": [{"type": "image_url", "image_url": {"url": url, "detail": "high"}}],
    }
    result = _fit(make_engine(), doc)
    assert result.status == "ok", result.error
    assert result.usage is not None and result.usage.query == 765
    check_openai_output(result)


def test_multimodal_example(make_engine: Callable[[], Engine]) -> None:
    result = _fit(make_engine(), _example("multimodal-request.json"))
    assert result.status == "ok", result.error
    check_openai_output(result)
    assert "image: declared size" in result.inexact
    # the declared size is an extension: it never reaches the payload
    assert "width" not in json.dumps(_dumps(result))
    u = result.usage
    assert u is not None and u.history >= 85  # the low-detail banner image is in history


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["history"].pop(3), "history[3].tool_call_id"),
        (lambda d: d["history"].pop(5), "history[3].tool_calls[1]"),
        (lambda d: d["history"][4].update(tool_call_id="call_w2"), "history[5].tool_call_id"),
        (
            lambda d: d["history"][0].update(content=[{"type": "text", "text": ""}]),
            "history[0].content[0].text",
        ),
        (lambda d: d.update(tool_choice={"type": "function", "function": {"name": "x"}}), "x"),
    ],
    ids=["orphan-result", "unanswered-call", "duplicate-answer", "empty-text", "choice"],
)
def test_rule_violations_are_invalid_requests_with_a_path(
    make_engine: Callable[[], Engine], mutate: Callable[[dict[str, Any]], Any], path: str
) -> None:
    doc = _example("openai-agent-request.json")
    mutate(doc)
    result = _fit(make_engine(), doc)
    assert result.status == "error"
    assert result.error is not None and result.error.code == "invalid_request"
    assert path in result.error.message


def test_image_to_a_text_only_model_is_refused(make_engine: Callable[[], Engine]) -> None:
    doc = _example("multimodal-request.json", model="gpt-3.5-turbo")
    result = _fit(make_engine(), doc)
    assert result.status == "error" and result.error is not None
    assert result.error.code in ("invalid_request", "unknown_model")
    assert "history[0].content[1]" in result.error.message or "image" in result.error.message


def test_mixed_shapes_are_refused(make_engine: Callable[[], Engine]) -> None:
    doc = _example("openai-agent-request.json")
    doc["history"].append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "y"}]}
    )
    result = _fit(make_engine(), doc)
    assert result.status == "error" and result.error is not None
    assert "history[8]" in result.error.message


def test_claude_example_estimated_offline(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    engine.on_unavailable = "estimate"
    result = _fit(engine, _example("claude-tools-request.json"))
    assert result.status == "ok", result.error
    check_anthropic_output(result)
    sent = _dumps(result)
    last = sent[-1]["content"]
    # context and query join the tool_result turn, after its results
    assert [b["type"] for b in last] == ["tool_result", "text"]
    assert last[1]["text"].endswith("one sentence.")
    assert result.system == _example("claude-tools-request.json")["system"]
    assert result.exact is False
    assert any(r.startswith("document:") for r in result.inexact)


def test_openai_history_converts_for_claude(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    engine.on_unavailable = "estimate"
    doc = _example("openai-agent-request.json", model="claude-sonnet-4-5")
    result = _fit(engine, doc)
    assert result.status == "ok", result.error
    check_anthropic_output(result)
    uses = [b for m in _dumps(result) for b in m["content"] if isinstance(b, dict)]
    ids = [b["id"] for b in uses if b["type"] == "tool_use"]
    assert ids == ["call_w1", "call_w2", "call_f1"]
    assert result.tools is not None and result.tools[0]["name"] == "get_current_weather"
    assert result.tool_choice == {"type": "auto"}


def test_claude_history_converts_for_openai(make_engine: Callable[[], Engine]) -> None:
    doc = _example("claude-tools-request.json", model="gpt-4o")
    result = _fit(make_engine(), doc)
    assert result.status == "ok", result.error
    check_openai_output(result)
    sent = _dumps(result)
    assert sent[0]["role"] == "system"
    tool = next(m for m in sent if m["role"] == "tool")
    assert tool["tool_call_id"] == "toolu_01"
    assert result.tools is not None and result.tools[0]["type"] == "function"


def test_thinking_cannot_go_to_openai(make_engine: Callable[[], Engine]) -> None:
    doc = _example("claude-tools-request.json", model="gpt-4o")
    doc["history"][3]["content"].insert(0, {"type": "thinking", "thinking": "t", "signature": "s"})
    result = _fit(make_engine(), doc)
    assert result.status == "error" and result.error is not None
    assert result.error.code == "invalid_request"
    assert "history[3].content[0]" in result.error.message


def test_plain_request_output_is_unchanged_in_shape(
    make_engine: Callable[[], Engine],
) -> None:
    doc = json.loads((PLAIN / "request.json").read_text())
    result = _fit(make_engine(), copy.deepcopy(doc))
    assert result.status == "ok" and result.exact is True and result.inexact == []
    assert result.tools is None
    check_openai_output(result)


def test_claude_trim_keeps_units_whole_and_the_pin(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    engine.on_unavailable = "estimate"
    base = _example("claude-tools-request.json")
    full = _fit(engine, base)
    assert full.usage is not None
    for cut in (5, 20, 40, 60):
        window = full.usage.total_tokens - cut + 100
        doc = {**base, "request_id": f"tight-{cut}"}
        doc["budget"] = {"max_context_tokens": window, "output_reserve": 100}
        result = _fit(engine, doc)
        assert result.status == "ok", result.error
        check_anthropic_output(result)
        first = result.messages[0].content
        assert isinstance(first, list) and first[0]["type"] == "document", "pinned turn kept"
        dropped = {d.index: d.unit for d in result.dropped if d.slot == "history"}
        assert dropped, "the budget is meant to force a drop"
        if 3 in dropped:  # the tool_use turn goes with its tool_result turn, as one unit
            assert dropped.get(4) == dropped[3]


def test_bad_query_part_is_named_by_its_place_in_the_query(
    make_engine: Callable[[], Engine],
) -> None:
    doc = {
        "request_id": "q",
        "model": "gpt-4o",
        "query": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    result = _fit(make_engine(), doc)
    assert result.status == "error" and result.error is not None
    assert result.error.message.startswith("query[1].image_url.url"), result.error.message


_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_TURN_ONE = [
    {"role": "user", "content": "look it up"},
    {"role": "assistant", "content": None, "tool_calls": [_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
]


def _decoded(history: list[Any]) -> AssemblyRequest:
    from worker.engine.decode import decode_request

    doc = {"request_id": "m", "model": "gpt-4o", "history": history, "query": "and then?"}
    return decode_request(json.dumps(doc))


def test_a_resent_native_history_parses_only_its_new_messages(
    make_engine: Callable[[], Engine],
) -> None:
    engine = make_engine()
    memo = engine.memo
    assert memo is not None
    first = engine.fit_sync(_decoded(_TURN_ONE))
    assert (memo.hits, memo.misses) == (0, 4)
    second_history = [*_TURN_ONE, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "Done."}]  # fmt: skip
    second = engine.fit_sync(_decoded(second_history))
    assert (memo.hits, memo.misses) == (4, 6)  # only the two new messages were parsed
    assert second.messages[:4] == first.messages[:4]  # no system prompt: history first
    # a request built in Python (its dicts may hold what JSON cannot) takes the full path
    built = AssemblyRequest.model_validate(
        {"request_id": "p", "model": "gpt-4o", "history": second_history, "query": "q"}
    )
    assert engine.fit_sync(built).status == "ok"
    assert (memo.hits, memo.misses) == (4, 6)


def test_a_remembered_history_still_has_its_rules_checked(
    make_engine: Callable[[], Engine],
) -> None:
    """Each message was valid when remembered; the history they make now is not (a call
    whose result does not follow it): refused, naming the call, as without a memo."""
    engine = make_engine()
    engine.fit_sync(_decoded(_TURN_ONE))
    reordered = [_TURN_ONE[0], _TURN_ONE[3], _TURN_ONE[1], _TURN_ONE[3], _TURN_ONE[2]]
    result = engine.fit_sync(_decoded(reordered))
    assert result.error is not None and result.error.code == "invalid_request"
    assert result.error.message.startswith("history[2].tool_calls[0]: ")
    fresh = make_engine()
    fresh.memo = None
    assert fresh.fit_sync(_decoded(reordered)).error == result.error
