"""What each native message costs: the texts to count and the tokens stated rules add.

A `Bill` is built once per message when the request is laid out, before anything is counted,
so the counting threads (OpenAI) or the count API (Claude) get every text up front. The
provider rules in `worker.providers` take a counting function; `record` runs such a rule with
a function that notes each text and returns 0, which splits its result into the texts it
counts and the constants it adds (the rules are sums of counts and constants).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from worker.catalog import Provider
from worker.engine.bill import Bill
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.documents import PDF_ESTIMATE, pdf_tokens
from worker.providers.image_costs import anthropic_image_cost, openai_image_cost
from worker.providers.rules import PayloadRules
from worker.providers.tools import count_tool_calls, count_tool_definitions, count_tool_message

PARTS = "content parts: per-part framing undocumented"
CHOICE = "tool_choice: undocumented framing"
CLAUDE_TOOLS = "tools: estimated as their JSON text (the count API is exact)"
THINKING = "redacted_thinking: estimated from its size"


def record(
    rule: Callable[[Callable[[str], int]], tuple[int, list[str]]],
) -> tuple[list[str], int, list[str]]:
    """(texts the rule counts, tokens it adds on top, its reasons)."""
    seen: list[str] = []

    def note(text: str) -> int:
        seen.append(text)
        return 0

    extra, reasons = rule(note)
    return seen, extra, reasons


_NONE: dict[str, Any] = {}


def openai_bill(msg: Any, model: str, rules: PayloadRules) -> Bill:
    """The cookbook's framing for role, content and name; the stated recipes in
    `providers.tools` for tool_calls and tool messages; images by OpenAI's rule."""
    content: list[str] = []
    framing: list[str] = []
    extra, fextra = 0, 0
    reasons: set[str] = set()
    value = msg.content
    if isinstance(value, str):
        content.append(value)
    elif isinstance(value, list):
        reasons.add(PARTS)
        for part in value:
            if isinstance(part, oa.TextPart):
                content.append(part.text)
            elif isinstance(part, oa.RefusalPart):
                content.append(part.refusal)
            elif isinstance(part, oa.ImagePart):
                cost = openai_image_cost(part, model, rules=rules)
                extra += cost.tokens
                reasons.update(cost.inexact)
            elif isinstance(part, oa.FilePart):
                data = part.file.file_data or ""
                _, _, b64 = data.partition(";base64,")
                extra += pdf_tokens(b64, rules) if b64 else rules.document_rules.tokens_per_page
                reasons.add(PDF_ESTIMATE)
    # A role's model declares some of these fields and not others: read the declared ones
    # from the instance dict (a missing one through getattr is pydantic's slow path).
    fields: dict[str, Any] = getattr(msg, "__dict__", _NONE)
    name = fields.get("name")
    if name is not None:
        framing.append(name)
    refusal = fields.get("refusal")
    if refusal is not None:
        content.append(refusal)
    calls = fields.get("tool_calls")
    if calls:
        dumped = [c.sdk() for c in calls]
        texts, more, why = record(lambda count: count_tool_calls(dumped, count, rules))
        content += texts
        extra += more
        reasons.update(why)
    if isinstance(msg, oa.ToolMessage):
        more, why = count_tool_message(msg.sdk(), lambda _: 0, rules)
        fextra += more
        reasons.update(why)
    return Bill(
        role=msg.role,
        content=tuple(content),
        framing=tuple(framing),
        named=name is not None,
        content_extra=extra,
        framing_extra=fextra,
        inexact=tuple(sorted(reasons)),
    )


def anthropic_bill(msg: Any, model: str, rules: PayloadRules) -> Bill:
    """Texts of every block for the count API (or the byte estimate); images by Claude's
    patch rule and PDFs per page, as local estimates that the payload count confirms."""
    content: list[str] = []
    extra = 0
    reasons: set[str] = set()
    blocks = msg.content if isinstance(msg.content, list) else None
    if blocks is None:
        content.append(msg.content)
    for block in blocks or []:
        more = _block(block, model, rules, content, reasons)
        extra += more
    return Bill(
        role=msg.role, content=tuple(content), content_extra=extra, inexact=tuple(sorted(reasons))
    )


def _block(block: Any, model: str, rules: PayloadRules, out: list[str], why: set[str]) -> int:
    if isinstance(block, an.TextBlock):
        out.append(block.text)
    elif isinstance(block, an.ToolUseBlock):
        out += [block.name, json.dumps(block.input, ensure_ascii=False)]
    elif isinstance(block, an.ToolResultBlock):
        if isinstance(block.content, str):
            out.append(block.content)
        return sum(
            _block(b, model, rules, out, why)
            for b in (block.content if isinstance(block.content, list) else [])
        )
    elif isinstance(block, an.ThinkingBlock):
        out.append(block.thinking)
    elif isinstance(block, an.RedactedThinkingBlock):
        why.add(THINKING)
        return len(block.data) // 4
    elif isinstance(block, an.ImageBlock):
        cost = anthropic_image_cost(block, model, rules=rules)
        why.update(cost.inexact)
        return cost.tokens
    elif isinstance(block, an.DocumentBlock):
        if isinstance(block.source, an.PlainTextSource):
            out.append(block.source.data)
        else:
            why.add(PDF_ESTIMATE)
            return pdf_tokens(block.source.data, rules)
        for text in (block.title, block.context):
            if text:
                out.append(text)
    return 0


def tools_bill(
    provider: Provider,
    tools: Sequence[Mapping[str, Any]] | None,
    choice: Any,
    model: str,
    encoding: str | None,
    rules: PayloadRules,
) -> Bill:
    """OpenAI: the cookbook's `num_tokens_for_tools` (nearest stated family outside it);
    Claude: the definitions' JSON text, an estimate the payload count replaces."""
    reasons: set[str] = {CHOICE} if choice is not None else set()
    if not tools:
        return Bill("tools", inexact=tuple(sorted(reasons)))
    if provider == "openai":
        texts, extra, why = record(
            lambda count: count_tool_definitions(tools, model, count, rules, encoding_name=encoding)
        )
        reasons.update(why)
        return Bill("tools", tuple(texts), content_extra=extra, inexact=tuple(sorted(reasons)))
    reasons.add(CLAUDE_TOOLS)
    texts = [json.dumps(t, ensure_ascii=False) for t in tools]
    return Bill("tools", tuple(texts), inexact=tuple(sorted(reasons)))
