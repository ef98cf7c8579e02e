"""Breakpoints written into native Claude payloads: SDK-valid, where placed, nothing else
changed, and a request's own marks left alone."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support.sdk_types import ANTHROPIC_MESSAGES, ANTHROPIC_SYSTEM, ANTHROPIC_TOOLS, sdk_valid
from worker.providers.anthropic_cache import (
    MAX_BREAKPOINTS,
    Block,
    mark_payload,
    payload_blocks,
    place_breakpoints,
)

TEXT = st.text(alphabet="abc xyz", min_size=1, max_size=12)
BLOCKS = st.lists(TEXT.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3)
CONTENT = st.one_of(TEXT, BLOCKS)
TOOL = st.builds(
    lambda n: {"name": f"tool_{n}", "input_schema": {"type": "object"}}, st.integers(0, 99)
)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]] | None]:
    system = draw(st.one_of(st.none(), TEXT, BLOCKS))
    n = draw(st.integers(1, 30))
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": draw(CONTENT)} for i in range(n)
    ]
    tools = draw(st.one_of(st.none(), st.lists(TOOL, min_size=1, max_size=3)))
    return system, messages, tools


def marks(system: Any, messages: list[dict[str, Any]], tools: Any) -> list[tuple[str, int, int]]:
    out = [("tools", i, 0) for i, t in enumerate(tools or []) if "cache_control" in t]
    out += [("system", i, 0) for i, b in enumerate(system or []) if "cache_control" in b]
    for i, m in enumerate(messages):
        out += [("messages", i, j) for j, b in enumerate(m["content"]) if "cache_control" in b]
    return out


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


@given(payload=payloads(), sizes=st.data(), ttl=st.sampled_from(["5m", "1h"]))
def test_marked_payloads_are_what_the_sdk_takes(
    payload: Any, sizes: st.DataObject, ttl: str
) -> None:
    system, messages, tools = payload
    where = payload_blocks(system, messages, tools)
    blocks = [Block(s, sizes.draw(st.integers(0, 900))) for s, _, _, _ in where]
    stable = sizes.draw(st.integers(0, len(blocks)))
    placed = place_breakpoints(blocks, stable_blocks=stable, min_tokens=1024, ttl=ttl)  # type: ignore[arg-type]
    new_system, new_messages, new_tools = mark_payload(system, messages, placed, tools)
    sdk_valid(ANTHROPIC_MESSAGES, new_messages)
    if new_system is not None:
        sdk_valid(ANTHROPIC_SYSTEM, new_system)
    if new_tools is not None:
        sdk_valid(ANTHROPIC_TOOLS, new_tools)
    got = marks(new_system, new_messages, new_tools)
    assert got == [where[b.index][:3] for b in placed.breakpoints]
    assert len(got) <= MAX_BREAKPOINTS
    # nothing but the marks changed: string content became one text block
    as_blocks = [
        {**m, "content": [{"type": "text", "text": m["content"]}]}
        if isinstance(m["content"], str)
        else m
        for m in messages
    ]
    assert strip(new_messages) == as_blocks
    if isinstance(system, str):
        assert strip(new_system) == [{"type": "text", "text": system}]
    else:
        assert strip(new_system) == system
    assert strip(new_tools) == tools


@given(payload=payloads(), pick=st.data())
def test_a_request_that_placed_its_own_marks_keeps_exactly_them(
    payload: Any, pick: st.DataObject
) -> None:
    system, messages, tools = payload
    i = pick.draw(st.integers(0, len(messages) - 1))
    content = messages[i]["content"]
    block = {"type": "text", "text": content} if isinstance(content, str) else dict(content[-1])
    block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    messages[i] = {**messages[i], "content": [block]}
    where = payload_blocks(system, messages, tools)
    assert [w[3] for w in where].count("1h") == 1
    blocks = [Block(s, 2_000, breakpoint_ttl=own) for s, _, _, own in where]
    placed = place_breakpoints(blocks, stable_blocks=len(blocks), min_tokens=1024)
    assert placed.placed_by == "request"
    _, new_messages, _ = mark_payload(system, messages, placed, tools)
    assert new_messages[i]["content"] == [block]
    assert marks(None, new_messages, None) == [("messages", i, 0)]
