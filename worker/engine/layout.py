"""The pieces of a request as they will be sent, and the payload built from a plan.

Counting and rendering read the same `Layout`, so what is counted is exactly what is sent.
`Layout.render(plan)` is the one function that turns a plan into the provider payload
(messages, and `system`, `tools`, `tool_choice` where given), for every provider path.
Pure: no I/O, no counting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import field
from itertools import chain
from typing import TYPE_CHECKING, Any

from worker.catalog import ModelInfo, Provider, RenderTemplates
from worker.engine.bill import Bill
from worker.engine.plan import Plan
from worker.engine.request import AssemblyRequest, Turn
from worker.values import value

if TYPE_CHECKING:
    from worker.engine.memo import MessageMemo, Remembered
    from worker.providers.rules import PayloadRules


@value
class Payload:
    """What is sent: the SDK's own shapes, ready for `create(**payload.kwargs())`."""

    messages: list[dict[str, Any]]
    system: Any = None
    """Anthropic only: the top-level `system` (a string or text blocks); None when empty."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages}
        for key in ("system", "tools", "tool_choice"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@value
class Layout:
    provider: Provider
    system: str
    """The system prompt's text (what is counted in the system slot)."""
    system_sdk: Any
    """The system prompt as sent: OpenAI the system message's content, Anthropic `system`."""
    system_bill: Bill
    messages: tuple[dict[str, Any], ...]
    """History as sent (SDK shape), oldest first; converted when it came in the other shape.
    Empty for a plain OpenAI request: its `turns` are passed through as they came."""
    roles: tuple[str, ...]
    bills: tuple[Bill, ...]
    """Per history message: the texts and stated tokens it costs. Empty for a plain
    (`legacy`) request: its turns are billed from `turns` by the cookbook's rule directly
    (`costs.pieces`, `Costs.of`), without a sheet per turn of every request."""
    groups: tuple[tuple[int, ...], ...]
    """Droppable exchanges, oldest first: a user turn with what follows it until the next user
    turn; whole tool units (a call and its results) never split."""
    pinned: tuple[tuple[int, ...], ...]
    """Exchanges holding a pinned message: always kept, costed as fixed."""
    chunk_units: tuple[str, ...]
    """Each chunk as rendered inside the final user message."""
    excluded: tuple[str | None, ...]
    """Per chunk: None, or why it is left out before allocation (`duplicate`, `empty`)."""
    header: str
    query: str
    """The query's text when it is a string ('' when it is a list of parts)."""
    query_unit: str
    """The query as rendered after context (with its label); '' for a list of parts."""
    query_parts: tuple[Any, ...] | None
    """The query's parts / blocks as sent (None: a string query)."""
    query_bill: Bill
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    tools_bill: Bill
    chunk_template: str
    legacy: bool
    """The original plain-text contract (kept byte for byte)."""
    turns: Sequence[Turn] = ()
    """Plain requests: the request's own turns (OpenAI output passes them through)."""
    inexact: tuple[str, ...] = field(default=())
    """Why counts are not exact: one reason per kind of part counted by an unstated rule."""
    remembered: tuple[Remembered, ...] = ()
    """Per history message, the memo's record of it (empty: not the memo's path); the
    result takes each kept message's model from it."""

    def render(self, plan: Plan, units: dict[int, str] | None = None) -> Payload:
        """The payload of a plan; `units` replaces truncated chunks."""
        messages: list[dict[str, Any]] = []
        openai = self.provider == "openai"
        if openai and self.system:
            messages.append({"role": "system", "content": self.system_sdk})
        kept = self.kept_indices(plan.history_kept)
        if self.messages or not self.turns:
            messages.extend(self.messages[i] for i in kept)
        else:  # plain OpenAI turns: built for the kept ones only (see `_legacy`)
            messages.extend(_plain(self.turns[i]) for i in kept)
        final = self.final_content(plan, units)
        if not openai and messages and messages[-1]["role"] == "user":
            # Claude: tool results (or a user turn) end the kept history; the context and
            # query join that turn after its blocks so roles still alternate.
            last = messages[-1]
            messages[-1] = {**last, "content": _blocks(last["content"]) + _blocks(final)}
        else:
            messages.append({"role": "user", "content": final})
        system = None if openai or not self.system else self.system_sdk
        return Payload(messages, system, self.tools, self.tool_choice)

    def plain_messages(self, plan: Plan, units: dict[int, str] | None = None) -> list[Turn]:
        """`render(plan).messages` for a plain OpenAI request as the request's own turns,
        passed through without a copy (the hot path of text-only traffic)."""
        out: list[Turn] = []
        if self.system:
            out.append(Turn(role="system", content=self.system))
        turns = self.turns
        kept = self.kept_indices(plan.history_kept)
        out.extend(turns if len(kept) == len(turns) else map(turns.__getitem__, kept))
        out.append(Turn(role="user", content=self.final_content(plan, units)))
        return out

    def final_content(self, plan: Plan, units: dict[int, str] | None = None) -> Any:
        """The final user message's content: context then query (text or parts)."""
        body = ""
        if plan.chunks_kept:
            units = units or {}
            body = self.header + "".join(
                units.get(i, self.chunk_units[i]) for i in plan.chunks_kept
            )
        if self.query_parts is None:
            return body + self.query_unit if body else self.query
        head = [{"type": "text", "text": body}] if body else []
        return head + [_dump(p) for p in self.query_parts]

    def final_user(self, plan: Plan, units: dict[int, str] | None = None) -> str:
        """The final user message's text (string queries)."""
        content = self.final_content(plan, units)
        return content if isinstance(content, str) else ""

    def chunk_unit(self, chunk_id: str, text: str) -> str:
        return self.chunk_template.format(id=chunk_id, text=text)

    def kept_groups(self, groups_kept: int) -> list[tuple[int, ...]]:
        """Pinned exchanges and the newest `groups_kept` others, in history order."""
        kept = [*self.pinned, *self.groups[len(self.groups) - groups_kept :]]
        return sorted(kept, key=lambda g: g[0])

    def kept_indices(self, groups_kept: int) -> list[int]:
        if not self.pinned:  # the newest exchanges, already in history order
            return list(chain.from_iterable(self.groups[len(self.groups) - groups_kept :]))
        return [i for g in self.kept_groups(groups_kept) for i in g]

    def turn_indices(self, groups_kept: int) -> list[int]:
        return self.kept_indices(groups_kept)

    def exchange_of(self, group: tuple[int, ...]) -> int:
        """The exchange's position among all exchanges of the history, oldest first."""
        return sum(1 for g in (*self.pinned, *self.groups) if g[0] < group[0])


