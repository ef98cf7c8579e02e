"""The cost sheet of one message, before counting (see `worker.engine.bills`).

Its own module so a plain-text request never imports the provider models behind `bills`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Bill:
    """Not frozen: one is built per message of every request, and a frozen init costs."""

    role: str
    content: tuple[str, ...] = ()
    """Texts counted in the message's own slot (history, query or tools)."""
    framing: tuple[str, ...] = ()
    """Texts counted as framing (a name, a tool_call_id)."""
    named: bool = False
    content_extra: int = 0
    """Tokens of the slot from stated rules: images, documents, per-call overheads."""
    framing_extra: int = 0
    inexact: tuple[str, ...] = ()

    def texts(self) -> list[str]:
        return [*self.content, *self.framing]
