"""Conversion refusals name the part; grouping of parallel calls and thinking turns."""

from __future__ import annotations

from typing import Any

import pytest

from worker.errors import InvalidRequest
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.convert import anthropic_to_openai, openai_to_anthropic
from worker.providers.grouping import anthropic_units, openai_units


def call(cid: str, arguments: str = "{}") -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": "f", "arguments": arguments}}


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([{"role": "user", "content": "hi", "name": "ana"}], "history[0].name"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "history[1]:"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [call("a", "[1]")]}],
            "history[0].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
            "history[0].content[0]",
        ),
        (
            [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}],
            "history[0].content[0].file",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}
                    ],
                }
            ],
            "history[0].content[0].image_url.url",
        ),
    ],
)
def test_openai_parts_without_a_claude_form_are_refused(raw: Any, path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        openai_to_anthropic(oa.parse_history(raw))
    assert str(info.value).startswith(path)


def test_consecutive_same_role_turns_merge_for_claude() -> None:
    raw = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}], "pin": True},
    ]
    _, claude = openai_to_anthropic(oa.parse_history(raw))
    assert len(claude) == 1 and claude[0].pin
    assert an.dump(claude) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_claude_parts_without_an_openai_form_are_refused() -> None:
    use = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    cases = [
        (
            [
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "x", "signature": "s"}, use],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}],
                },
            ],
            "history[0].content[0]",
        ),
        (
            [
                {"role": "assistant", "content": [use]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": "r",
                            "is_error": True,
                        }
                    ],
                },
            ],
            "history[1].content[0].is_error",
        ),
        (
            [
                {"role": "assistant", "content": [use]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "image", "source": {"type": "url", "url": "u"}}],
                        }
                    ],
                },
            ],
            "history[1].content[0].content[0]",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                        }
                    ],
                }
            ],
            "history[0].content[0]",
        ),
    ]
    for raw, path in cases:
        with pytest.raises(InvalidRequest) as info:
            anthropic_to_openai(an.parse_history(raw))
        assert str(info.value).startswith(path), raw


def test_thinking_can_be_dropped_on_request() -> None:
    raw = [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "x", "signature": "s"},
                {"type": "text", "text": "hi"},
            ],
        }
    ]
    out = anthropic_to_openai(an.parse_history(raw), drop_thinking=True)
    assert oa.dump(out) == [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]


def test_pdf_document_and_file_part_convert_both_ways() -> None:
    doc = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
        "title": "a.pdf",
    }
    openai = anthropic_to_openai(an.parse_history([{"role": "user", "content": [doc]}]))
    assert oa.dump(openai)[0]["content"] == [
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
        }
    ]
    _, back = openai_to_anthropic(openai)
    assert an.dump(back)[0]["content"] == [doc]


def test_parallel_calls_group_with_all_their_results() -> None:
    raw = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b")]},
        {"role": "tool", "tool_call_id": "b", "content": "rb"},
        {"role": "tool", "tool_call_id": "a", "content": "ra"},
        {"role": "assistant", "content": "done", "pin": True},
    ]
    units = openai_units(oa.parse_history(raw))
    assert [u.indices for u in units] == [(0,), (1, 2, 3), (4,)]
    assert [u.pinned for u in units] == [False, False, True]


def test_claude_thinking_turn_stays_with_its_tool_use_and_results() -> None:
    use = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    raw = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "plan", "signature": "s"}],
        },
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]},
        {"role": "assistant", "content": "ok"},
    ]
    units = anthropic_units(an.parse_history(raw))
    assert [u.indices for u in units] == [(0,), (1, 2, 3), (4,)]
