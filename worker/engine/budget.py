"""Budget numbers and policy of one request: model limits, profile shares, overrides."""

from __future__ import annotations

from worker.catalog import ModelInfo, Profile
from worker.engine.plan import Policy
from worker.engine.pricing import affordable_input_tokens
from worker.engine.request import AssemblyRequest
from worker.engine.stable_cut import block_for
from worker.errors import InvalidRequest, OverBudget
from worker.values import value


@value
class Budget:
    max_context_tokens: int
    output_reserve: int
    budget_tokens: int
    """What the input may use: window minus reserve, never past the model's input cap
    nor past what `max_input_cost` pays for."""
    cost_cap_tokens: int | None = None
    """Input tokens `budget.max_input_cost` pays for at the uncached rate (None: no cap)."""
    asked_window: int | None = None
    """`budget.max_context_tokens` when it was over the model's window and so not used."""


def budget_for(req: AssemblyRequest, info: ModelInfo, profile: Profile) -> Budget:
    spec = req.budget
    window = info.context_window
    asked = None
    if spec.max_context_tokens is not None:
        # The caller's cap can only lower the model's window: a payload fitted to a larger
        # one would be refused by the provider. Fitted to the window and said (an alert).
        if spec.max_context_tokens > window:
            asked = spec.max_context_tokens
        else:
            window = spec.max_context_tokens
    if spec.output_reserve is not None:
        reserve = spec.output_reserve
    else:
        reserve = min(round(window * profile.shares.output), info.max_output)
    if reserve >= window:
        raise OverBudget(
            f"output_reserve {reserve} leaves nothing of the {window}-token context window"
        )
    usable = window - reserve
    if info.max_input is not None:
        usable = min(usable, info.max_input)
    cap = None
    if spec.max_input_cost is not None:
        if info.prices is None:
            raise InvalidRequest(
                f"budget.max_input_cost needs prices for {req.model}: add `prices` to its "
                "row in config/models.yaml"
            )
        # nothing assumed cached: the cap holds even when the provider's cache misses
        cap = affordable_input_tokens(info.prices, spec.max_input_cost)
        usable = min(usable, cap)
    return Budget(window, reserve, usable, cap, asked)


def policy_for(req: AssemblyRequest, profile: Profile, budget: Budget) -> Policy:
    shares = profile.shares
    over = req.budget.slots
    history_share = over.history if over and over.history is not None else shares.history
    context_share = over.context if over and over.context is not None else shares.context
    window = budget.max_context_tokens
    return Policy(
        history_cap=int(window * history_share),
        context_cap=int(window * context_share),
        priority=profile.priority,
        reflow=profile.reflow if req.budget.reflow is None else req.budget.reflow,
        truncate=(
            profile.truncate_chunks
            if req.budget.truncate_chunks is None
            else req.budget.truncate_chunks
        ),
        min_truncate_tokens=profile.min_truncate_tokens,
        stable_block=(
            block_for(window, profile.history_block_share) if stable_history(req, profile) else None
        ),
    )


def stable_history(req: AssemblyRequest, profile: Profile) -> bool:
    """Cache-stable history cut: the request's choice, else the profile's."""
    chosen = req.budget.stable_history
    return profile.stable_history if chosen is None else chosen


def system_share(req: AssemblyRequest, profile: Profile) -> float:
    over = req.budget.slots
    return over.system if over and over.system is not None else profile.shares.system


def alert_threshold(req: AssemblyRequest, profile: Profile) -> float:
    return req.budget.alert_threshold or profile.alert_threshold
