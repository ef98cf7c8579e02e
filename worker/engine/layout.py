"""The pieces of a request as they will be sent, and the payload built from a plan.

Counting and rendering read the same `Layout`, so what is counted is exactly what is sent.
Pure: no I/O, no counting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.catalog import Provider, RenderTemplates
from worker.engine.plan import Plan
from worker.engine.request import AssemblyRequest, Turn

# Anthropic's Messages API has only user and assistant turns.
_ANTHROPIC_ROLE = {"user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class Layout:
    provider: Provider
    system: str
    turns: Sequence[Turn]
    """History as received, oldest first."""
    roles: tuple[str, ...]
    """Each turn's role as sent (Anthropic has only user and assistant)."""
    contents: tuple[str, ...]
    """Each turn's content as sent (labelled where Anthropic's roles lose information)."""
    groups: tuple[tuple[int, ...], ...]
    """Exchanges: a user turn with what follows it until the next user turn, oldest first."""
    chunk_units: tuple[str, ...]
    """Each chunk as rendered inside the final user message."""
    excluded: tuple[str | None, ...]
    """Per chunk: None, or why it is left out before allocation (`duplicate`, `empty`)."""
    header: str
    query: str
    query_unit: str
    """The query as rendered after context (with its label)."""
    chunk_template: str

    def render(self, plan: Plan, units: dict[int, str] | None = None) -> list[Turn]:
        """Messages for the plan, system first for OpenAI; `units` replaces truncated chunks."""
        messages: list[Turn] = []
        if self.provider == "openai" and self.system:
            messages.append(Turn(role="system", content=self.system))
        first_group = len(self.groups) - plan.history_kept
        for group in self.groups[first_group:]:
            messages.extend(self.message(i) for i in group)
        messages.append(Turn(role="user", content=self.final_user(plan, units)))
        return messages

    def final_user(self, plan: Plan, units: dict[int, str] | None = None) -> str:
        if not plan.chunks_kept:
            return self.query
        units = units or {}
        body = "".join(units.get(i, self.chunk_units[i]) for i in plan.chunks_kept)
        return self.header + body + self.query_unit

    def message(self, i: int) -> Turn:
        """Turn i as sent: the request's own turn for OpenAI, a mapped one for Anthropic."""
        if self.provider == "openai":
            return self.turns[i]
        return Turn.model_validate({"role": self.roles[i], "content": self.contents[i]})

    def chunk_unit(self, chunk_id: str, text: str) -> str:
        return self.chunk_template.format(id=chunk_id, text=text)

    def turn_indices(self, groups_kept: int) -> list[int]:
        return [i for g in self.groups[len(self.groups) - groups_kept :] for i in g]


def build_layout(req: AssemblyRequest, provider: Provider, tpl: RenderTemplates) -> Layout:
    roles: tuple[str, ...]
    if provider == "openai":
        roles = tuple(t.role for t in req.history)
        contents = tuple(t.content for t in req.history)
    else:
        mapped = [_anthropic_turn(t) for t in req.history]
        roles = tuple(r for r, _ in mapped)
        contents = tuple(c for _, c in mapped)
    seen: set[str] = set()
    excluded: list[str | None] = []
    for chunk in req.chunks:
        if not chunk.text.strip():
            excluded.append("empty")
        elif chunk.text in seen:
            excluded.append("duplicate")
        else:
            seen.add(chunk.text)
            excluded.append(None)
    return Layout(
        provider=provider,
        system=req.system,
        turns=req.history,
        roles=roles,
        contents=contents,
        groups=_exchanges(req.history),
        chunk_units=tuple(tpl.chunk_template.format(id=c.id, text=c.text) for c in req.chunks),
        excluded=tuple(excluded),
        header=tpl.context_header,
        query=req.query,
        query_unit=tpl.query_template.format(query=req.query),
        chunk_template=tpl.chunk_template,
    )


def _anthropic_turn(t: Turn) -> tuple[str, str]:
    role = _ANTHROPIC_ROLE.get(t.role)
    if role is not None:
        return role, t.content
    label = f"[{t.role} {t.tool_call_id}]" if t.tool_call_id else f"[{t.role}]"
    return "user", f"{label} {t.content}"


def _exchanges(history: list[Turn]) -> tuple[tuple[int, ...], ...]:
    """A user turn opens an exchange; replies and tool calls/results stay with it."""
    groups: list[list[int]] = []
    for i, turn in enumerate(history):
        if turn.role == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return tuple(tuple(g) for g in groups)
