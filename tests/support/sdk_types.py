"""Validate payloads against the providers' own SDK request types.

The SDK types are TypedDicts with lazy `Iterable` fields; the adapters forbid unknown keys
(so an extension field leaking into an output fails) and `materialize` walks every iterable
so each nested part is really validated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import anthropic.types as at
import openai.types.chat as ot
from pydantic import ConfigDict, TypeAdapter

_FORBID = ConfigDict(extra="forbid")

OPENAI_MESSAGES: TypeAdapter[Any] = TypeAdapter(list[ot.ChatCompletionMessageParam], config=_FORBID)
OPENAI_TOOLS: TypeAdapter[Any] = TypeAdapter(list[ot.ChatCompletionToolParam], config=_FORBID)
OPENAI_TOOL_CHOICE: TypeAdapter[Any] = TypeAdapter(
    ot.ChatCompletionToolChoiceOptionParam, config=_FORBID
)
ANTHROPIC_MESSAGES: TypeAdapter[Any] = TypeAdapter(list[at.MessageParam], config=_FORBID)
ANTHROPIC_SYSTEM: TypeAdapter[Any] = TypeAdapter(str | list[at.TextBlockParam], config=_FORBID)
ANTHROPIC_TOOLS: TypeAdapter[Any] = TypeAdapter(list[at.ToolParam], config=_FORBID)
ANTHROPIC_TOOL_CHOICE: TypeAdapter[Any] = TypeAdapter(at.ToolChoiceParam, config=_FORBID)


def materialize(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, Iterable):
        return [materialize(v) for v in value]
    return value


def sdk_valid(adapter: TypeAdapter[Any], value: Any) -> None:
    """Raise unless `value` validates as the SDK type and nothing in it was dropped."""
    checked = materialize(adapter.validate_python(value))
    assert checked == value, "the SDK type dropped or changed a field"
