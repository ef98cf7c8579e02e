"""Random agent transcripts: SDK-valid dumps, conversion both ways, whole-unit trimming."""

from __future__ import annotations

import base64
import io
import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.support.sdk_types import ANTHROPIC_MESSAGES, ANTHROPIC_SYSTEM, OPENAI_MESSAGES, sdk_valid
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.convert import anthropic_to_openai, openai_to_anthropic
from worker.providers.grouping import anthropic_units, openai_units


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNGS = [_png(3, 5), _png(40, 20)]
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
args = st.dictionaries(st.sampled_from(["q", "n", "city"]), st.integers() | text, max_size=3)


@st.composite
def openai_transcripts(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if draw(st.booleans()):
        out.append({"role": "system", "content": draw(text)})
    ids = iter(f"call_{k}" for k in range(1000))
    for _ in range(draw(st.integers(1, 6))):
        user: dict[str, Any] = {"role": "user", "pin": draw(st.booleans())}
        if draw(st.booleans()):
            user["content"] = draw(text)
        else:
            parts: list[dict[str, Any]] = [{"type": "text", "text": draw(text)}]
            if draw(st.booleans()):
                url = "data:image/png;base64," + draw(st.sampled_from(PNGS))
                parts.append({"type": "image_url", "image_url": {"url": url}})
            if draw(st.booleans()):
                parts.append(
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x.test/a.png"},
                        "width": 640,
                        "height": 480,
                    }
                )
            user["content"] = draw(st.permutations(parts))
        out.append(user)
        for _ in range(draw(st.integers(0, 3))):  # tool rounds
            calls = [
                {
                    "id": next(ids),
                    "type": "function",
                    "function": {
                        "name": draw(st.sampled_from(["f", "g"])),
                        "arguments": json.dumps(draw(args)),
                    },
                }
                for _ in range(draw(st.integers(1, 3)))
            ]
            content = draw(
                st.none()
                | text
                | st.lists(text, min_size=1, max_size=2).map(
                    lambda ts: [{"type": "text", "text": t} for t in ts]
                )
            )
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
            for c in draw(st.permutations(calls)):
                body = draw(
                    text
                    | st.lists(text, min_size=1, max_size=2).map(
                        lambda ts: [{"type": "text", "text": t} for t in ts]
                    )
                )
                out.append({"role": "tool", "tool_call_id": c["id"], "content": body})
        # A user turn may follow tool results directly (merged into their turn for Claude).
        if out[-1]["role"] == "user" or draw(st.booleans()):
            out.append({"role": "assistant", "content": draw(text), "pin": draw(st.booleans())})
    return out


@st.composite
def claude_transcripts(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ids = iter(f"toolu_{k}" for k in range(1000))
    pending: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        blocks: list[dict[str, Any]] = [
            {
                "type": "tool_result",
                "tool_use_id": i,
                "content": draw(text | st.just([{"type": "text", "text": "ok"}])),
            }
            for i in pending
        ]
        extra: list[dict[str, Any]] = []
        if not pending or draw(st.booleans()):
            extra.append({"type": "text", "text": draw(text)})
        if draw(st.booleans()):
            source = {
                "type": "base64",
                "media_type": "image/png",
                "data": draw(st.sampled_from(PNGS)),
            }
            extra.append({"type": "image", "source": source})
        if draw(st.booleans()):
            extra.append(
                {
                    "type": "image",
                    "source": {"type": "url", "url": "https://x.test/b.jpg"},
                    "width": 100,
                    "height": 50,
                }
            )
        blocks += draw(st.permutations(extra))
        if not pending and len(blocks) == 1 and blocks[0]["type"] == "text" and draw(st.booleans()):
            out.append({"role": "user", "content": blocks[0]["text"], "pin": draw(st.booleans())})
        else:
            out.append({"role": "user", "content": blocks, "pin": draw(st.booleans())})
        reply: list[dict[str, Any]] = (
            [{"type": "text", "text": draw(text)}] if draw(st.booleans()) else []
        )
        pending = [next(ids) for _ in range(draw(st.integers(0 if reply else 1, 3)))]
        reply += [{"type": "tool_use", "id": i, "name": "f", "input": draw(args)} for i in pending]
        out.append({"role": "assistant", "content": reply})
    if pending:
        out.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": i, "content": "done"} for i in pending
                ],
            }
        )
    return out


def norm_openai(dumped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in dumped:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = [{"type": "text", "text": m["content"]}]
        out.append(m)
    return out


norm_claude = norm_openai  # the same rule: a string content is one text block


@given(openai_transcripts())
def test_openai_transcripts_are_valid_and_sdk_exact(raw: list[dict[str, Any]]) -> None:
    history = oa.parse_history(raw)
    oa.check_history(history, "gpt-4o")
    sdk_valid(OPENAI_MESSAGES, oa.dump(history))


@given(openai_transcripts())
def test_openai_to_claude_and_back(raw: list[dict[str, Any]]) -> None:
    history = oa.parse_history(raw)
    system, claude = openai_to_anthropic(history)
    dumped = an.dump(claude)
    sdk_valid(ANTHROPIC_MESSAGES, dumped)
    if system:
        sdk_valid(ANTHROPIC_SYSTEM, [b.sdk() for b in system])
    an.check_history(an.parse_history(dumped), "claude-sonnet-4-5")
    assert all(a.role != b.role for a, b in itertools.pairwise(claude))
    back = anthropic_to_openai(claude, system)
    sdk_valid(OPENAI_MESSAGES, oa.dump(back))
    assert norm_openai(oa.dump(back)) == norm_openai(oa.dump(history))
    for before, after in zip(history, back, strict=True):
        assert after.pin >= before.pin  # a pin is never lost


@given(claude_transcripts())
def test_claude_to_openai_and_back(raw: list[dict[str, Any]]) -> None:
    history = an.parse_history(raw)
    an.check_history(history, "claude-sonnet-4-5")
    sdk_valid(ANTHROPIC_MESSAGES, an.dump(history))
    openai = anthropic_to_openai(history)
    sdk_valid(OPENAI_MESSAGES, oa.dump(openai))
    oa.check_history(openai, "gpt-4o")
    system, back = openai_to_anthropic(openai)
    assert system is None
    assert norm_claude(an.dump(back)) == norm_claude(an.dump(history))
    assert [m.pin for m in back] == [m.pin for m in history]


def _flatten(units: list[Any], messages: list[Any]) -> list[Any]:
    return [messages[i] for u in units for i in u.indices]


@given(openai_transcripts())
def test_openai_units_never_leave_an_orphan(raw: list[dict[str, Any]]) -> None:
    history = oa.parse_history(raw)
    units = openai_units(history)
    assert [i for u in units for i in u.indices] == list(range(len(history)))
    for k in range(len(units) + 1):
        oa.check_history(_flatten(units[k:], history), "gpt-4o")
    for u in units:  # each tool message sits in the unit of the call it answers
        calls = {c.id for i in u.indices for c in (getattr(history[i], "tool_calls", None) or [])}
        assert all(
            history[i].tool_call_id in calls
            for i in u.indices
            if isinstance(history[i], oa.ToolMessage)
        )


@given(claude_transcripts())
def test_claude_units_never_leave_an_orphan(raw: list[dict[str, Any]]) -> None:
    history = an.parse_history(raw)
    units = anthropic_units(history)
    assert [i for u in units for i in u.indices] == list(range(len(history)))
    for k in range(len(units) + 1):
        an.check_history(_flatten(units[k:], history), "claude-sonnet-4-5")
    for u in units:
        assert any(history[i].pin for i in u.indices) == u.pinned