def build_layout(
    req: AssemblyRequest,
    info: ModelInfo | Provider,
    tpl: RenderTemplates,
    rules: PayloadRules | None = None,
    memo: MessageMemo | None = None,
) -> Layout:
    """Lay a request out for its provider; native parts are parsed, checked and converted
    first (raises InvalidRequest / RequestTooLarge naming the part). A `memo` remembers
    each native message's parsing, SDK form and bill across requests (`engine.memo`)."""
    provider = info if isinstance(info, str) else info.provider
    encoding = None if isinstance(info, str) else info.encoding
    model = req.model
    excluded = _excluded(req)
    make_unit = tpl.chunk_unit()
    common: dict[str, Any] = {
        "provider": provider,
        "chunk_units": tuple(make_unit(c.id, c.text) for c in req.chunks),
        "excluded": excluded,
        "header": tpl.context_header,
        "chunk_template": tpl.chunk_template,
    }
    if is_legacy(req, provider):
        return _legacy(req, provider, tpl, common)
    # Native parts only: the provider models take a while to import, plain text never needs them
    from worker.engine.bills import PARTS, anthropic_bill, openai_bill, tools_bill
    from worker.engine.native import prepare_native
    from worker.providers.base import ImageCheck
    from worker.providers.rules import default_rules

    if rules is not None:
        memo = None  # its bills were made under the default rules
    rules = rules or default_rules()
    images = ImageCheck(provider, model, rules)
    native = prepare_native(req, provider, rules, images, memo)
    bill_of: Callable[[Any], Bill]
    if provider == "openai":
        bill_of = lambda m: openai_bill(m, model, rules)  # noqa: E731
    else:
        bill_of = lambda m: anthropic_bill(m, model, rules)  # noqa: E731
    remembered: tuple[Remembered, ...] = ()
    if native.remembered is not None:
        remembered = tuple(native.remembered)
        messages, bills = _remembered(remembered, model, bill_of)
    else:
        messages = tuple(m.sdk() for m in native.history)
        bills = tuple(bill_of(m) for m in native.history)
    groups: list[list[int]] = []
    pins: list[bool] = []
    for unit in native.units:
        opens = native.history[unit.indices[0]].role == "user"
        if opens or not groups:
            groups.append([])
            pins.append(False)
        groups[-1].extend(unit.indices)
        pins[-1] = pins[-1] or unit.pinned
    system_text = _texts(native.system)
    system_bill = Bill(
        "system",
        content=_system_texts(native.system),
        inexact=(PARTS,) if provider == "openai" and isinstance(native.system, list) else (),
    )
    query_bill = Bill("user")
    query_text, query_unit = "", ""
    if native.query is None:
        assert isinstance(req.query, str)
        query_text, query_unit = req.query, tpl.query_template.format(query=req.query)
    else:
        query_bill = bill_of(_QueryMessage(native.query))
    known = native.known_tools  # remembered: dumped once, billed once per model
    if known is not None and known.bills:
        tools_sdk, choice_sdk = known.sdk, known.choice_sdk
    else:
        tools_sdk = [t.sdk() for t in native.tools] if native.tools is not None else None
        choice_sdk = _dump(native.tool_choice)
        if known is not None:
            known.sdk, known.choice_sdk = tools_sdk, choice_sdk
    tb = known.bills.get(model) if known is not None else None
    if tb is None:
        tb = tools_bill(provider, tools_sdk, choice_sdk, model, encoding, rules)
        if known is not None:
            known.bills[model] = tb
    reasons = sorted({r for b in (system_bill, *bills, query_bill, tb) for r in b.inexact})
    return Layout(
        system=system_text,
        system_sdk=_dump(native.system),
        system_bill=system_bill,
        messages=messages,
        roles=tuple(m["role"] for m in messages),
        bills=bills,
        groups=tuple(tuple(g) for g, p in zip(groups, pins, strict=True) if not p),
        pinned=tuple(tuple(g) for g, p in zip(groups, pins, strict=True) if p),
        query=query_text,
        query_unit=query_unit,
        query_parts=tuple(native.query) if native.query is not None else None,
        query_bill=query_bill,
        tools=tools_sdk,
        tool_choice=choice_sdk,
        tools_bill=tb,
        legacy=False,
        inexact=tuple(reasons),
        remembered=remembered,
        **common,
    )


