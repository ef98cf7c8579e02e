"""Token costs of a layout's pieces and the allocation inputs built from them.

OpenAI chat billing follows the cookbook's `num_tokens_from_messages`: per message a fixed
framing plus the tokens of every value (role, content, name, tool_call_id), one more per
name, and the reply priming. Because every chunk unit starts with a safe character and
ends in a newline, the final user message costs exactly the sum of its units.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.catalog import ChatFraming
from worker.engine.layout import Layout
from worker.engine.plan import Wants

_HEAD = 4  # system, header, query, query_unit


def pieces(layout: Layout) -> list[str]:
    """Every text whose count the accounting needs, in a fixed order (see `Costs.of`)."""
    turns = layout.turns
    return [
        layout.system,
        layout.header,
        layout.query,
        layout.query_unit,
        *layout.contents,
        *(t.name or "" for t in turns),
        *(t.tool_call_id or "" for t in turns),
        *layout.chunk_units,
    ]


@dataclass(frozen=True, slots=True)
class Costs:
    """Counted pieces of one layout, and the framing rules that price messages."""

    system: int
    header: int
    query: int
    query_unit: int
    role: dict[str, int]
    content: tuple[int, ...]
    name: tuple[int, ...]
    tool_call_id: tuple[int, ...]
    chunk: tuple[int, ...]
    framing: ChatFraming

    @classmethod
    def of(
        cls, layout: Layout, counts: list[int], framing: ChatFraming, role: dict[str, int]
    ) -> Costs:
        """`role`: tokens of each role string (the cookbook counts the role's value too)."""
        n = len(layout.turns)
        at = _HEAD
        return cls(
            system=counts[0],
            header=counts[1],
            query=counts[2],
            query_unit=counts[3],
            role=role,
            content=tuple(counts[at : at + n]),
            name=tuple(counts[at + n : at + 2 * n]),
            tool_call_id=tuple(counts[at + 2 * n : at + 3 * n]),
            chunk=tuple(counts[at + 3 * n :]),
            framing=framing,
        )

    def message_framing(self, role: str, *, named: bool = False, extra: int = 0) -> int:
        f = self.framing
        cost = f.per_message + self.role.get(role, 1) + extra
        return cost + f.per_name if named else cost

    def turn_framing(self, layout: Layout, i: int) -> int:
        """Framing of history turn i, with its name and tool_call_id values."""
        return self.message_framing(
            layout.roles[i],
            named=layout.turns[i].name is not None,
            extra=self.name[i] + self.tool_call_id[i],
        )

    def fixed(self, layout: Layout) -> tuple[int, int]:
        """(content, framing) tokens paid whatever else is kept: system prompt and query."""
        framing = self.framing.reply_priming + self.message_framing("user")
        content = self.query
        if layout.system:
            framing += self.message_framing("system")
            content += self.system
        return content, framing

    def wants(self, layout: Layout, budget_tokens: int) -> Wants:
        content, framing = self.fixed(layout)
        history = tuple(
            sum(self.content[i] + self.turn_framing(layout, i) for i in group)
            for group in layout.groups
        )
        chunks = tuple(
            None if why is not None else cost
            for cost, why in zip(self.chunk, layout.excluded, strict=True)
        )
        return Wants(
            budget=budget_tokens,
            fixed=content + framing,
            history=history,
            chunks=chunks,
            context_overhead=self.header + self.query_unit - self.query,
        )
