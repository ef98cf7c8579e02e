"""Invariants of the cache-stable cut over consecutive turns of a growing conversation."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from worker.engine.stable_cut import greedy_first_kept, grid_first_kept, stable_cut

COSTS = st.lists(st.integers(0, 3_000), max_size=60)


def reference_cut(costs: list[int], budget: int, block: int) -> int:
    """Brute force from the definition: grid point k is the first exchange starting at or
    after k*block; take the smallest k whose suffix fits."""
    total = sum(costs)
    for k in range(total // block + 2):
        start, i = 0, 0
        while i < len(costs) and start < k * block:
            start += costs[i]
            i += 1
        if total - start <= budget:
            return i
    raise AssertionError("the empty suffix always fits")


@given(costs=COSTS, budget=st.integers(0, 20_000), block=st.integers(1, 8_000))
def test_matches_the_definition(costs: list[int], budget: int, block: int) -> None:
    assert grid_first_kept(costs, budget, block) == reference_cut(costs, budget, block)


@given(
    costs=COSTS,
    budget=st.integers(0, 20_000),
    block=st.integers(1, 8_000),
    head=st.integers(0, 2_000),
)
def test_consecutive_turns(costs: list[int], budget: int, block: int, head: int) -> None:
    prev_first, prev_kept_ids, moves = 0, range(0), 0
    for turn in range(1, len(costs) + 1):
        history = costs[:turn]
        cut = stable_cut(history, budget, block, head_tokens=head)
        kept_ids = range(cut.first_kept, turn)
        # never over budget, never more than greedy keeps
        assert cut.kept_tokens == sum(history[cut.first_kept :]) <= budget
        assert cut.kept_tokens <= cut.greedy_kept_tokens
        # the cut only moves forward, and only when the history no longer fits
        assert cut.first_kept >= prev_first
        moved = prev_first < min(cut.first_kept, turn - 1)  # a kept exchange is dropped
        assert cut.cut_moved == moved
        if moved:
            moves += 1
            assert sum(history[prev_first:]) > budget
            assert cut.prefix_tokens == head
        else:
            # the kept prefix is unchanged: last turn's kept exchanges open this one's
            assert list(kept_ids[: len(prev_kept_ids)]) == list(prev_kept_ids)
            expected = head + sum(history[cut.first_kept : turn - 1])
            assert cut.prefix_tokens == (expected if kept_ids else head)
        # the price of stability is bounded
        assert cut.stability_cost < block + max(history) or cut.stability_cost == 0
        prev_first, prev_kept_ids = cut.first_kept, kept_ids
    # every move crosses at least one grid line
    assert moves <= sum(costs) // block + 1


@given(
    costs=st.lists(st.integers(0, 1_000), max_size=80),
    budget=st.integers(16_000, 64_000),
    data=st.data(),
)
def test_keeps_a_stated_fraction_of_greedy(
    costs: list[int], budget: int, data: st.DataObject
) -> None:
    """With a block of at most 1/8 of the budget and exchanges of at most 1/16 of it, the
    stable cut keeps at least 13/16 of what greedy keeps."""
    block = data.draw(st.integers(1, budget // 8))
    for turn in range(len(costs) + 1):
        cut = stable_cut(costs[:turn], budget, block)
        assert Fraction(cut.kept_tokens) >= Fraction(13, 16) * cut.greedy_kept_tokens


@given(costs=COSTS, budget=st.integers(0, 20_000))
def test_greedy_is_the_longest_fitting_suffix(costs: list[int], budget: int) -> None:
    first = greedy_first_kept(costs, budget)
    assert sum(costs[first:]) <= budget
    assert first == 0 or sum(costs[first - 1 :]) > budget
