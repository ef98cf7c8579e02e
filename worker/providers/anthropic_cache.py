"""Where to put Anthropic `cache_control` breakpoints on a payload's stable prefix.

Rules (PAYLOADS.md §2.4, Anthropic's prompt-caching page): at most 4 breakpoints; the
prefix runs tools, then system, then messages, and a breakpoint caches everything before
it; a read is found only at an entry within the 20 blocks before a breakpoint; a prefix
shorter than the model's minimum is silently not cached; thinking blocks and empty text
cannot carry `cache_control`; a write lives 5 minutes by default, 1 hour with `ttl: "1h"`.

Placement, most valuable first while slots remain:
1. `history`: the last block expected to recur next turn (end of the stable prefix), so
   the next turn reads all of it;
2. `bridge`: where the previous turn put its `history` breakpoint, when that is out of
   reach of (1) (a turn added 20 blocks or more), so this turn still reads it;
3. `system`: the end of tools and system, which survives a history cut;
4. `tools`: the end of tools, which survives a system prompt change.
If the request placed any breakpoint itself, it is left exactly as it is and none is added.
Pure: works on block token counts, no payload, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any, Literal

from worker.values import value

CacheTTL = Literal["5m", "1h"]
Section = Literal["tools", "system", "messages"]
Why = Literal["history", "bridge", "system", "tools", "request"]

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
_ORDER: dict[Section, int] = {"tools": 0, "system": 1, "messages": 2}


@value
class Block:
    """One content block as sent (a tool definition, a system text block, a message's
    content block), in payload order."""

    section: Section
    tokens: int
    cacheable: bool = True
    """False for thinking blocks and empty text, which cannot carry `cache_control`."""
    breakpoint_ttl: CacheTTL | None = None
    """The TTL of a breakpoint the request itself put on this block; None: none there."""


@value
class Breakpoint:
    index: int
    """Block index carrying `cache_control`."""
    ttl: CacheTTL
    why: Why
    prefix_tokens: int
    """Tokens cached by it: everything up to and including its block."""


@value
class Placement:
    breakpoints: tuple[Breakpoint, ...]
    """In payload order."""
    placed_by: Literal["tokenheap", "request"]
    skipped: tuple[Why, ...] = ()
    """Breakpoints worth placing that were not: below the minimum length or out of slots."""


def cache_control(ttl: CacheTTL) -> dict[str, str]:
    """The `cache_control` value for a breakpoint (5 minutes is the API's default)."""
    return {"type": "ephemeral"} if ttl == "5m" else {"type": "ephemeral", "ttl": "1h"}


def place_breakpoints(
    blocks: Sequence[Block],
    *,
    stable_blocks: int,
    min_tokens: int,
    previous_blocks: int | None = None,
    ttl: CacheTTL = "5m",
    max_breakpoints: int = MAX_BREAKPOINTS,
    lookback: int = LOOKBACK_BLOCKS,
) -> Placement:
    """Breakpoints for `blocks`, whose first `stable_blocks` are expected to recur in the
    next turn and whose first `previous_blocks` (when known) repeat the previous turn's.

    >>> blocks = [Block("system", 1500), *[Block("messages", 300)] * 6, Block("messages", 900)]
    >>> [(b.index, b.why) for b in place_breakpoints(blocks, stable_blocks=7,
    ...                                               min_tokens=1024).breakpoints]
    [(0, 'system'), (6, 'history')]
    """
    _check_order(blocks)
    if not 0 <= stable_blocks <= len(blocks):
        raise ValueError(f"stable_blocks must be within the {len(blocks)} blocks")
    cum = list(accumulate(b.tokens for b in blocks))
    own = [i for i, b in enumerate(blocks) if b.breakpoint_ttl is not None]
    if own:
        placed = tuple(
            Breakpoint(i, blocks[i].breakpoint_ttl or "5m", "request", cum[i]) for i in own
        )
        return Placement(placed, "request")

    def last_cacheable(end: int) -> int | None:
        """The last block before `end` that can carry cache_control."""
        return next((i for i in range(end - 1, -1, -1) if blocks[i].cacheable), None)

    head = sum(1 for b in blocks if b.section != "messages")
    tools = sum(1 for b in blocks if b.section == "tools")
    history = last_cacheable(stable_blocks)
    wanted: list[tuple[Why, int | None]] = [("history", history)]
    if previous_blocks is not None:
        prev = last_cacheable(min(previous_blocks, stable_blocks))
        if history is not None and prev is not None and history - prev >= lookback:
            wanted.append(("bridge", prev))
    wanted.append(("system", last_cacheable(min(head, stable_blocks))))
    if tools < head:  # a separate tools entry only pays when a system section follows
        wanted.append(("tools", last_cacheable(min(tools, stable_blocks))))

    chosen: dict[int, Why] = {}
    skipped: list[Why] = []
    for why, index in wanted:
        if index is None or index in chosen:
            continue
        if cum[index] < min_tokens or len(chosen) >= max_breakpoints:
            skipped.append(why)
        else:
            chosen[index] = why
    placed = tuple(Breakpoint(i, ttl, chosen[i], cum[i]) for i in sorted(chosen))
    return Placement(placed, "tokenheap", tuple(skipped))


def expected_cache_tokens(
    blocks: Sequence[Block],
    placement: Placement,
    *,
    previous_blocks: int,
    min_tokens: int,
    lookback: int = LOOKBACK_BLOCKS,
) -> tuple[int, int]:
    """(read, written) tokens of this placement, if the previous turn sent the same first
    `previous_blocks` blocks within the TTL and placed its breakpoints by the same rules
    (or, when the request places its own, at the same blocks).

    A read is the longest previous entry within `lookback` blocks before one of this
    turn's breakpoints; everything after it up to the last breakpoint is written.
    """
    if not placement.breakpoints:
        return 0, 0
    if placement.placed_by == "request":
        old: Sequence[Breakpoint] = [b for b in placement.breakpoints if b.index < previous_blocks]
    else:
        shared = blocks[:previous_blocks]
        old = place_breakpoints(
            shared, stable_blocks=len(shared), min_tokens=min_tokens, lookback=lookback
        ).breakpoints
    read = 0
    for entry in old:
        if any(0 <= bp.index - entry.index < lookback for bp in placement.breakpoints):
            read = max(read, entry.prefix_tokens)
    return read, max(0, placement.breakpoints[-1].prefix_tokens - read)


System = str | Sequence[Mapping[str, Any]] | None
"""The `system` parameter: a string or text blocks (None: absent)."""


def payload_blocks(
    system: System,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[Section, int, int, CacheTTL | None]]:
    """The cacheable blocks of a payload in prefix order, as (section, item, block, own):
    `item` indexes the section (tool, system block, message), `block` a message's content
    block (0 for string content), `own` the TTL of a `cache_control` already there."""
    out: list[tuple[Section, int, int, CacheTTL | None]] = []
    for i, tool in enumerate(tools or ()):
        out.append(("tools", i, 0, _ttl(tool)))
    if isinstance(system, str):
        if system:
            out.append(("system", 0, 0, None))
    elif system is not None:
        for i, block in enumerate(system):
            out.append(("system", i, 0, _ttl(block)))
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            out.append(("messages", i, 0, None))
        else:
            for j, block in enumerate(content or ()):
                out.append(("messages", i, j, _ttl(block)))
    return out


def mark_payload(
    system: System,
    messages: Sequence[Mapping[str, Any]],
    placement: Placement,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Copies of (system, messages, tools) with `cache_control` on the placement's blocks
    (block indices as `payload_blocks` enumerates them); string content becomes one text
    block so it can carry the mark. A request's own placement is returned unchanged."""
    where = payload_blocks(system, messages, tools)
    marks = {
        (where[b.index][0], where[b.index][1], where[b.index][2]): b.ttl
        for b in placement.breakpoints
        if placement.placed_by == "tokenheap"
    }

    def block(section: Section, i: int, j: int, value: Any) -> dict[str, Any]:
        out = {"type": "text", "text": value} if isinstance(value, str) else dict(value)
        ttl = marks.get((section, i, j))
        if ttl is not None:
            out["cache_control"] = cache_control(ttl)
        return out

    new_tools = None if tools is None else [block("tools", i, 0, t) for i, t in enumerate(tools)]
    new_system: list[dict[str, Any]] | None = None
    if isinstance(system, str):
        new_system = [block("system", 0, 0, system)] if system else None
    elif system is not None:
        new_system = [block("system", i, 0, b) for i, b in enumerate(system)]
    new_messages: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        parts = [content] if isinstance(content, str) else list(content or ())
        new_messages.append(
            {**message, "content": [block("messages", i, j, c) for j, c in enumerate(parts)]}
        )
    return new_system, new_messages, new_tools


def _ttl(block: Mapping[str, Any]) -> CacheTTL | None:
    mark = block.get("cache_control")
    if not isinstance(mark, Mapping):
        return None
    return "1h" if mark.get("ttl") == "1h" else "5m"


def _check_order(blocks: Sequence[Block]) -> None:
    ranks = [_ORDER[b.section] for b in blocks]
    if ranks != sorted(ranks):
        raise ValueError("blocks must come as tools, then system, then messages")
    if any(b.tokens < 0 for b in blocks):
        raise ValueError("block token counts cannot be negative")
