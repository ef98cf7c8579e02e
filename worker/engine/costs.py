"""Token costs of a layout's pieces and the allocation inputs built from them.

OpenAI chat billing follows the cookbook's `num_tokens_from_messages`: per message a fixed
framing plus the tokens of every value (role, content, name, tool_call_id), one more per
name, and the reply priming. Because every chunk unit starts with a safe character and
ends in a newline, the final user message costs exactly the sum of its units. Native parts
add what their `Bill` states: tool calls, images and documents in the slot of the message
that carries them, tool definitions in the `tools` slot.

Pinned exchanges are never dropped: their cost is part of `fixed`, and the allocation only
sees the other exchanges.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.catalog import ChatFraming
from worker.engine.bill import Bill
from worker.engine.layout import Layout
from worker.engine.plan import Wants
from worker.values import value


def _bills(layout: Layout) -> Iterator[Bill]:
    yield layout.system_bill
    yield from layout.bills
    yield layout.query_bill
    yield layout.tools_bill


def pieces(layout: Layout) -> list[str]:
    """Every text whose count the accounting needs, in a fixed order (see `Costs.of`)."""
    out = [layout.header, layout.query, layout.query_unit]
    if layout.legacy:  # the cookbook's every-value rule: content, then name and tool_call_id
        out.append(layout.system)
        for t in layout.turns:
            out.append(t.content)
            if t.name is not None:
                out.append(t.name)
            if t.tool_call_id is not None:
                out.append(t.tool_call_id)
        out += layout.chunk_units
        return out
    for bill in _bills(layout):
        out += bill.content
        out += bill.framing
    out += layout.chunk_units
    return out


@value
class Costs:
    """Counted pieces of one layout, and the framing rules that price messages."""

    system: int
    header: int
    query: int
    """The query's tokens: its text, or its parts (text, images) for a list query."""
    query_unit: int
    role: dict[str, int]
    content: tuple[int, ...]
    """Per history message: content, tool calls, images and documents."""
    msg_framing: tuple[int, ...]
    """Per history message: framing, role, name and tool_call_id."""
    tools: int
    """Tool definitions (and tool_choice, where a rule states it)."""
    chunk: tuple[int, ...]
    framing: ChatFraming

    @classmethod
    def of(
        cls,
        layout: Layout,
        counts: list[int],
        framing: ChatFraming,
        role: dict[str, int],
        extra_scale: int = 1,
    ) -> Costs:
        """`role`: tokens of each role string (the cookbook counts the role's value too).
        `extra_scale`: what the stated-rule tokens of the bills (images, documents, call
        overheads) are multiplied by, for callers that count in fractions of a token."""
        header, query, query_unit = counts[0], counts[1], counts[2]
        if layout.legacy:
            return cls._plain(layout, counts, framing, role)
        at = 3
        sums: list[tuple[int, int]] = []
        per_message, per_name = framing.per_message, framing.per_name
        for bill in _bills(layout):
            # one content text and no framing texts is every plain turn: no slices for it
            n, m = len(bill.content), len(bill.framing)
            body = counts[at] if n == 1 else sum(counts[at : at + n])
            frame = 0 if m == 0 else sum(counts[at + n : at + n + m])
            if bill.content_extra:
                body += bill.content_extra * extra_scale
            if bill.framing_extra:
                frame += bill.framing_extra * extra_scale
            at += n + m
            if bill.role != "system" and bill.role != "tools":
                frame += per_message + role.get(bill.role, 1)
                if bill.named:
                    frame += per_name
            sums.append((body, frame))
        system = sums[0][0]
        history = sums[1:-2]
        query_parts = sums[-2][0]
        tools = sums[-1][0]
        return cls(
            system=system,
            header=header,
            query=query if layout.query_parts is None else query_parts,
            query_unit=query_unit,
            role=role,
            content=tuple(c for c, _ in history),
            msg_framing=tuple(f for _, f in history),
            tools=tools,
            chunk=tuple(counts[at:]),
            framing=framing,
        )

    @classmethod
    def _plain(
        cls, layout: Layout, counts: list[int], framing: ChatFraming, role: dict[str, int]
    ) -> Costs:
        """`of` for a plain request, in the order `pieces` lists it: the system prompt, then
        per turn its content, name and tool_call_id (no stated-rule tokens in plain text)."""
        per_message, per_name = framing.per_message, framing.per_name
        content: list[int] = []
        frames: list[int] = []
        at = 4
        for t in layout.turns:
            content.append(counts[at])
            at += 1
            frame = per_message + role.get(t.role, 1)
            if t.name is not None:
                frame += counts[at] + per_name
                at += 1
            if t.tool_call_id is not None:
                frame += counts[at]
                at += 1
            frames.append(frame)
        return cls(
            system=counts[3],
            header=counts[0],
            query=counts[1],
            query_unit=counts[2],
            role=role,
            content=tuple(content),
            msg_framing=tuple(frames),
            tools=0,
            chunk=tuple(counts[at:]),
            framing=framing,
        )

    def message_framing(self, role: str, *, named: bool = False, extra: int = 0) -> int:
        f = self.framing
        cost = f.per_message + self.role.get(role, 1) + extra
        return cost + f.per_name if named else cost

    def turn_framing(self, layout: Layout, i: int) -> int:
        """Framing of history message i, with its name and tool_call_id values."""
        return self.msg_framing[i]

    def fixed(self, layout: Layout) -> tuple[int, int]:
        """(content, framing) tokens paid whatever else is kept: system prompt, query,
        tool definitions and pinned exchanges."""
        framing = self.framing.reply_priming + self.message_framing("user")
        content = self.query + self.tools
        if layout.system:
            framing += self.message_framing("system")
            content += self.system
        for group in layout.pinned:
            content += sum(self.content[i] for i in group)
            framing += sum(self.msg_framing[i] for i in group)
        return content, framing

    def context_overhead(self, layout: Layout) -> int:
        """Paid once when a chunk is kept: the header, and the query's label (string query)."""
        if layout.query_parts is None:
            return self.header + self.query_unit - self.query
        return self.header

    def wants(self, layout: Layout, budget_tokens: int) -> Wants:
        content, framing = self.fixed(layout)
        per = list(map(int.__add__, self.content, self.msg_framing))
        history = tuple(sum(map(per.__getitem__, group)) for group in layout.groups)
        chunks: tuple[int | None, ...] = self.chunk
        if any(layout.excluded):  # duplicates and empty chunks are not candidates
            chunks = tuple(
                None if why is not None else cost
                for cost, why in zip(self.chunk, layout.excluded, strict=True)
            )
        return Wants(
            budget=budget_tokens,
            fixed=content + framing,
            history=history,
            chunks=chunks,
            context_overhead=self.context_overhead(layout),
        )
