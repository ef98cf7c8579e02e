"""Tool definitions, tool_calls and tool messages, counted by the cookbook's stated rules."""

from __future__ import annotations

from typing import Any

import pytest

from worker.count.vocab import encoding
from worker.providers.tools import (
    count_tool_calls,
    count_tool_definitions,
    count_tool_message,
    tool_family,
)

# The cookbook's section 7 example (How_to_count_tokens_with_tiktoken.ipynb).
WEATHER: list[dict[str, Any]] = [
    {
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
]
MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def framing(enc_name: str) -> int:
    """num_tokens_from_messages for the example: 3 per message, every value, +3 priming."""
    enc = encoding(enc_name)
    return 3 + sum(3 + sum(len(enc.encode(v)) for v in m.values()) for m in MESSAGES)


# The prompt_tokens the cookbook got back from the API for this request.
@pytest.mark.parametrize(
    ("model", "enc_name", "api_prompt_tokens"),
    [
        ("gpt-4o", "o200k_base", 101),
        ("gpt-4o-mini", "o200k_base", 101),
        ("gpt-4", "cl100k_base", 105),
        ("gpt-3.5-turbo", "cl100k_base", 105),
    ],
)
def test_cookbook_tool_example_matches_the_api(
    model: str, enc_name: str, api_prompt_tokens: int
) -> None:
    tools, inexact = count_tool_definitions(WEATHER, model, encoding(enc_name))
    assert framing(enc_name) + tools == api_prompt_tokens
    assert inexact == []


def test_a_count_callable_works_like_an_encoding() -> None:
    enc = encoding("o200k_base")
    by_callable = count_tool_definitions(WEATHER, "gpt-4o", lambda t: len(enc.encode(t)))
    assert by_callable == count_tool_definitions(WEATHER, "gpt-4o", enc)


def test_snapshots_use_their_family_and_others_say_what_was_used() -> None:
    assert tool_family("gpt-4o-2024-08-06", "o200k_base")[1] == []
    assert tool_family("gpt-4-0613", "cl100k_base")[1] == []
    _, why = tool_family("gpt-4.1", "o200k_base")
    assert why and "gpt-4o" in why[0]
    family, why = tool_family("gpt-4-turbo", "cl100k_base")
    assert family.func_init == 10 and why


def test_no_tools_cost_nothing() -> None:
    assert count_tool_definitions([], "gpt-4o", encoding("o200k_base")) == (0, [])


def test_uncovered_shapes_are_counted_and_named() -> None:
    enc = encoding("o200k_base")
    nested = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "who": {"type": "object", "properties": {"name": {"type": "string"}}},
                    "days": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
    }
    flat_only = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {"who": {"type": "object"}, "days": {"type": "array"}},
            },
        },
    }
    n_nested, why = count_tool_definitions([nested], "gpt-4o", enc)
    n_flat, _ = count_tool_definitions([flat_only], "gpt-4o", enc)
    assert n_nested > n_flat
    assert any("nested object" in r for r in why)
    assert any("array" in r for r in why)
    assert any("without description" in r for r in why)


def test_tool_calls_and_tool_messages_are_marked_inexact() -> None:
    enc = encoding("o200k_base")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    one, why = count_tool_calls([call], enc)
    two, _ = count_tool_calls([call, {**call, "id": "c2"}], enc)
    assert two == 2 * one and one > len(enc.encode('{"a": 1}'))
    assert why == ["tool_calls: undocumented framing"]
    tokens, why = count_tool_message({"role": "tool", "tool_call_id": "c1"}, enc)
    assert tokens > 0 and why
