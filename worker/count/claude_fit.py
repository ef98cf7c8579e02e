"""Fit a Claude payload on a local estimate, confirmed by (about) one count_tokens call.

The loop is generic: it knows nothing of the engine's plans or payloads, only the callables
it is given. It allocates on the learned *safe* ratio (estimate scaled by a high quantile of
the ratios seen), renders, and confirms once. The confirmation also gives the ratio of this
very payload, which predicts its own variations far better than the family's spread, so:

- over budget (rare): re-allocate with that ratio, aiming a hair under the budget, and
  confirm again; each further round shrinks the target by the measured excess;
- far under budget while something was dropped: re-allocate with that ratio to take back
  what fits, confirm, and keep it only if the confirmation says it fits (bounded rounds);
- otherwise done.

Never returns a payload whose confirmed count is over the budget. Every confirmation feeds
the learner, so later fits start closer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from worker.count.claude_estimate import ClaudeEstimate, RatioLearner
from worker.values import value

P = TypeVar("P")
Y = TypeVar("Y")


class FitNotConfirmed(Exception):
    """No allocation could be confirmed under the budget within the rounds allowed."""


@value
class Confirmed(Generic[P, Y]):
    """The fitted plan, its payload, and the API's count of that payload."""

    plan: P
    payload: Y
    tokens: int
    """The confirmed count of ``payload`` (never over the budget)."""
    estimate: ClaudeEstimate
    """The local estimate of ``payload``: apportion per-slot usage from it."""
    ratio: float
    """This payload's confirmed / estimated text ratio (the learner's, if it has no text)."""
    count_calls: int
    """How many times ``count`` was awaited (a digest-cache hit inside it still counts)."""
    rounds: int
    """The round that produced the returned payload (1 = the first confirmation)."""


@value
class FitPolicy:
    """Knobs of the confirm loop; the defaults meet issue 11's goals in the property tests."""

    aim: float = 0.99
    """After an overrun, re-allocations aim at this fraction of the budget."""
    take_back_aim: float = 1.0
    """Take-backs aim at this fraction: the result is confirmed anyway, and an overshoot only
    costs the call (the confirmed plan before it is kept)."""
    take_back_below: float = 0.95
    """Under this fraction of the budget with something dropped: try to take back."""
    max_rounds: int = 4
    """Count calls per fit at most (the usual fit makes one)."""
    max_take_back_rounds: int = 2


async def fit_confirmed(
    *,
    allocate: Callable[[int, float], P],
    render: Callable[[P], Y],
    estimate: Callable[[Y], ClaudeEstimate | Awaitable[ClaudeEstimate]],
    count: Callable[[Y], Awaitable[int]],
    dropped_any: Callable[[P], bool],
    budget: int,
    learner: RatioLearner,
    family: str,
    key: bytes | None = None,
    policy: FitPolicy = FitPolicy(),
) -> Confirmed[P, Y]:
    """Allocate, render and confirm until the confirmed count fits ``budget``.

    ``allocate(target, ratio)`` must return a plan whose predicted cost, each text's local
    count times ``ratio`` plus fixed costs (``ClaudeEstimate.scaled``), is at most
    ``target``; it may raise when nothing fits (the error propagates). ``render`` builds the
    payload, ``estimate`` its local estimate (sync, or async to run a large tokenization
    off the event loop; cheapest is the sum of the per-piece costs the allocator already
    has), ``count`` its confirmed count. ``key`` (a
    ``conversation_key``) lets a conversation's next turn start from its last turn's ratio.

    Targets are in true (API) tokens; after each confirmation ``ratio`` becomes the last
    payload's own ratio, which calibrates the next allocation on content that is mostly the
    same. An overrun shrinks the target by the measured excess; a take-back never aims at or
    above a target that already overran.
    """
    hinted = learner.hinted_ratio(family, key) if key is not None else None
    ratio = hinted or learner.safe_ratio(family)
    aimed = math.floor(budget * policy.aim)
    take_back = math.floor(budget * policy.take_back_aim)
    target = budget
    over_target: int | None = None  # the smallest target whose payload overran
    best: Confirmed[P, Y] | None = None
    calls = take_backs = 0
    seen: list[Y] = []
    while calls < policy.max_rounds:
        plan = allocate(target, ratio)
        payload = render(plan)
        if payload in seen:
            break  # the allocator came back to a payload already confirmed: no progress
        seen.append(payload)
        got = estimate(payload)
        est = await got if inspect.isawaitable(got) else got
        tokens = await count(payload)
        calls += 1
        learner.observe(family, est, tokens, key)
        observed = est.ratio_of(tokens)
        if observed is not None and observed > 0:
            ratio = observed
        if tokens > budget:
            # The first overrun ran on the family's ratio: with the ratio now calibrated on
            # this payload, aim a hair under the budget. Later overruns ran on a calibrated
            # ratio already: shrink by the measured excess, so each round makes progress.
            calibrated = over_target is not None or best is not None
            over_target = target if over_target is None else min(over_target, target)
            if calibrated:
                target = min(aimed, target - (tokens - budget), over_target - 1)
            else:
                target = aimed
            if target <= 0:
                break
            continue
        if best is None or tokens > best.tokens:
            best = Confirmed(plan, payload, tokens, est, ratio, calls, calls)
        if (
            not dropped_any(plan)
            or tokens >= policy.take_back_below * budget
            or take_backs >= policy.max_take_back_rounds
        ):
            break
        nxt = take_back
        if over_target is not None:
            nxt = min(take_back, over_target - 1)
            if nxt <= target:
                nxt = (target + over_target) // 2  # between what fitted and what overran
            if nxt <= target:
                break
        take_backs += 1
        target = nxt
    if best is None:
        raise FitNotConfirmed(
            f"no allocation confirmed under {budget} tokens after {calls} count call(s)"
        )
    return Confirmed(
        best.plan, best.payload, best.tokens, best.estimate, best.ratio, calls, best.rounds
    )


def apportion(parts: Mapping[str, ClaudeEstimate], total: int, ratio: float) -> dict[str, int]:
    """Split a confirmed total over slots in proportion to their scaled estimates.

    Per-piece counts no longer come from the API, so per-slot usage is apportioned from the
    local estimate (and must be reported as such); the slots add up to ``total`` exactly
    (largest remainders), so the total stays the API's count.

    >>> apportion({"system": ClaudeEstimate(10, 2), "history": ClaudeEstimate(30, 18)}, 60, 1.0)
    {'system': 12, 'history': 48}
    """
    if total < 0:
        raise ValueError("total must be >= 0")
    weights = {k: max(0.0, e.text * ratio + e.fixed) for k, e in parts.items()}
    mass = sum(weights.values())
    if not parts:
        return {}
    if mass <= 0:
        weights = dict.fromkeys(parts, 1.0)
        mass = float(len(parts))
    shares = {k: total * w / mass for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in shares.items()}
    left = total - sum(out.values())
    for k in sorted(shares, key=lambda k: out[k] - shares[k])[:left]:
        out[k] += 1
    return out