def _remembered(
    items: Sequence[Remembered], model: str, bill_of: Callable[[Any], Bill]
) -> tuple[tuple[dict[str, Any], ...], tuple[Bill, ...]]:
    """SDK forms and bills of remembered messages, made for those that lack them."""
    messages: list[dict[str, Any]] = []
    bills: list[Bill] = []
    for item in items:
        sdk = item.sdk
        if sdk is None:
            sdk = item.sdk = item.parsed.sdk()
        bill = item.bills.get(model)
        if bill is None:
            bill = item.bills[model] = bill_of(item.parsed)
        messages.append(sdk)
        bills.append(bill)
    return tuple(messages), tuple(bills)


@value
class _QueryMessage:
    """The query's parts billed like a user message's content (its framing is the final
    user message's, already paid as fixed)."""

    content: list[Any]
    role: str = "user"


def is_legacy(req: AssemblyRequest, provider: Provider) -> bool:
    """The original plain-text contract: passed through as before, exact as before. For
    Claude only user and assistant turns: a plain `system` or `tool` turn is read as the
    OpenAI message it is and converted, not flattened into a labelled user turn. A `tool`
    turn goes the native way for OpenAI too: only there is it checked against the call it
    answers (a plain history has no `tool_calls`, so the provider would refuse it)."""
    return (
        all(
            isinstance(t, Turn)
            and (t.role in ("user", "assistant") or (provider == "openai" and t.role != "tool"))
            for t in req.history
        )
        and isinstance(req.system, str)
        and isinstance(req.query, str)
        and req.tools is None
        and req.tool_choice is None
    )


