"""Fitting with a provider's count API (Claude: `messages.count_tokens`), payload confirmed.

Claude's tokenizer is not public, so the pieces are counted by the API (each distinct
piece once, through the shared cache), the allocation packs on those counts, and the
rendered payload is counted once more: that confirmed count is `usage.total_tokens`, and a
payload over budget is trimmed by the excess and confirmed again.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from worker.catalog import ChatFraming
from worker.engine.allocate import allocate
from worker.engine.budget import policy_for
from worker.engine.costs import Costs
from worker.engine.prepared import Prepared
from worker.engine.report import build_result, error_result
from worker.engine.result import Alert, CacheUse, FitResult
from worker.engine.stage import stage
from worker.errors import CountingUnavailable, TokenheapError

if TYPE_CHECKING:  # the SDK takes over a second to import: only Claude requests pay for it
    from worker.count.anthropic_api import AnthropicCounter

OnUnavailable = Literal["fail", "estimate"]
# Claude's per-message framing is not published; this guess only steers packing, the
# final payload is confirmed by one count call and trimmed further if it is over.
CLAUDE_FRAMING = ChatFraming(per_message=4, per_name=0, reply_priming=0)
ESTIMATE_BYTES_PER_TOKEN = 3.0
"""Claude averages well over 3 UTF-8 bytes a token on prose; 3 leaves a safety margin."""
CONFIRM_ROUNDS = 4


async def fit(
    p: Prepared, api: AnthropicCounter | None, on_unavailable: OnUnavailable
) -> FitResult:
    """Fit a Claude request; when the API cannot answer, an error or an estimate."""
    try:
        if api is None:
            raise CountingUnavailable(
                "no Anthropic client configured: set ANTHROPIC_API_KEY (or "
                "TOKENHEAP_ANTHROPIC_BASE_URL) or use on_unavailable=estimate"
            )
        return await _fit_exact(p, api)
    except CountingUnavailable as exc:
        if on_unavailable == "fail":
            return error_result(p.req.request_id, p.req.model, exc, p.req)
        return _fit_estimated(p)
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)


async def _fit_exact(p: Prepared, api: AnthropicCounter) -> FitResult:
    model = p.req.model
    nonempty = [t for t in p.texts if t]
    calls_before = api.calls
    with stage("count", texts=len(nonempty)):
        got = dict(zip(nonempty, await api.count_texts(model, nonempty), strict=True))
    counts = [got.get(t, 0) if t else 0 for t in p.texts]
    costs = Costs.of(p.layout, counts, CLAUDE_FRAMING, {})
    wants = costs.wants(p.layout, p.budget.budget_tokens)
    policy = policy_for(p.req, p.profile, p.budget)
    plan = allocate(wants, policy)
    slack = 0
    for round_ in range(CONFIRM_ROUNDS):
        payload = p.layout.render(plan)
        with stage("confirm", round=round_):
            confirmed = await api.count_payload(
                model,
                payload.system,
                payload.messages,
                tools=payload.tools,
                tool_choice=payload.tool_choice,
            )
        if confirmed <= p.budget.budget_tokens:
            use = CacheUse(hits=0, misses=api.calls - calls_before)
            return build_result(
                p, plan, costs, "anthropic:count_tokens", True, {}, [], use, confirmed
            )
        slack += confirmed - p.budget.budget_tokens
        plan = allocate(replace(wants, budget=p.budget.budget_tokens - slack), policy)
    raise CountingUnavailable(
        f"{p.req.request_id}: the confirmed payload stayed over budget after "
        f"{CONFIRM_ROUNDS} rounds of trimming"
    )


def _fit_estimated(p: Prepared) -> FitResult:
    counts = [math.ceil(len(t.encode("utf-8")) / ESTIMATE_BYTES_PER_TOKEN) for t in p.texts]
    costs = Costs.of(p.layout, counts, CLAUDE_FRAMING, {})
    try:
        plan = allocate(
            costs.wants(p.layout, p.budget.budget_tokens),
            policy_for(p.req, p.profile, p.budget),
        )
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)
    method = f"estimate:utf8_bytes/{ESTIMATE_BYTES_PER_TOKEN:g}"
    result = build_result(p, plan, costs, method, False, {}, [], CacheUse())
    result.alerts.append(
        Alert(
            type="estimated_count",
            severity="warning",
            message="the count API did not answer; counts are estimates with a margin",
        )
    )
    return result
