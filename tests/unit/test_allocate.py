"""The budget decision, with counted items only: no tokenizer, no Kafka."""

from __future__ import annotations

import pytest

from worker.engine.allocate import allocate
from worker.engine.plan import DropReason, Policy, Wants
from worker.errors import OverBudget


def wants(**kw: object) -> Wants:
    base: dict[str, object] = {"budget": 1000, "fixed": 100, "history": (), "chunks": ()}
    base.update(kw)
    return Wants(**base)  # type: ignore[arg-type]


def policy(**kw: object) -> Policy:
    base: dict[str, object] = {"history_cap": 300, "context_cap": 550}
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def test_fixed_part_over_budget_is_an_error_not_a_cut() -> None:
    with pytest.raises(OverBudget, match="need 1001 tokens"):
        allocate(wants(fixed=1001), policy())


def test_history_is_kept_newest_first_and_contiguous() -> None:
    # oldest ... newest; the 2nd newest (250) does not fit the 300 cap after the newest (100)
    plan = allocate(wants(history=(10, 10, 250, 100)), policy(reflow=False))
    assert plan.history_kept == 1
    dropped = [(d.index, d.reason) for d in plan.dropped]
    # the two small, older exchanges are not kept past the gap: no holes in a conversation
    assert dropped == [
        (0, DropReason.HISTORY_BUDGET),
        (1, DropReason.HISTORY_BUDGET),
        (2, DropReason.HISTORY_BUDGET),
    ]


def test_chunk_that_does_not_fit_is_skipped_and_smaller_later_ones_still_fit() -> None:
    plan = allocate(wants(chunks=(300, 400, 200, 50)), policy(reflow=False))
    assert plan.chunks_kept == (0, 2, 3)
    assert [(d.index, d.tokens) for d in plan.dropped] == [(1, 400)]


def test_unused_budget_reflows_to_history_when_enabled() -> None:
    w = wants(history=(200, 200, 200), chunks=(100,))
    assert allocate(w, policy(reflow=False)).history_kept == 1
    plan = allocate(w, policy(reflow=True))
    assert plan.history_kept == 3
    assert plan.total == 100 + 600 + 100


def test_priority_decides_who_fills_first_and_who_gets_the_reflow() -> None:
    w = wants(budget=700, history=(300, 300), chunks=(300, 300))
    ctx_first = allocate(
        w, policy(history_cap=600, context_cap=600, priority=("context", "history"))
    )
    hist_first = allocate(
        w, policy(history_cap=600, context_cap=600, priority=("history", "context"))
    )
    assert (ctx_first.chunks_kept, ctx_first.history_kept) == ((0, 1), 0)
    assert (hist_first.chunks_kept, hist_first.history_kept) == ((), 2)


def test_context_overhead_is_paid_once_when_any_chunk_is_kept() -> None:
    plan = allocate(wants(chunks=(100, 100), context_overhead=15), policy())
    assert plan.context_tokens == 215
    none = allocate(wants(chunks=(600,), context_overhead=15), policy(reflow=False))
    assert none.context_tokens == 0


def test_excluded_chunks_are_left_to_the_caller() -> None:
    plan = allocate(wants(chunks=(100, None, 50)), policy())
    assert plan.chunks_kept == (0, 2)
    assert plan.dropped == ()


def test_truncation_fills_what_is_left_with_the_best_misfit() -> None:
    plan = allocate(wants(chunks=(500, 400, 20)), policy(truncate=True, min_truncate_tokens=10))
    assert plan.truncation is not None
    assert plan.truncation.index == 1
    assert plan.total == 1000
    assert 1 in plan.chunks_kept


def test_no_truncation_below_the_minimum() -> None:
    plan = allocate(
        wants(budget=620, chunks=(500, 400)), policy(truncate=True, min_truncate_tokens=64)
    )
    assert plan.truncation is None
    assert plan.chunks_kept == (0,)


@pytest.mark.parametrize(
    ("budget", "expected_kept"),
    [(130, 0), (150, 1), (1000, 3)],
    ids=["nothing-fits", "one-fits", "all-fit"],
)
def test_packing_by_budget(budget: int, expected_kept: int) -> None:
    plan = allocate(wants(budget=budget, fixed=100, history=(50, 50, 50)), policy(history_cap=1000))
    assert plan.history_kept == expected_kept
    assert plan.total <= budget
