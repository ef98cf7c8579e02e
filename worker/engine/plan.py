"""Value types of the allocation: what is asked (counted items, policy) and what is granted.

Pure data: no Kafka, OpenTelemetry, asyncio or I/O here or in `allocate.py`.
"""

from __future__ import annotations

from enum import StrEnum

from worker.catalog import SlotName
from worker.values import value


class DropReason(StrEnum):
    """Why an item is not in the fitted context; every drop is reported, none is silent."""

    HISTORY_BUDGET = "history_budget"
    """The exchange (or a newer one) did not fit; history is kept as a contiguous newest part."""
    CONTEXT_BUDGET = "context_budget"
    """The chunk did not fit in what was left after better-ranked chunks."""
    DUPLICATE = "duplicate"
    """Same text as a better-ranked chunk: sent once."""
    EMPTY = "empty"
    """Nothing but whitespace: it would cost framing tokens for no content."""
    CACHE_STABLE_CUT = "cache_stable_cut"
    """The exchange would have fit, but history is cut only on the cache-stable grid, so
    the kept prefix stays identical to the previous turn's (see `stable_cut.py`)."""


@value
class Policy:
    """How a budget is split; built from a profile and the request's overrides."""

    history_cap: int
    """Most tokens history may take before reflow."""
    context_cap: int
    """Most tokens retrieved context may take before reflow."""
    priority: tuple[SlotName, ...] = ("context", "history")
    """Which slot fills first, and first to receive reflowed budget."""
    reflow: bool = True
    """Budget a slot leaves unused flows to the other slot."""
    truncate: bool = False
    """Cut the best chunk that did not fit at a token boundary to fill what is left."""
    min_truncate_tokens: int = 64
    stable_block: int | None = None
    """Cut history only on a grid of this many tokens from the conversation's start, so the
    kept prefix stays put across turns (None: newest-first greedy, today's trimming)."""


@value
class Wants:
    """Counted items, in tokens, ready to allocate."""

    budget: int
    """Input tokens available: context window minus output reserve (and any input cap)."""
    fixed: int
    """System prompt, query and the framing that is paid whatever else is kept."""
    history: tuple[int, ...]
    """Cost of each exchange (a user turn with its replies and tool results), oldest first."""
    chunks: tuple[int | None, ...]
    """Cost of each chunk in relevance order; None for one excluded before allocation
    (a duplicate or an empty chunk), which the caller reports."""
    context_overhead: int = 0
    """Paid once when at least one chunk is kept (the context header, the query's label)."""


@value
class Drop:
    slot: SlotName
    index: int
    tokens: int
    reason: DropReason


@value
class Truncation:
    index: int
    """The chunk to cut."""
    tokens: int
    """Most tokens its rendered unit may take after the cut."""


@value
class HistoryCut:
    """Where history was cut and what the next provider cache can expect from it."""

    stable: bool
    """Cut on the cache-stable grid (True) or newest-first (False)."""
    block: int | None
    grant: int
    """Tokens history could have used: what it took plus what was left unused."""
    shared_tokens: int
    """Kept history tokens the previous turn (this history without its newest exchange,
    same grant) also sent, right after the head: the expected cached part of history."""
    cut_moved: bool
    """The previous turn kept an exchange this turn drops: only the head is shared."""
    stability_cost: int
    """History tokens given up for a stable prefix (greedy minus kept, 0 when greedy)."""


@value
class Plan:
    """The allocation: which items are kept, and why the others are not."""

    budget: int
    fixed: int
    history_kept: int
    """How many of the newest exchanges are kept."""
    chunks_kept: tuple[int, ...]
    """Indices of kept chunks, in relevance order."""
    history_tokens: int
    context_tokens: int
    """Including the context overhead when any chunk is kept."""
    dropped: tuple[Drop, ...]
    truncation: Truncation | None = None
    cut: HistoryCut | None = None

    @property
    def total(self) -> int:
        return self.fixed + self.history_tokens + self.context_tokens
