"""Provider-native request parts made ready for the target provider: parsed, checked, converted.

A history may come in either provider's shape (a pipeline falls back from one provider to the
other without rewriting it). Each part is parsed in the shape it came in, checked against the
rules of the API it will be sent to (so a refused part is an `invalid_request` naming its path
in the request), converted when the shapes differ, and dumped as the target SDK takes it.
Pure: no I/O, no counting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from worker.catalog import Provider
from worker.engine.memo import KnownTools, MessageMemo, Remembered
from worker.engine.request import AssemblyRequest, Turn
from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers import anthropic as an
from worker.providers import convert
from worker.providers import openai as oa
from worker.providers.base import ImageCheck, parse
from worker.providers.grouping import Unit, anthropic_units, openai_units
from worker.providers.rules import PayloadRules
from worker.values import value

Shape = Literal["openai", "anthropic"]

_OA_ROLES = frozenset({"system", "developer", "tool"})
_OA_KEYS = frozenset({"tool_calls", "name", "refusal", "tool_call_id"})
_OA_PARTS = frozenset({"image_url", "file", "refusal", "input_audio"})
_AN_PARTS = frozenset(
    {"image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}
)


@value
class Native:
    """A request's native parts in the target provider's models."""

    history: list[oa.Message] | list[an.Message]
    system: Any
    """OpenAI: str or text parts (the system message's content); Anthropic: str or blocks."""
    query: list[Any] | None
    """The query's content parts / blocks (None: the query is a string)."""
    tools: list[oa.Tool] | list[an.Tool] | None
    tool_choice: oa.ToolChoice | an.ToolChoice | None
    units: list[Unit]
    remembered: list[Remembered] | None = None
    """Per history message, what `memo` keeps of it (None: no memo, or not a memo's path)."""
    known_tools: KnownTools | None = None
    """What `memo` keeps of the tools and tool_choice (None: none sent, or no memo)."""


def prepare_native(
    req: AssemblyRequest,
    provider: Provider,
    rules: PayloadRules,
    images: ImageCheck,
    memo: MessageMemo | None = None,
) -> Native:
    """Parse, check and convert every native part (raises InvalidRequest / RequestTooLarge).
    With a `memo`, an OpenAI-shaped history of an OpenAI request decoded from JSON parses
    only the messages the memo does not know (the history's rules are checked on all of
    them, as always)."""
    remembered = None
    if memo is not None and provider == "openai" and req._from_json:
        remembered = _remembered_openai(req.history, req.model, rules, images, memo)
    system: Any = req.system
    history: list[oa.Message] | list[an.Message]
    if provider == "openai":
        if remembered is not None:
            mine: list[oa.Message] = [r.parsed for r in remembered]
        else:
            raw = [_as_dict(t) for t in req.history]
            source = _shape(raw, "history") or provider
            mine = _openai_history(raw, source, req.model, rules, images)
        units = openai_units(mine)
        history = mine
        if isinstance(system, list):
            # text blocks of either shape; Claude's cache_control has no OpenAI form
            system = parse(_OA_TEXTS, [_strip_cache(b) for b in system], "system")
    else:
        raw = [_as_dict(t) for t in req.history]
        source = _shape(raw, "history") or provider
        theirs, extra_system = _anthropic_history(raw, source, req.model, rules, images)
        units = anthropic_units(theirs)
        history = theirs
        system = _anthropic_system(system, extra_system)
    query = _query(req.query, provider, req.model, rules, images)
    known = None
    if memo is not None and remembered is not None and (req.tools or req.tool_choice):
        key = memo.tools_key(req.tools, req.tool_choice)
        known = memo.tools(key)
        if known is None:
            known = KnownTools(*_tools(req.tools, req.tool_choice, provider))
            memo.put_tools(key, known)
        tools, choice = known.parsed, known.choice
    else:
        tools, choice = _tools(req.tools, req.tool_choice, provider)
    return Native(history, system, query, tools, choice, units, remembered, known)


_OA_TEXTS: TypeAdapter[list[oa.TextPart]] = TypeAdapter(list[oa.TextPart])


def _remembered_openai(
    items: Sequence[Turn | dict[str, Any]],
    model: str,
    rules: PayloadRules,
    images: ImageCheck,
    memo: MessageMemo,
) -> list[Remembered] | None:
    """The history's messages from the memo, the new ones parsed in one call and
    remembered; the history's rules checked on all. None when the history is not OpenAI
    shaped, or a message does not parse: the caller takes the full path, which converts
    it, or raises the same error naming the same path."""
    keys = [memo.key(t) for t in items]
    found = [memo.get(k) for k in keys]
    new = [i for i, r in enumerate(found) if r is None]
    memo.hits += len(items) - len(new)
    memo.misses += len(new)
    raw = {i: _as_dict(items[i]) for i in new}
    shapes = {i: _message_shape(raw[i]) for i in new}
    named = {shapes[i] if r is None else r.shape for i, r in enumerate(found)} - {None}
    if named - {"openai"}:  # Anthropic-shaped parts, or both shapes: the full path
        return None
    if new:
        try:
            parsed = oa.HISTORY.validate_python([raw[i] for i in new])
        except ValidationError:
            return None
        for i, msg in zip(new, parsed, strict=True):
            item = Remembered(msg, shapes[i])
            found[i] = item
            memo.put(keys[i], item)
    out: list[Remembered] = found  # type: ignore[assignment]  # every slot filled above
    oa.check_history([r.parsed for r in out], model, rules=rules, images=images)
    return out


def _as_dict(t: Turn | dict[str, Any]) -> dict[str, Any]:
    if isinstance(t, dict):
        return t
    out = t.model_dump(exclude_none=True)
    if t.pin:
        out["pin"] = True
    return out


def _shape(messages: Sequence[Any], root: str) -> Shape | None:
    """The shape a history's decisive fields name; None when it is valid in both."""
    found: tuple[Shape, str] | None = None
    for i, msg in enumerate(messages):
        here = _message_shape(msg)
        if here is None:
            continue
        if found is not None and found[0] != here:
            raise InvalidRequest(
                f"{root}[{i}]: an {here} message in a history whose {found[1]} is {found[0]} "
                "shaped; send one provider's shape"
            )
        found = found or (here, f"{root}[{i}]")
    return found[0] if found else None


def _message_shape(msg: Any) -> Shape | None:
    if not isinstance(msg, dict):
        return None
    if msg.get("role") in _OA_ROLES or _OA_KEYS & msg.keys():
        return "openai"
    content = msg.get("content")
    return _parts_shape(content) if isinstance(content, list) else None


def _parts_shape(parts: list[Any]) -> Shape | None:
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _OA_PARTS:
            return "openai"
        if kind in _AN_PARTS or "cache_control" in part:
            return "anthropic"
    return None


def _openai_history(
    raw: list[Any], source: Shape, model: str, rules: PayloadRules, images: ImageCheck
) -> list[oa.Message]:
    if source == "openai":
        history = oa.parse_history(raw)
        oa.check_history(history, model, rules=rules, images=images)
        return history
    theirs = an.parse_history(raw)
    an.check_history(theirs, model, rules=rules, images=images)
    return convert.anthropic_to_openai(theirs)


def _anthropic_history(
    raw: list[Any], source: Shape, model: str, rules: PayloadRules, images: ImageCheck
) -> tuple[list[an.Message], list[an.TextBlock] | None]:
    if source == "anthropic":
        history = an.parse_history(raw)
        an.check_history(history, model, rules=rules, images=images)
        return history, None
    theirs = oa.parse_history(raw)
    oa.check_history(theirs, model, rules=rules, images=images)
    system, history = convert.openai_to_anthropic(theirs)
    return history, system


def _anthropic_system(system: Any, extra: list[an.TextBlock] | None) -> Any:
    parsed: an.System = an.parse_system(system)
    an.check_system(parsed)
    if not extra:
        return parsed
    head = [an.TextBlock(type="text", text=parsed)] if isinstance(parsed, str) and parsed else []
    return [*head, *(parsed if isinstance(parsed, list) else []), *extra]


def _strip_cache(block: Any) -> Any:
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _query(
    query: str | list[Any], provider: Provider, model: str, rules: PayloadRules, images: ImageCheck
) -> list[Any] | None:
    """The query's parts in the target shape, checked like a user message at `query`."""
    if isinstance(query, str):
        return None
    try:
        return _query_parts(query, provider, model, rules, images)
    except (InvalidRequest, RequestTooLarge) as exc:
        # the parts were checked as one user message; name them as the request does
        raise type(exc)(str(exc).replace("query[0].content", "query", 1)) from None


def _query_parts(
    query: list[Any], provider: Provider, model: str, rules: PayloadRules, images: ImageCheck
) -> list[Any]:
    if not query:
        raise InvalidRequest("query: an empty list of parts; send a string or at least one part")
    source = _parts_shape(query) or provider
    msg = [{"role": "user", "content": query}]
    if provider == "openai":
        if source == "openai":
            [parsed] = oa.parse_history(msg, root="query")
            oa.check_history([parsed], model, rules=rules, root="query", images=images)
        else:
            theirs = an.parse_history(msg, root="query")
            an.check_history(theirs, model, rules=rules, root="query", images=images)
            [parsed] = convert.anthropic_to_openai(theirs, root="query")
        return list(parsed.content)  # type: ignore[arg-type]
    if source == "anthropic":
        [native] = an.parse_history(msg, root="query")
        an.check_history([native], model, rules=rules, root="query", images=images)
    else:
        mine = oa.parse_history(msg, root="query")
        oa.check_history(mine, model, rules=rules, root="query", images=images)
        _, [native] = convert.openai_to_anthropic(mine, root="query")
    for j, block in enumerate(an.blocks(native)):
        if isinstance(block, an.ToolResultBlock):
            raise InvalidRequest(
                f"query[0].content[{j}]: a tool_result belongs in history, not the query"
            )
    return an.blocks(native)


def _tools(
    tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None, provider: Provider
) -> tuple[Any, Any]:
    """Tools and tool_choice in the target shape, checked (names unique, choice names one)."""
    if tools is None and choice is None:
        return None, None
    openai_shaped = any(isinstance(t, dict) and "function" in t for t in tools or []) or (
        isinstance(choice, str) or (isinstance(choice, dict) and "function" in choice)
    )
    if provider == "openai":
        if not openai_shaped and (tools or choice is not None):
            tools, choice = convert.tools_to_openai(tools, choice)
        o_tools = oa.parse_tools(tools) if tools is not None else None
        o_choice = oa.parse_tool_choice(choice) if choice is not None else None
        oa.check_tools(o_tools, o_choice)
        return o_tools, o_choice
    if openai_shaped:
        tools, choice = convert.tools_to_anthropic(tools, choice)
    a_tools = an.parse_tools(tools) if tools is not None else None
    a_choice = an.parse_tool_choice(choice) if choice is not None else None
    an.check_tools(a_tools, a_choice)
    return a_tools, a_choice
