"""Tokens of OpenAI tool definitions, assistant `tool_calls` and `tool` messages.

Definitions follow the cookbook's `num_tokens_for_tools`, the one rule OpenAI verified against
its API, and only for flat properties on four models. Everything outside that (nested objects,
arrays, other families, calls and results) is counted by the nearest stated rule, and every
such step is named in the returned reasons so a result can say `exact: false` and why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tiktoken

from worker.providers.rules import PayloadRules, ToolFamily, default_rules

Counter = Callable[[str], int]
EncodingLike = tiktoken.Encoding | Counter


def as_counter(encoding: EncodingLike) -> Counter:
    """A text -> token count callable; special-token text counts as plain text."""
    if isinstance(encoding, tiktoken.Encoding):
        enc = encoding
        return lambda text: len(enc.encode(text, disallowed_special=()))
    return encoding


def tool_family(
    model: str, encoding_name: str | None, rules: PayloadRules | None = None
) -> tuple[ToolFamily, list[str]]:
    """The cookbook family of `model` (name or dated snapshot), else the nearest by encoding."""
    table = (rules or default_rules()).tool_rules.definitions
    for name, family in table.families.items():
        if re.fullmatch(re.escape(name) + r"(-\d[\d-]*)?", model):
            return family, []
    nearest = table.nearest_by_encoding.get(encoding_name or "o200k_base")
    if nearest is None:
        nearest = next(iter(table.nearest_by_encoding.values()))
    return table.families[nearest], [f"tools: no cookbook constants for {model}, {nearest}'s used"]


def count_tool_definitions(
    tools: Sequence[Mapping[str, Any]],
    model: str,
    encoding: EncodingLike,
    rules: PayloadRules | None = None,
    *,
    encoding_name: str | None = None,
) -> tuple[int, list[str]]:
    """(tokens, inexact reasons) of a Chat Completions `tools` list; 0 for no tools.

    `encoding_name` picks the nearest family when `encoding` is a plain counting function.

    The cookbook adds these tokens to its message count; the caller adds them to its framing.
    """
    if not tools:
        return 0, []
    name = encoding.name if isinstance(encoding, tiktoken.Encoding) else encoding_name
    family, reasons = tool_family(model, name, rules)
    count = as_counter(encoding)
    seen: set[str] = set(reasons)
    total = 0
    for tool in tools:
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, Mapping):
            seen.add("tools: non-function tool counted as its JSON text")
            total += family.func_init + count(json.dumps(tool))
            continue
        total += family.func_init
        if "description" not in function:
            seen.add("tools: function without description")
        desc = str(function.get("description") or "")
        total += count(str(function["name"]) + ":" + desc.removesuffix("."))
        params = function.get("parameters") or {}
        if params.get("strict") or function.get("strict") or "additionalProperties" in params:
            seen.add("tools: strict / additionalProperties not in the cookbook rule")
        total += _properties(params.get("properties") or {}, family, count, seen)
    total += family.func_end
    return total, sorted(seen)


def _properties(
    props: Mapping[str, Any], family: ToolFamily, count: Counter, seen: set[str]
) -> int:
    """The cookbook's property lines; nested objects apply the same rule one level down."""
    if not props:
        return 0
    total = family.prop_init
    for key, spec in props.items():
        spec = spec if isinstance(spec, Mapping) else {}
        total += family.prop_key
        p_type = spec.get("type", "")
        if isinstance(p_type, list):
            seen.add("tools: union types counted as their JSON text")
            p_type = json.dumps(p_type)
        if "description" not in spec:
            seen.add("tools: property without description")
        if "enum" in spec:
            total += family.enum_init
            for item in spec["enum"]:
                if not isinstance(item, str):
                    seen.add("tools: non-string enum item")
                total += family.enum_item + count(str(item))
        desc = str(spec.get("description", "")).removesuffix(".")
        total += count(f"{key}:{p_type}:{desc}")
        if p_type == "object" and spec.get("properties"):
            seen.add("tools: nested object parameters (cookbook rule applied per level)")
            total += _properties(spec["properties"], family, count, seen)
        if p_type == "array" and "items" in spec:
            seen.add("tools: array items counted as their JSON schema text")
            total += count(json.dumps(spec["items"]))
    return total


def count_tool_calls(
    tool_calls: Sequence[Mapping[str, Any]],
    encoding: EncodingLike,
    rules: PayloadRules | None = None,
) -> tuple[int, list[str]]:
    """Tokens of an assistant message's `tool_calls`, beyond the message framing.

    Recipe (config `tool_rules.tool_calls`): per call, the overhead + name + arguments.
    """
    if not tool_calls:
        return 0, []
    rule = (rules or default_rules()).tool_rules.tool_calls
    count = as_counter(encoding)
    total = 0
    for call in tool_calls:
        function = call["function"]
        total += rule.per_call + count(function["name"]) + count(function["arguments"])
    return total, ["tool_calls: undocumented framing"]


def count_tool_message(
    message: Mapping[str, Any], encoding: EncodingLike, rules: PayloadRules | None = None
) -> tuple[int, list[str]]:
    """Tokens of a `tool` message's `tool_call_id`, beyond framing, role and content."""
    rule = (rules or default_rules()).tool_rules.tool_message
    if message.get("role") != "tool":
        return 0, []
    return rule.per_tool_call_id, ["tool message: undocumented framing"]
