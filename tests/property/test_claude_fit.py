"""The confirm loop against a fake "true" tokenizer that differs from the estimator.

Truth: ceil(bytes / 3.3 * noise) per item with a per-item noise in [0.9, 1.1], plus framing
(7 per request, 5 per item). Estimator: ceil(bytes / 4.2 * its own noise) per item and
different framing guesses (3 per request, 4 per item). The allocator packs items first-fit in
priority order; item 0 (the query) is mandatory.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.count.claude_estimate import ClaudeEstimate, Family, RatioLearner
from worker.count.claude_fit import (
    Confirmed,
    FitNotConfirmed,
    FitPolicy,
    apportion,
    fit_confirmed,
)

FAMILY = "fake"
PRIORS = {FAMILY: Family(prior_ratio=1.0, prior_margin=0.15)}


@dataclass(frozen=True)
class Item:
    size: int  # bytes
    true_noise: float
    local_noise: float

    @property
    def true(self) -> int:
        return math.ceil(self.size / 3.3 * self.true_noise) + 5

    @property
    def local(self) -> int:
        return math.ceil(self.size / 4.2 * self.local_noise)


LOCAL_FIXED_REQUEST, LOCAL_FIXED_ITEM = 3, 4


def make_items(rng: random.Random, n: int, lo: int, hi: int) -> list[Item]:
    return [
        Item(rng.randint(lo, hi), rng.uniform(0.9, 1.1), rng.uniform(0.95, 1.05)) for _ in range(n)
    ]


def est_of(items: list[Item], kept: tuple[int, ...]) -> ClaudeEstimate:
    return ClaudeEstimate(
        text=sum(items[i].local for i in kept),
        fixed=LOCAL_FIXED_REQUEST + LOCAL_FIXED_ITEM * len(kept),
    )


def true_of(items: list[Item], kept: tuple[int, ...]) -> int:
    return 7 + sum(items[i].true for i in kept)


class Workload:
    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.calls = 0

    def allocate(self, target: int, ratio: float) -> tuple[int, ...]:
        kept: list[int] = []
        for i in range(len(self.items)):
            trial = (*kept, i)
            if est_of(self.items, trial).scaled(ratio) <= target:
                kept.append(i)
            elif i == 0:
                raise ValueError("the query alone does not fit")
        return tuple(kept)

    def dropped_any(self, plan: tuple[int, ...]) -> bool:
        return len(plan) < len(self.items)

    def estimate(self, plan: tuple[int, ...]) -> ClaudeEstimate:
        return est_of(self.items, plan)

    async def count(self, plan: tuple[int, ...]) -> int:
        self.calls += 1
        return true_of(self.items, plan)


async def fit(
    w: Workload, budget: int, learner: RatioLearner
) -> Confirmed[tuple[int, ...], tuple[int, ...]]:
    return await fit_confirmed(
        allocate=w.allocate,
        render=lambda plan: plan,
        estimate=w.estimate,
        count=w.count,
        dropped_any=w.dropped_any,
        budget=budget,
        learner=learner,
        family=FAMILY,
        policy=FitPolicy(),
    )


@settings(max_examples=80)
@given(
    seed=st.integers(0, 2**32 - 1),
    budget=st.integers(2_000, 60_000),
    n=st.integers(1, 300),
    prior=st.floats(0.5, 2.5),
    warm=st.booleans(),
)
def test_never_over_budget_and_uses_it_when_dropping(
    seed: int, budget: int, n: int, prior: float, warm: bool
) -> None:
    rng = random.Random(seed)
    learner = RatioLearner({FAMILY: Family(prior_ratio=prior, prior_margin=0.1)}, min_samples=3)
    hi = max(20, int(budget * 0.03 * 3.3))  # realistic items: each at most ~3% of the budget
    for _ in range(10 if warm else 1):
        w = Workload(make_items(rng, n, 20, hi))
        try:
            got = asyncio.run(fit(w, budget, learner))
        except (ValueError, FitNotConfirmed):
            # Only acceptable when the mandatory query cannot fit.
            assert true_of(w.items, (0,)) > budget * 0.9
            continue
        assert got.tokens == true_of(w.items, got.plan) <= budget
        assert got.count_calls == w.calls <= FitPolicy().max_rounds
        if w.dropped_any(got.plan):
            assert got.tokens >= 0.95 * budget


def test_calls_per_fit_after_warm_up_and_the_ratio_converges() -> None:
    rng = random.Random(11)
    learner = RatioLearner(PRIORS)
    calls: list[int] = []
    used: list[float] = []
    for k in range(200):
        budget = rng.randint(8_000, 100_000)
        w = Workload(make_items(rng, rng.randint(20, 400), 100, 4000))
        got = asyncio.run(fit(w, budget, learner))
        assert got.tokens <= budget
        if k >= 20:
            calls.append(got.count_calls)
            if w.dropped_any(got.plan):
                used.append(got.tokens / budget)
    assert statistics.mean(calls) <= 1.3
    assert used and min(used) >= 0.95
    # Converged: the learned ratio predicts fresh payloads' true counts within a few percent.
    errors = []
    for _ in range(50):
        items = make_items(rng, rng.randint(50, 300), 100, 4000)
        kept = tuple(range(len(items)))
        predicted = est_of(items, kept).scaled(learner.ratio(FAMILY))
        errors.append(abs(predicted - true_of(items, kept)) / true_of(items, kept))
    assert statistics.mean(errors) < 0.03


def test_a_cold_wrong_prior_costs_rounds_not_overruns() -> None:
    learner = RatioLearner({FAMILY: Family(prior_ratio=0.3, prior_margin=0.0)})
    rng = random.Random(5)
    w = Workload(make_items(rng, 200, 100, 2000))
    got = asyncio.run(fit(w, 20_000, learner))
    assert got.tokens <= 20_000
    assert got.count_calls >= 2  # the prior was far too low: the first payload was over


def test_raises_when_nothing_can_be_confirmed() -> None:
    learner = RatioLearner(PRIORS)

    async def always_over(plan: tuple[int, ...]) -> int:
        return 10**9

    with pytest.raises(FitNotConfirmed):
        asyncio.run(
            fit_confirmed(
                allocate=lambda target, ratio: (0,) if target > 0 else (),
                render=lambda plan: (plan, id(plan)),
                estimate=lambda payload: ClaudeEstimate(100, 0),
                count=lambda payload: always_over(payload[0]),
                dropped_any=lambda plan: True,
                budget=1000,
                learner=learner,
                family=FAMILY,
            )
        )


@given(
    parts=st.dictionaries(
        st.sampled_from(["system", "history", "context", "query", "framing"]),
        st.tuples(st.integers(0, 10_000), st.integers(0, 500)),
        max_size=5,
    ),
    total=st.integers(0, 200_000),
    ratio=st.floats(0.2, 3.0),
)
def test_apportioned_slots_add_up_to_the_confirmed_total(
    parts: dict[str, tuple[int, int]], total: int, ratio: float
) -> None:
    ests = {k: ClaudeEstimate(t, f) for k, (t, f) in parts.items()}
    got = apportion(ests, total, ratio)
    assert set(got) == set(parts)
    if parts:
        assert sum(got.values()) == total
    assert all(v >= 0 for v in got.values())
    # Bigger estimates never get fewer tokens than smaller ones (beyond rounding).
    for a in ests:
        for b in ests:
            if ests[a].text * ratio + ests[a].fixed > ests[b].text * ratio + ests[b].fixed:
                assert got[a] >= got[b] - 1


def test_an_async_estimate_is_awaited() -> None:
    rng = random.Random(9)
    w = Workload(make_items(rng, 100, 100, 1000))

    async def estimate(plan: tuple[int, ...]) -> ClaudeEstimate:
        await asyncio.sleep(0)
        return w.estimate(plan)

    got = asyncio.run(
        fit_confirmed(
            allocate=w.allocate,
            render=lambda plan: plan,
            estimate=estimate,
            count=w.count,
            dropped_any=w.dropped_any,
            budget=5000,
            learner=RatioLearner(PRIORS),
            family=FAMILY,
        )
    )
    assert got.tokens == true_of(w.items, got.plan) <= 5000
    assert got.estimate == w.estimate(got.plan)
