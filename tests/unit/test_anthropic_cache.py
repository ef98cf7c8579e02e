"""Breakpoint placement against Anthropic's caching rules (PAYLOADS.md §2.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.providers.anthropic_cache import (
    Block,
    cache_control,
    expected_cache_tokens,
    place_breakpoints,
)


def conversation(
    messages: int, tokens: int = 300, system: int = 2_000, tools: int = 0
) -> list[Block]:
    out = [Block("tools", 400) for _ in range(tools)]
    out.append(Block("system", system))
    out += [Block("messages", tokens) for _ in range(messages)]
    return out


def where(blocks: list[Block], **kw: object) -> list[tuple[int, str]]:
    placed = place_breakpoints(blocks, **kw)  # type: ignore[arg-type]
    return [(b.index, b.why) for b in placed.breakpoints]


def test_history_and_system_on_the_stable_prefix() -> None:
    blocks = conversation(9)  # system, 8 history messages, the final user message
    assert where(blocks, stable_blocks=9, min_tokens=1024) == [(0, "system"), (8, "history")]


def test_tools_get_their_own_entry_before_system() -> None:
    blocks = conversation(5, tools=3)
    assert where(blocks, stable_blocks=8, min_tokens=1024) == [
        (2, "tools"),
        (3, "system"),
        (7, "history"),
    ]


def test_below_the_minimum_nothing_is_marked() -> None:
    # Haiku 4.5 caches from 4,096 tokens: a 2,000-token system prompt is not worth a slot,
    # the history breakpoint (2,000 + 8 x 300 = 4,400 tokens) is
    blocks = conversation(9)
    placed = place_breakpoints(blocks, stable_blocks=9, min_tokens=4096)
    assert [(b.index, b.why) for b in placed.breakpoints] == [(8, "history")]
    assert placed.skipped == ("system",)
    short = place_breakpoints(conversation(2), stable_blocks=2, min_tokens=4096)
    assert short.breakpoints == ()


def test_bridge_when_the_previous_entry_is_out_of_lookback() -> None:
    # The previous turn's history breakpoint sat at block 10; this turn's is at 35:
    # 25 blocks back, past the 20-block lookback, so a breakpoint repeats block 10.
    blocks = conversation(36, tokens=100, system=1_200)
    got = where(blocks, stable_blocks=36, previous_blocks=11, min_tokens=1024)
    assert got == [(0, "system"), (10, "bridge"), (35, "history")]
    near = where(blocks, stable_blocks=36, previous_blocks=20, min_tokens=1024)
    assert near == [(0, "system"), (35, "history")]  # 16 blocks back: within reach


def test_never_more_than_four() -> None:
    blocks = conversation(39, tools=3, tokens=100, system=1_200)  # tools alone: 1,200
    placed = place_breakpoints(
        blocks, stable_blocks=43, previous_blocks=5, min_tokens=1024, max_breakpoints=3
    )
    assert [b.why for b in placed.breakpoints] == ["system", "bridge", "history"]
    assert placed.skipped == ("tools",)
    full = place_breakpoints(blocks, stable_blocks=43, previous_blocks=5, min_tokens=1024)
    assert len(full.breakpoints) == 4


def test_requests_own_breakpoints_are_left_alone() -> None:
    blocks = conversation(6)
    blocks[3] = Block("messages", 300, breakpoint_ttl="1h")
    placed = place_breakpoints(blocks, stable_blocks=6, min_tokens=1024)
    assert placed.placed_by == "request"
    assert [(b.index, b.ttl, b.why) for b in placed.breakpoints] == [(3, "1h", "request")]


def test_ttl_default_and_setting() -> None:
    blocks = conversation(6)
    assert {
        b.ttl for b in place_breakpoints(blocks, stable_blocks=6, min_tokens=1).breakpoints
    } == {"5m"}
    hour = place_breakpoints(blocks, stable_blocks=6, min_tokens=1, ttl="1h")
    assert {b.ttl for b in hour.breakpoints} == {"1h"}
    assert cache_control("5m") == {"type": "ephemeral"}
    assert cache_control("1h") == {"type": "ephemeral", "ttl": "1h"}


def test_thinking_blocks_cannot_carry_the_mark() -> None:
    blocks = conversation(6)
    blocks[5] = Block("messages", 300, cacheable=False)  # the last stable block is thinking
    assert where(blocks, stable_blocks=6, min_tokens=1024)[-1] == (4, "history")


def test_out_of_order_sections_are_refused() -> None:
    with pytest.raises(ValueError, match="tools, then system"):
        place_breakpoints([Block("system", 10), Block("tools", 10)], stable_blocks=2, min_tokens=1)


def test_expected_reads_and_writes() -> None:
    # previous turn: system (2,000) + 6 history messages; this turn adds 2 more
    blocks = conversation(9)
    placed = place_breakpoints(blocks, stable_blocks=9, previous_blocks=7, min_tokens=1024)
    read, written = expected_cache_tokens(blocks, placed, previous_blocks=7, min_tokens=1024)
    assert (read, written) == (2_000 + 6 * 300, 2 * 300)
    # the cut moved: only system and tools repeat
    read, written = expected_cache_tokens(blocks, placed, previous_blocks=1, min_tokens=1024)
    assert (read, written) == (2_000, 8 * 300)


SECTIONS = st.sampled_from(["tools", "system", "messages"])


@given(
    spec=st.lists(
        st.tuples(SECTIONS, st.integers(0, 3_000), st.booleans()), min_size=1, max_size=80
    ),
    data=st.data(),
)
def test_placement_invariants(spec: list[tuple[str, int, bool]], data: st.DataObject) -> None:
    spec.sort(key=lambda s: ["tools", "system", "messages"].index(s[0]))
    blocks = [Block(sec, tok, cacheable=ok) for sec, tok, ok in spec]  # type: ignore[arg-type]
    stable = data.draw(st.integers(0, len(blocks)))
    previous = data.draw(st.none() | st.integers(0, stable))
    min_tokens = data.draw(st.integers(0, 8_000))
    placed = place_breakpoints(
        blocks, stable_blocks=stable, previous_blocks=previous, min_tokens=min_tokens
    )
    idx = [b.index for b in placed.breakpoints]
    assert len(idx) <= 4 and idx == sorted(set(idx))
    total = 0
    cum = [total := total + b.tokens for b in blocks]
    for b in placed.breakpoints:
        assert b.index < stable and blocks[b.index].cacheable
        assert b.prefix_tokens == cum[b.index] >= min_tokens
