"""The result of a fit: usage per slot, what was dropped and why, alerts, error results.

Shared by every provider path, so a result means the same whatever counted it.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from worker.engine.budget import alert_threshold, system_share
from worker.engine.caching import annotate
from worker.engine.costs import Costs
from worker.engine.layout import Layout, Payload
from worker.engine.plan import Plan
from worker.engine.prepared import Prepared
from worker.engine.request import AssemblyRequest, Turn
from worker.engine.result import (
    Alert,
    CacheUse,
    DroppedItem,
    ErrorInfo,
    FitResult,
    Message,
    TruncatedItem,
    Usage,
)
from worker.errors import TokenheapError

_DROPPED = TypeAdapter(list[DroppedItem])
_MESSAGES = TypeAdapter(list[Message])
"""Rendered messages as result models: one validation call for the list costs a third of
building each with `model_construct` (Python-level, per field)."""


def build_result(
    p: Prepared,
    plan: Plan,
    costs: Costs,
    method: str,
    exact: bool,
    units: dict[int, str],
    truncated: list[TruncatedItem],
    use: CacheUse,
    confirmed: int | None = None,
) -> FitResult:
    """Usage from the counted pieces; a confirmed payload count replaces their sum
    (the difference is framing the count API does not itemise)."""
    layout, req = p.layout, p.req
    messages: list[Message | Turn]
    if layout.legacy and layout.provider == "openai":
        payload = Payload([])
        messages = list(layout.plain_messages(plan, units))
    else:
        payload = layout.render(plan, units)
        messages = _result_messages(layout, plan, payload)
    turn_ids = layout.turn_indices(plan.history_kept)
    if len(turn_ids) == len(costs.content):  # the whole history is kept
        history, turn_framing = sum(costs.content), sum(costs.msg_framing)
    else:
        history = sum(map(costs.content.__getitem__, turn_ids))
        turn_framing = sum(map(costs.msg_framing.__getitem__, turn_ids))
    context = 0
    if plan.chunks_kept:
        context = costs.context_overhead(layout) + sum(
            map(costs.chunk.__getitem__, plan.chunks_kept)
        )
    system = costs.system if layout.system else 0
    _, fixed_framing = costs.fixed(layout)
    pinned = [i for g in layout.pinned for i in g]
    framing = fixed_framing - sum(costs.msg_framing[i] for i in pinned) + turn_framing
    total = system + history + context + costs.query + costs.tools + framing
    inexact = list(layout.inexact)
    if confirmed is not None:
        framing += confirmed - total
        total = confirmed
        if exact:
            inexact = []  # the provider's own counter counted the whole payload
    usage = Usage(
        system=system,
        history=history,
        context=context,
        query=costs.query,
        framing=framing,
        tools=costs.tools,
        total_tokens=total,
        budget_tokens=p.budget.budget_tokens,
        output_reserve=p.budget.output_reserve,
        max_context_tokens=p.budget.max_context_tokens,
        utilization=round(total / p.budget.budget_tokens, 4),
    )
    dropped = _dropped(p, plan, costs)
    if not exact:
        inexact.append(f"count: {method}")
    result = FitResult(
        request_id=req.request_id,
        status="ok",
        model=req.model,
        provider=p.info.provider,
        profile=p.profile.name,
        count_method=method,
        exact=not inexact,
        inexact=inexact,
        system=payload.system,
        tools=payload.tools,
        tool_choice=payload.tool_choice,
        usage=usage,
        dropped=dropped,
        truncated=truncated,
        tenant=req.tenant,
        pipeline=req.pipeline,
        conversation_id=req.conversation_id,
        cache=use,
    )
    # Set after validation: these are the request's own validated turns (or messages the
    # renderer built), and checking each against the union again cost ~3x the whole model.
    result.messages = messages
    result.alerts.extend(request_alerts(p, usage, dropped, plan))
    annotate(p, plan, costs, result)  # post-render: cost and provider prompt-cache facts
    return result


def _result_messages(layout: Layout, plan: Plan, payload: Payload) -> list[Message | Turn]:
    """The payload's messages as result models. A remembered history message (OpenAI, see
    `engine.memo`) has its model made once and shared, as it is frozen: a conversation's
    resent history is not validated again on every turn. The rest in one call."""
    sent = payload.messages
    if not layout.remembered or layout.provider != "openai":
        return list(_MESSAGES.validate_python(sent))
    kept = layout.kept_indices(plan.history_kept)
    head = len(sent) - len(kept) - 1  # the system message (or none) before the history
    ends = _MESSAGES.validate_python([*sent[:head], sent[-1]])
    out: list[Message | Turn] = list(ends[:head])
    for i, message in zip(kept, sent[head:-1], strict=True):
        item = layout.remembered[i]
        model = item.message
        if model is None:
            model = item.message = Message.model_validate(message)
        out.append(model)
    out.append(ends[-1])
    return out


def _dropped(p: Prepared, plan: Plan, costs: Costs) -> list[DroppedItem]:
    """The drop manifest, validated in one call: a long conversation drops dozens of
    messages a request, and one call costs two thirds of building each model alone."""
    layout, req = p.layout, p.req
    out: list[dict[str, Any]] = []
    for d in plan.dropped:
        if d.slot == "history":
            group = layout.groups[d.index]
            # without pinned exchanges, the droppable ones are all of them, in order
            unit = layout.exchange_of(group) if layout.pinned else d.index
            reason = d.reason.value
            for i in group:
                tokens = costs.content[i] + costs.turn_framing(layout, i)
                out.append(
                    {
                        "slot": "history",
                        "index": i,
                        "unit": unit,
                        "tokens": tokens,
                        "reason": reason,
                    }
                )
        else:
            out.append(
                {
                    "slot": "context",
                    "id": req.chunks[d.index].id,
                    "index": d.index,
                    "tokens": d.tokens,
                    "reason": d.reason.value,
                }
            )
    for i, why in enumerate(layout.excluded):
        if why is not None:
            out.append(
                {
                    "slot": "context",
                    "id": req.chunks[i].id,
                    "index": i,
                    "tokens": costs.chunk[i],
                    "reason": why,
                }
            )
    return _DROPPED.validate_python(out) if out else []


def request_alerts(
    p: Prepared, usage: Usage, dropped: list[DroppedItem], plan: Plan
) -> list[Alert]:
    """Per-request alerts: high utilization, the best chunk lost, history cut short, a
    window asked for over the model's."""
    alerts: list[Alert] = []
    threshold = alert_threshold(p.req, p.profile)
    if usage.utilization >= threshold:
        alerts.append(
            Alert(
                type="utilization_high",
                message=f"{usage.total_tokens}/{usage.budget_tokens} input tokens used",
                value=usage.utilization,
                threshold=threshold,
            )
        )
    if any(d.slot == "context" and d.index == 0 and d.reason == "context_budget" for d in dropped):
        alerts.append(
            Alert(
                type="top_chunk_dropped",
                severity="critical",
                message=f"the best-ranked chunk {p.req.chunks[0].id!r} did not fit",
            )
        )
    groups = len(p.layout.groups) + len(p.layout.pinned)
    floor = min(p.profile.min_history_turns, groups)
    kept = plan.history_kept + len(p.layout.pinned)
    if kept < floor:
        alerts.append(
            Alert(
                type="history_below_min",
                message=f"{kept} of {groups} exchanges kept, profile wants {floor}",
                value=kept,
                threshold=floor,
            )
        )
    if p.budget.asked_window is not None:
        alerts.append(
            Alert(
                type="window_capped",
                message=f"budget.max_context_tokens {p.budget.asked_window} is over "
                f"{p.req.model}'s {p.budget.max_context_tokens}-token context window; "
                f"fitted to {p.budget.max_context_tokens}",
                value=p.budget.asked_window,
                threshold=p.budget.max_context_tokens,
            )
        )
    share = system_share(p.req, p.profile)
    if usage.system > share * usage.max_context_tokens:
        alerts.append(
            Alert(
                type="system_over_share",
                severity="info",
                message=f"system prompt takes {usage.system} tokens, over its "
                f"{share:.0%} share of the window",
                value=usage.system,
                threshold=share * usage.max_context_tokens,
            )
        )
    return alerts


def error_result(
    request_id: str, model: str, exc: TokenheapError, req: AssemblyRequest | None = None
) -> FitResult:
    return FitResult(
        request_id=request_id,
        status="error",
        model=model,
        error=ErrorInfo(code=exc.code, message=str(exc), retriable=exc.retriable),
        tenant=req.tenant if req else None,
        pipeline=req.pipeline if req else None,
        conversation_id=req.conversation_id if req else None,
    )
