"""Native OpenAI / Anthropic shapes: strict parsing, SDK-exact dumps, rule errors with paths."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from tests.support.sdk_types import (
    ANTHROPIC_MESSAGES,
    ANTHROPIC_SYSTEM,
    ANTHROPIC_TOOL_CHOICE,
    ANTHROPIC_TOOLS,
    OPENAI_MESSAGES,
    OPENAI_TOOL_CHOICE,
    OPENAI_TOOLS,
    sdk_valid,
)
from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers import anthropic as an
from worker.providers import openai as oa


def png_b64(w: int = 64, h: int = 32) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def call(cid: str, name: str = "lookup") -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": '{"q": 1}'}}


OPENAI_AGENT: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {
        "role": "user",
        "name": "ana",
        "content": [
            {"type": "text", "text": "What is on this screenshot?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
            {
                "type": "image_url",
                "image_url": {"url": "https://example.com/a.png", "detail": "low"},
                "width": 800,
                "height": 600,
            },
        ],
        "pin": True,
    },
    {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2", "fetch")]},
    {"role": "tool", "tool_call_id": "c2", "content": "fetched"},
    {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "found"}]},
    {"role": "assistant", "content": "Done."},
]

CLAUDE_AGENT: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": png_b64()},
            },
            {
                "type": "image",
                "source": {"type": "url", "url": "https://x/y.jpg"},
                "width": 9,
                "height": 9,
            },
            {"type": "text", "text": "Summarise and check the weather."},
        ],
        "pin": True,
    },
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Need weather.", "signature": "sig"},
            {
                "type": "tool_use",
                "id": "t1",
                "name": "weather",
                "input": {"city": "Oslo", "width": 3},
            },
            {"type": "tool_use", "id": "t2", "name": "weather", "input": {"city": "Rome"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "3C"},
            {
                "type": "tool_result",
                "tool_use_id": "t2",
                "content": [{"type": "text", "text": "unavailable"}],
                "is_error": True,
            },
            {"type": "text", "text": "Thanks"},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "text", "text": "Oslo 3C."},
        ],
    },
]


def strip_ext(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The expected SDK form: the same input without the extension fields."""
    out = []
    for m in raw:
        m = {k: v for k, v in m.items() if k != "pin"}
        if isinstance(m.get("content"), list):
            m["content"] = [
                {k: v for k, v in p.items() if k not in ("width", "height")} for p in m["content"]
            ]
        out.append(m)
    return out


def test_openai_history_dumps_exactly_what_the_sdk_takes() -> None:
    history = oa.parse_history(OPENAI_AGENT)
    oa.check_history(history, "gpt-4o")
    dumped = oa.dump(history)
    assert dumped == strip_ext(OPENAI_AGENT)
    sdk_valid(OPENAI_MESSAGES, dumped)
    assert history[1].pin and not history[2].pin
    image = history[1].content[2]  # type: ignore[index]
    assert isinstance(image, oa.ImagePart) and (image.width, image.height) == (800, 600)


def test_claude_history_dumps_exactly_what_the_sdk_takes() -> None:
    history = an.parse_history(CLAUDE_AGENT)
    an.check_history(history, "claude-sonnet-4-5")
    dumped = an.dump(history)
    assert dumped == strip_ext(CLAUDE_AGENT)
    # tool_use input is data: an extension-like key inside it survives.
    assert dumped[1]["content"][1]["input"] == {"city": "Oslo", "width": 3}
    sdk_valid(ANTHROPIC_MESSAGES, dumped)


def test_tools_system_and_tool_choice_round_trip_to_sdk_types() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
                "strict": True,
            },
        }
    ]
    sdk_valid(OPENAI_TOOLS, [t.sdk() for t in oa.parse_tools(tools)])
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        parsed = oa.parse_tool_choice(choice)
        out = parsed if isinstance(parsed, str) else parsed.sdk()
        assert out == choice
        sdk_valid(OPENAI_TOOL_CHOICE, out)
    ctools = [
        {
            "name": "weather",
            "description": "d",
            "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    sdk_valid(ANTHROPIC_TOOLS, [t.sdk() for t in an.parse_tools(ctools)])
    choice = an.parse_tool_choice({"type": "tool", "name": "weather"}).sdk()
    sdk_valid(ANTHROPIC_TOOL_CHOICE, choice)
    system = an.parse_system(
        [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    )
    assert isinstance(system, list)
    sdk_valid(ANTHROPIC_SYSTEM, [b.sdk() for b in system])


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            r"history\[0\]\.content\[0\]\.text",
        ),
        ([{"role": "user", "content": "x", "colour": 1}], r"history\[0\]\.colour"),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
            r"history\[0\]\.content\[0\]\.type",
        ),
        ([{"role": "tool", "content": "x"}], r"history\[0\]\.tool_call_id"),
    ],
)
def test_openai_shape_errors_name_the_part(raw: Any, path: str) -> None:
    with pytest.raises(InvalidRequest, match=path):
        oa.parse_history(raw)


def openai_rule_error(raw: list[dict[str, Any]], model: str = "gpt-4o") -> str:
    with pytest.raises((InvalidRequest, RequestTooLarge)) as info:
        oa.check_history(oa.parse_history(raw), model)
    return str(info.value)


