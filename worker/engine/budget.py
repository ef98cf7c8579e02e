"""Budget numbers and policy of one request: model limits, profile shares, overrides."""

from __future__ import annotations

from dataclasses import dataclass

from worker.catalog import ModelInfo, Profile
from worker.engine.plan import Policy
from worker.engine.request import AssemblyRequest
from worker.errors import OverBudget


@dataclass(frozen=True, slots=True)
class Budget:
    max_context_tokens: int
    output_reserve: int
    budget_tokens: int
    """What the input may use: window minus reserve, never past the model's input cap."""


def budget_for(req: AssemblyRequest, info: ModelInfo, profile: Profile) -> Budget:
    spec = req.budget
    window = spec.max_context_tokens or info.context_window
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
    return Budget(window, reserve, usable)


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
    )


def system_share(req: AssemblyRequest, profile: Profile) -> float:
    over = req.budget.slots
    return over.system if over and over.system is not None else profile.shares.system


def alert_threshold(req: AssemblyRequest, profile: Profile) -> float:
    return req.budget.alert_threshold or profile.alert_threshold
