"""Cache-stable history trimming: cut the oldest exchanges only at points on a fixed grid.

A provider's prompt cache pays for the longest prefix a request shares with an earlier one
(PAYLOADS.md §1.5, §2.4). Keeping "the newest exchanges that fit" moves the cut at nearly
every turn once history is full, so the prompt changes right after the system prompt and
everything after it is billed in full, every turn (the cache-thrash reports of §3.6).

Here the cut may only fall on a *grid point*: the first exchange that starts at or after a
multiple of `block` tokens, counted from the start of the conversation. Old exchanges never
change, so grid points never move; the cut is the first grid point whose suffix fits the
budget. It therefore stays put, turn after turn, until the history no longer fits, then jumps
by at least one block, leaving room for the next turns. Nothing but the request is read, so
every worker of a fleet takes the same decision with no shared state.

Cost: the stable cut keeps fewer tokens than the newest-first greedy, by less than
`block` plus the largest exchange (`StableCut.stability_cost`).
Pure: no I/O, no imports from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from worker.values import value


@value
class StableCut:
    """Where history is cut, and what that keeps compared with the greedy cut."""

    first_kept: int
    """Index of the oldest kept exchange (== number of exchanges dropped)."""
    kept: int
    """How many of the newest exchanges are kept (the allocator's `history_kept`)."""
    kept_tokens: int
    """Tokens of the kept exchanges."""
    greedy_kept_tokens: int
    """What newest-first greedy keeps under the same budget."""
    prefix_tokens: int
    """Tokens at the start of this payload expected to be identical to the previous turn's:
    `head_tokens`, plus the kept history the previous turn also sent, if its cut was the
    same (the newest exchange is new in this turn)."""
    cut_moved: bool
    """True when the previous turn (this history without its newest exchange, same budget)
    kept an exchange this turn drops: only the head is expected to be shared then."""
    greedy_first: int = 0
    """Where the newest-first greedy cut falls under the same budget."""

    @property
    def stability_cost(self) -> int:
        """History tokens given up for a stable prefix (greedy minus kept, never negative)."""
        return self.greedy_kept_tokens - self.kept_tokens


def greedy_first_kept(costs: Sequence[int], budget: int) -> int:
    """The newest-first greedy cut: index of the oldest exchange in the longest newest
    suffix that fits `budget` (what the allocator does today).

    >>> greedy_first_kept([30, 30, 30], 70)
    1
    """
    used, first = 0, len(costs)
    while first > 0 and used + costs[first - 1] <= budget:
        first -= 1
        used += costs[first]
    return first


def grid_first_kept(costs: Sequence[int], budget: int, block: int) -> int:
    """The first grid point (first exchange starting at or after k*block, k = 0, 1, ...)
    whose suffix fits `budget`.

    >>> grid_first_kept([400, 400, 400, 400], budget=1000, block=500)
    2
    """
    if block <= 0:
        raise ValueError("block must be a positive number of tokens")
    if budget < 0 or (costs and min(costs) < 0):
        raise ValueError("a budget and exchange costs cannot be negative")
    starts = [0, *accumulate(costs)]  # starts[i]: offset of exchange i; starts[n]: total
    total, i = starts[-1], 0
    while total - starts[i] > budget:
        line = (starts[i] // block + 1) * block  # the next grid line past exchange i's start
        while i < len(costs) and starts[i] < line:
            i += 1
    return i


def stable_cut(costs: Sequence[int], budget: int, block: int, head_tokens: int = 0) -> StableCut:
    """Cut history (per-exchange costs, oldest first) on the grid of `block` tokens so the
    kept part fits `budget`; `head_tokens` is what precedes history (tools, system prompt
    and their framing), counted in `prefix_tokens`.

    >>> cut = stable_cut([400, 400, 400, 400], budget=1000, block=500, head_tokens=50)
    >>> cut.kept, cut.kept_tokens, cut.greedy_kept_tokens, cut.prefix_tokens, cut.cut_moved
    (2, 800, 800, 450, False)
    """
    first = grid_first_kept(costs, budget, block)
    previous = grid_first_kept(costs[:-1], budget, block) if costs else 0
    return _cut(costs, budget, first, previous, head_tokens)


def greedy_cut(costs: Sequence[int], budget: int, head_tokens: int = 0) -> StableCut:
    """Today's newest-first cut described like `stable_cut`, so both report the prefix
    they share with the previous turn (greedy moves its cut at nearly every full turn).

    >>> cut = greedy_cut([400, 400, 400, 400], budget=1000, head_tokens=50)
    >>> cut.kept, cut.prefix_tokens, cut.cut_moved
    (2, 50, True)
    """
    first = greedy_first_kept(costs, budget)
    previous = greedy_first_kept(costs[:-1], budget) if costs else 0
    return _cut(costs, budget, first, previous, head_tokens)


def _cut(
    costs: Sequence[int], budget: int, first: int, previous: int, head_tokens: int
) -> StableCut:
    n = len(costs)
    kept_tokens = sum(costs[first:])
    greedy = greedy_first_kept(costs, budget)
    # moved: the previous turn kept an exchange this one drops (an empty history that
    # stays empty is no move, though its end index grows)
    moved = n > 0 and previous < min(first, n - 1)
    shared = 0 if n == 0 or first == n or moved else kept_tokens - costs[-1]
    return StableCut(
        first_kept=first,
        kept=n - first,
        kept_tokens=kept_tokens,
        greedy_kept_tokens=sum(costs[greedy:]),
        prefix_tokens=head_tokens + shared,
        cut_moved=moved,
        greedy_first=greedy,
    )


def block_for(basis: int, share: float) -> int:
    """The grid's block: `share` of a number fixed for the whole conversation (the window,
    `max_context_tokens`), never of this turn's reflowed grant, so the grid stays put.

    >>> block_for(10_000, 0.3)
    3000
    """
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1]")
    return max(1, round(basis * share))
