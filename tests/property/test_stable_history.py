"""The cache-stable history cut through the engine, over the turns of one conversation.

Each turn resends the whole history plus the newest exchange, with the same system prompt
and query, so the history's grant is the same every turn and the stable cut's promises
can be read off the results alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support.contract import assert_result_contract
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult

EXCHANGES = st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400)), min_size=2, max_size=14)


def turns(
    sizes: list[tuple[int, int]], stable: bool | None, **budget: Any
) -> list[AssemblyRequest]:
    """One request per turn: turn t sends exchanges 0..t-1 as history (words are unique per
    exchange, so any two payloads differ where their histories differ)."""
    history: list[dict[str, str]] = []
    reqs = []
    for t, (ask, answer) in enumerate(sizes):
        reqs.append(
            AssemblyRequest.model_validate(
                {
                    "request_id": f"t{t}",
                    "model": "gpt-5",
                    "system": "You answer briefly. " * 20,
                    "history": list(history),
                    "query": "And then?",
                    "conversation_id": "c",
                    "budget": {"max_context_tokens": 3000, "stable_history": stable, **budget},
                }
            )
        )
        history.append({"role": "user", "content": f"q{t} " * ask})
        history.append({"role": "assistant", "content": f"a{t} " * answer})
    return reqs


def first_kept(req: AssemblyRequest, res: FitResult) -> int:
    """Index in `history` of the oldest turn sent."""
    sent = len(res.messages) - 2  # system and final user message
    return len(req.history) - sent


def payload(res: FitResult) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in res.messages]


@given(sizes=EXCHANGES)
def test_prefix_changes_only_when_the_cut_moves_and_moves_only_when_needed(
    make_engine: Callable[[], Engine], sizes: list[tuple[int, int]]
) -> None:
    reqs = turns(sizes, stable=True)
    with make_engine() as engine:
        results = engine.fit_many_sync(reqs)
        for result in results:
            assert_result_contract(result)
    for t in range(1, len(reqs)):
        prev, cur = results[t - 1], results[t]
        assert cur.status == "ok" and cur.usage is not None and cur.prompt_cache is not None
        was, now = first_kept(reqs[t - 1], prev), first_kept(reqs[t], cur)
        assert now >= was, "a cut never moves back"
        if now == was:
            # the previous payload, all but its final user message, starts this one
            assert payload(cur)[: len(prev.messages) - 1] == payload(prev)[:-1]
            assert not cur.prompt_cache.cut_moved
        else:
            # keeping the previous cut would not fit: put back what this turn dropped
            # since, and the budget is exceeded
            back = sum(
                d.tokens
                for d in cur.dropped
                if d.slot == "history" and d.index is not None and was <= d.index < now
            )
            assert cur.usage.total_tokens + back > cur.usage.budget_tokens
            assert cur.prompt_cache.cut_moved


@given(sizes=EXCHANGES)
def test_stability_costs_less_than_a_block_and_an_exchange(
    make_engine: Callable[[], Engine], sizes: list[tuple[int, int]]
) -> None:
    stable_reqs, greedy_reqs = turns(sizes, stable=True), turns(sizes, stable=False)
    with make_engine() as engine:
        stable = engine.fit_many_sync(stable_reqs)
        greedy = engine.fit_many_sync(greedy_reqs)
    for s, g in zip(stable, greedy, strict=True):
        assert s.usage is not None and g.usage is not None and s.prompt_cache is not None
        cache = s.prompt_cache
        assert cache.stable_history and cache.block_tokens is not None
        lost = g.usage.total_tokens - s.usage.total_tokens
        assert lost == cache.stability_cost_tokens >= 0
        biggest = max((d.tokens for d in g.dropped + s.dropped if d.slot == "history"), default=0)
        assert lost < cache.block_tokens + 2 * biggest + 1
        # exchanges the greedy cut keeps and the stable one does not say why
        kept_by_greedy = len(g.messages) - len(s.messages)
        stable_drops = [d for d in s.dropped if d.reason == "cache_stable_cut"]
        assert len(stable_drops) == kept_by_greedy
        assert all(d.reason == "history_budget" for d in g.dropped)
