"""Fitting with local, exact counts (OpenAI models: the model's BPE, offline).

`start` submits a request's pieces to the counting threads and returns at once, so many
requests count in parallel while earlier ones are allocated and rendered; `finish`
allocates and renders once the counts are in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from worker.catalog import ChatFraming
from worker.count.local import LocalCounter, Pending
from worker.engine.allocate import allocate
from worker.engine.budget import policy_for
from worker.engine.costs import Costs
from worker.engine.plan import Drop, DropReason, Plan, Truncation
from worker.engine.prepared import Prepared
from worker.engine.report import build_result, error_result
from worker.engine.result import CacheUse, FitResult, TruncatedItem
from worker.errors import TokenheapError


@dataclass(slots=True)
class Started:
    """A prepared OpenAI request whose pieces are being counted."""

    prep: Prepared
    counter: LocalCounter
    pending: Pending


def start(p: Prepared, counter: LocalCounter) -> Started:
    """Submit the pieces for counting; never blocks on counting."""
    return Started(p, counter, counter.submit(p.texts))


def finish(started: Started, framing: ChatFraming) -> FitResult:
    """Allocate and render once the counts are in (blocks until they are)."""
    p, counter = started.prep, started.counter
    counts, hits, misses = started.pending.result()
    use = CacheUse(hits=hits, misses=misses)
    costs = Costs.of(p.layout, counts, framing, counter.role_tokens())
    try:
        plan = allocate(
            costs.wants(p.layout, p.budget.budget_tokens),
            policy_for(p.req, p.profile, p.budget),
        )
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)
    plan, costs, units, truncated = _truncate(p, plan, costs, counter)
    return build_result(p, plan, costs, counter.method, True, units, truncated, use)


def _truncate(
    p: Prepared, plan: Plan, costs: Costs, counter: LocalCounter
) -> tuple[Plan, Costs, dict[int, str], list[TruncatedItem]]:
    """Cut the planned chunk at a token boundary so its unit fits what the plan left.

    Decoding a prefix can split a multi-byte character, so the cut unit is recounted and
    the cut shortened until it fits; if it never does, the chunk is dropped, and reported.
    """
    t: Truncation | None = plan.truncation
    if t is None:
        return plan, costs, {}, []
    chunk = p.req.chunks[t.index]
    full = costs.chunk[t.index]
    ids = counter.encode(chunk.text)
    keep = t.tokens - max(0, full - len(ids))
    for _ in range(8):
        if keep <= 0:
            break
        unit = p.layout.chunk_unit(chunk.id, counter.decode_prefix(ids[:keep]))
        got = counter.count([unit])[0][0]
        if got <= t.tokens:
            item = TruncatedItem(id=chunk.id, index=t.index, original_tokens=full, kept_tokens=got)
            chunk_costs = list(costs.chunk)
            chunk_costs[t.index] = got
            return plan, replace(costs, chunk=tuple(chunk_costs)), {t.index: unit}, [item]
        keep -= got - t.tokens
    kept = tuple(i for i in plan.chunks_kept if i != t.index)
    drop = Drop("context", t.index, full, DropReason.CONTEXT_BUDGET)
    plan = replace(plan, chunks_kept=kept, truncation=None, dropped=(*plan.dropped, drop))
    return plan, costs, {}, []
