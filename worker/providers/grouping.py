"""Units of a native history that are kept or dropped together when fitting.

Dropping half of a tool exchange makes the API refuse the request ("messages with role
'tool' must be a response to a preceding message with 'tool_calls'"), so the fitter trims
whole units: an OpenAI assistant `tool_calls` message with every `tool` message answering it
(parallel calls too); for Claude, a run of assistant turns (thinking stays with the
`tool_use` it precedes) with the user turn carrying its `tool_result` blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.values import value


@value
class Unit:
    """Indices into the history, contiguous and in order; `pinned` if any message is."""

    indices: tuple[int, ...]
    pinned: bool


def openai_units(messages: Sequence[oa.Message]) -> list[Unit]:
    """Every message alone, except an assistant message with `tool_calls` and the run of
    `tool` messages after it that answer its calls."""
    units: list[Unit] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        end = i + 1
        if isinstance(msg, oa.AssistantMessage) and msg.tool_calls:
            ids = {c.id for c in msg.tool_calls}
            while end < len(messages):
                nxt = messages[end]
                if not (isinstance(nxt, oa.ToolMessage) and nxt.tool_call_id in ids):
                    break
                end += 1
        units.append(_unit(messages, i, end))
        i = end
    return units


def anthropic_units(messages: Sequence[an.Message]) -> list[Unit]:
    """A run of consecutive same-role turns is one unit (the API merges them into one turn);
    an assistant run whose last turn uses tools also takes the user turn after it when that
    turn carries the results."""
    units: list[Unit] = []
    i = 0
    while i < len(messages):
        end = i + 1
        while end < len(messages) and messages[end].role == messages[i].role:
            end += 1
        if messages[i].role == "assistant" and end < len(messages):
            uses = {b.id for b in an.blocks(messages[end - 1]) if isinstance(b, an.ToolUseBlock)}
            results = {
                b.tool_use_id for b in an.blocks(messages[end]) if isinstance(b, an.ToolResultBlock)
            }
            if uses & results:
                end += 1
        units.append(_unit(messages, i, end))
        i = end
    return units


def _unit(messages: Sequence[oa.Message] | Sequence[an.Message], start: int, end: int) -> Unit:
    if end == start + 1:  # most messages are a unit alone
        return Unit((start,), messages[start].pin)
    return Unit(tuple(range(start, end)), any(messages[k].pin for k in range(start, end)))