def _legacy(
    req: AssemblyRequest, provider: Provider, tpl: RenderTemplates, common: dict[str, Any]
) -> Layout:
    turns: Sequence[Turn] = req.history  # type: ignore[assignment]
    assert isinstance(req.system, str) and isinstance(req.query, str)
    # OpenAI passes the request's own turns through (`plain_messages`); only Claude's
    # are rebuilt here, the role being the turn's own in both shapes.
    messages = () if provider == "openai" else tuple(_anthropic_turn(t) for t in turns)
    groups: list[list[int]] = []
    pins: list[bool] = []
    roles = []
    for i, turn in enumerate(turns):
        role = turn.role
        roles.append(role)
        if role == "user" or not groups:
            groups.append([i])
            pins.append(turn.pin)
        else:
            groups[-1].append(i)
            if turn.pin:
                pins[-1] = True
    kept = [tuple(g) for g, p in zip(groups, pins, strict=True) if not p]
    pinned = [tuple(g) for g, p in zip(groups, pins, strict=True) if p] if any(pins) else []
    return Layout(
        system=req.system,
        system_sdk=req.system,
        system_bill=Bill("system", (req.system,)),
        messages=messages,
        roles=tuple(roles),
        bills=(),
        groups=tuple(kept),
        pinned=tuple(pinned),
        query=req.query,
        query_unit=tpl.query_template.format(query=req.query),
        query_parts=None,
        query_bill=Bill("user"),
        tools=None,
        tool_choice=None,
        tools_bill=Bill("tools"),
        legacy=True,
        turns=turns,
        **common,
    )


def _excluded(req: AssemblyRequest) -> tuple[str | None, ...]:
    seen: set[str] = set()
    excluded: list[str | None] = []
    for chunk in req.chunks:
        text = chunk.text
        if not text or text.isspace():  # `not text.strip()` without copying the chunk
            excluded.append("empty")
        elif text in seen:
            excluded.append("duplicate")
        else:
            seen.add(text)
            excluded.append(None)
    return tuple(excluded)


def _plain(t: Turn) -> dict[str, Any]:
    """A plain turn as sent (what `model_dump(exclude_none=True)` gives, without its cost)."""
    out: dict[str, Any] = {"role": t.role, "content": t.content}
    if t.name is not None:
        out["name"] = t.name
    if t.tool_call_id is not None:
        out["tool_call_id"] = t.tool_call_id
    return out


def _anthropic_turn(t: Turn) -> dict[str, Any]:
    """A plain user or assistant turn (other roles take the native path, see `is_legacy`)."""
    return {"role": t.role, "content": t.content}


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if hasattr(value, "sdk"):
        return value.sdk()
    return value


def _texts(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "\n".join(getattr(b, "text", "") for b in system or [])


def _system_texts(system: Any) -> tuple[str, ...]:
    if isinstance(system, str):
        return (system,) if system else ()
    return tuple(getattr(b, "text", "") for b in system or [])


def _blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


__all__ = ["Bill", "Layout", "Payload", "build_layout"]
