"""allocate(wants, policy) -> Plan: the budget decision, a pure function of counted items."""

from __future__ import annotations

from worker.catalog import SlotName
from worker.engine.plan import Drop, DropReason, HistoryCut, Plan, Policy, Truncation, Wants
from worker.engine.stable_cut import StableCut, greedy_cut, stable_cut
from worker.errors import OverBudget


def allocate(wants: Wants, policy: Policy) -> Plan:
    """Grant the fixed part, then fill slots in priority order up to their caps, then reflow.

    History is kept as the contiguous newest part, whole exchanges at a time. Chunks go in
    relevance order; one that does not fit is skipped and later, smaller ones still get
    their chance, so a full budget ends close to its limit.

    With `policy.stable_block`, history is then re-cut on the cache-stable grid within
    the grant it had (what it took plus what was left), and what that frees may go to
    chunks (they sit in the final user message, after the cached prefix).

    >>> plan = allocate(Wants(budget=100, fixed=20, history=(30, 30, 30), chunks=(50, 10)),
    ...                 Policy(history_cap=30, context_cap=55))
    >>> plan.history_kept, plan.chunks_kept, plan.total
    (1, (0,), 100)
    """
    if wants.fixed > wants.budget:
        raise OverBudget(
            f"the system prompt, query and framing need {wants.fixed} tokens but the input "
            f"budget is {wants.budget}: shorten them, lower output_reserve or pick a larger model"
        )
    free = wants.budget - wants.fixed
    hist_kept, hist_used = 0, 0
    ctx_kept: list[int] = []
    ctx_used = 0
    caps: dict[SlotName, int] = {"history": policy.history_cap, "context": policy.context_cap}

    def fill_history(limit: int) -> None:
        nonlocal hist_kept, hist_used
        newest_first = wants.history[::-1]
        while hist_kept < len(newest_first) and hist_used + newest_first[hist_kept] <= limit:
            hist_used += newest_first[hist_kept]
            hist_kept += 1

    candidates = sum(1 for cost in wants.chunks if cost is not None)

    def fill_context(limit: int) -> None:
        nonlocal ctx_used
        if len(ctx_kept) == candidates:  # every chunk is in (the common case of a refill)
            return
        kept = set(ctx_kept)
        for i, cost in enumerate(wants.chunks):
            if cost is None or i in kept:
                continue
            extra = cost if ctx_kept else cost + wants.context_overhead
            if ctx_used + extra <= limit:
                ctx_kept.append(i)
                kept.add(i)
                ctx_used += extra

    fill = {"history": fill_history, "context": fill_context}

    def used(slot: SlotName) -> int:
        return hist_used if slot == "history" else ctx_used

    for slot in policy.priority:
        before = used(slot)
        fill[slot](min(caps[slot], before + free))
        free -= used(slot) - before
    if policy.reflow:
        for slot in policy.priority:
            before = used(slot)
            fill[slot](before + free)
            free -= used(slot) - before

    # what history could have taken: the greedy fill keeps exactly the newest part of it
    grant = hist_used + free if policy.reflow else min(caps["history"], hist_used + free)
    cut: StableCut
    if policy.stable_block is not None:
        cut = stable_cut(wants.history, grant, policy.stable_block)
        free += hist_used - cut.kept_tokens
        hist_kept, hist_used = cut.kept, cut.kept_tokens
        if free > 0:
            ctx_limit = ctx_used + free if policy.reflow else min(caps["context"], ctx_used + free)
            before = ctx_used
            fill_context(ctx_limit)
            free -= ctx_used - before
    else:
        cut = greedy_cut(wants.history, grant)
    truncation = _truncation(wants, policy, ctx_kept, ctx_used, free)
    if truncation is not None:
        ctx_kept.append(truncation.index)
        ctx_used += truncation.tokens + (0 if len(ctx_kept) > 1 else wants.context_overhead)

    ctx_kept.sort()
    return Plan(
        budget=wants.budget,
        fixed=wants.fixed,
        history_kept=hist_kept,
        chunks_kept=tuple(ctx_kept),
        history_tokens=hist_used,
        context_tokens=ctx_used,
        dropped=_drops(wants, cut, set(ctx_kept)),
        truncation=truncation,
        cut=HistoryCut(
            stable=policy.stable_block is not None,
            block=policy.stable_block,
            grant=grant,
            shared_tokens=cut.prefix_tokens,
            cut_moved=cut.cut_moved,
            stability_cost=cut.stability_cost,
        ),
    )


def _truncation(
    wants: Wants, policy: Policy, kept: list[int], ctx_used: int, free: int
) -> Truncation | None:
    if not policy.truncate:
        return None
    room = free if policy.reflow else min(free, policy.context_cap - ctx_used)
    if not kept:
        room -= wants.context_overhead
    if room < policy.min_truncate_tokens:
        return None
    kept_set = set(kept)
    for i, cost in enumerate(wants.chunks):
        if cost is not None and i not in kept_set:
            return Truncation(index=i, tokens=room)
    return None


def _drops(wants: Wants, cut: StableCut, ctx_kept: set[int]) -> tuple[Drop, ...]:
    # exchanges the greedy cut would have kept are dropped for stability, not for budget
    greedy = min(cut.first_kept, cut.greedy_first)
    drops = [
        Drop(
            "history",
            i,
            cost,
            DropReason.HISTORY_BUDGET if i < greedy else DropReason.CACHE_STABLE_CUT,
        )
        for i, cost in enumerate(wants.history[: cut.first_kept])
    ]
    for i, cost in enumerate(wants.chunks):
        if cost is not None and i not in ctx_kept:
            drops.append(Drop("context", i, cost, DropReason.CONTEXT_BUDGET))
    return tuple(drops)