def test_openai_rules() -> None:
    assert openai_rule_error([{"role": "tool", "tool_call_id": "x", "content": "r"}]).startswith(
        "history[0].tool_call_id"
    )
    assert openai_rule_error(
        [{"role": "assistant", "tool_calls": [call("a")]}, {"role": "user", "content": "hi"}]
    ).startswith("history[0].tool_calls[0]")
    dup = [
        {"role": "assistant", "tool_calls": [call("a")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
        {"role": "assistant", "tool_calls": [call("a")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert openai_rule_error(dup).startswith("history[2].tool_calls[0].id")
    empty = [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    assert openai_rule_error(empty).startswith("history[0].content[0].text")
    image = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}
            ],
        }
    ]
    assert "does not take images" in openai_rule_error(image, "gpt-3.5-turbo")
    wrong = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + png_b64()}}
            ],
        }
    ]
    assert "declared image/jpeg" in openai_rule_error(wrong)
    garbage = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    assert openai_rule_error(garbage).startswith("history[0].content[0].image_url.url")


def claude_rule_error(raw: list[dict[str, Any]]) -> str:
    with pytest.raises((InvalidRequest, RequestTooLarge)) as info:
        an.check_history(an.parse_history(raw), "claude-sonnet-4-5")
    return str(info.value)


def test_claude_rules() -> None:
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "r"}
    assert claude_rule_error([{"role": "user", "content": [result]}]).startswith(
        "history[0].content[0].tool_use_id"
    )
    assert claude_rule_error(
        [{"role": "assistant", "content": [use]}, {"role": "user", "content": "hi"}]
    ).startswith("history[0].content[0]")
    late = [
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, result]},
    ]
    assert "must come first" in claude_rule_error(late)
    assert claude_rule_error([{"role": "user", "content": [use]}]).startswith(
        "history[0].content[0]"
    )
    assert claude_rule_error([{"role": "user", "content": ""}]).startswith("history[0].content")
    assert claude_rule_error(
        [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    ).startswith("history[0].content[0].text")
    big = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": png_b64(8001, 2),
                    },
                }
            ],
        }
    ]
    assert "8000 px" in claude_rule_error(big)
    declared = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "url", "url": "u"},
                    "width": 9000,
                    "height": 10,
                }
            ],
        }
    ]
    assert claude_rule_error(declared).startswith("history[0].content[0].source.url")
    dup = [
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [result]},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [result]},
    ]
    assert claude_rule_error(dup).startswith("history[2].content[0].id")


def test_byte_limit_is_checked_before_decoding() -> None:
    from worker.providers.rules import default_rules

    cap = default_rules().image_limits["anthropic"].max_image_bytes
    huge = "A" * ((cap // 3 + 1) * 4)
    raw = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": huge},
                }
            ],
        }
    ]
    assert "over the limit" in claude_rule_error(raw)


def test_tool_checks() -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(InvalidRequest, match=r"^tools\[1\]\.function\.name"):
        oa.check_tools(oa.parse_tools([tool, tool]), None)
    named = oa.parse_tool_choice({"type": "function", "function": {"name": "g"}})
    with pytest.raises(InvalidRequest, match=r"^tool_choice\.function\.name"):
        oa.check_tools(oa.parse_tools([tool]), named)
    with pytest.raises(InvalidRequest, match="'required' needs"):
        oa.check_tools([], "required")
    oa.check_tools(oa.parse_tools([tool]), "required")
    ctool = {"name": "w", "input_schema": {"type": "object"}}
    with pytest.raises(InvalidRequest, match=r"^tools\[1\]\.name"):
        an.check_tools(an.parse_tools([ctool, ctool]), None)
    with pytest.raises(InvalidRequest, match=r"^tool_choice\.name"):
        an.check_tools(an.parse_tools([ctool]), an.parse_tool_choice({"type": "tool", "name": "x"}))
    with pytest.raises(InvalidRequest, match=r"^tool_choice\.name"):
        an.check_tools(an.parse_tools([ctool]), an.parse_tool_choice({"type": "auto", "name": "w"}))
    an.check_tools(an.parse_tools([ctool]), an.parse_tool_choice({"type": "tool", "name": "w"}))


def test_image_count_and_request_byte_limits() -> None:
    from worker.providers.base import ImageCheck
    from worker.providers.rules import default_rules

    rules = default_rules()
    limits = rules.image_limits["anthropic"]
    tight = rules.model_copy(
        update={
            "image_limits": {
                **rules.image_limits,
                "anthropic": limits.model_copy(
                    update={"max_images": 2, "max_request_image_bytes": 10**9}
                ),
            }
        }
    )
    img = {"type": "image", "source": {"type": "url", "url": "u"}}
    an.check_history(
        an.parse_history([{"role": "user", "content": [img, img]}]),
        "claude-sonnet-4-5",
        rules=tight,
    )
    with pytest.raises(RequestTooLarge, match=r"^history\[0\]\.content\[2\].*over 2 images"):
        an.check_history(
            an.parse_history([{"role": "user", "content": [img, img, img]}]),
            "claude-sonnet-4-5",
            rules=tight,
        )
    data = png_b64(8, 8)
    size = len(base64.b64decode(data))
    small = rules.model_copy(
        update={
            "image_limits": {
                **rules.image_limits,
                "anthropic": limits.model_copy(update={"max_request_image_bytes": 2 * size}),
            }
        }
    )
    b64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    check = ImageCheck("anthropic", "claude-sonnet-4-5", small)
    an.check_history(
        an.parse_history([{"role": "user", "content": [b64, b64]}]),
        "claude-sonnet-4-5",
        rules=small,
        images=check,
    )
    assert check.sizes["history[0].content[1].source.data"].width == 8
    with pytest.raises(RequestTooLarge, match=r"^history\[0\]\.content\[2\].*together"):
        an.check_history(
            an.parse_history([{"role": "user", "content": [b64, b64, b64]}]),
            "claude-sonnet-4-5",
            rules=small,
        )
