"""Cost and provider prompt-cache facts of a rendered result: the step after rendering.

`annotate(p, plan, costs, result)` reads the rendered payload and the counted pieces and
adds, without touching the payload itself:

* `prompt_cache`: the prefix expected identical to the previous turn's payload, what a
  stable cut cost in kept history, and for Claude the `cache_control` breakpoints placed on
  the stable prefix (worker/providers/anthropic_cache.py), with the payload marked;
* `usage.cost`: the expected input cost at the model's prices, that prefix read from the
  cache (OpenAI: whole 128-token blocks from the model's minimum; Claude: what the
  breakpoints read), cache writes at their rate, and the output reserve's worst case;
* `prompt_cache_key` for OpenAI when configured, and the `input_cost_cap` alert.

"Expected" means: the previous turn of the conversation was sent within the cache's
lifetime and fitted by the same rules. Everything is decided from this request alone.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from worker.catalog import CacheTTL, Prices
from worker.engine.costs import Costs
from worker.engine.plan import Plan
from worker.engine.prepared import Prepared
from worker.engine.pricing import estimate
from worker.engine.result import (
    Alert,
    AnthropicCachePayload,
    CacheBreakpoint,
    FitResult,
    PromptCache,
)

if TYPE_CHECKING:  # Claude's breakpoints: imported by the first Claude request
    from worker.providers.anthropic_cache import Placement

OPENAI_CACHE_BLOCK = 128
"""OpenAI matches cached prefixes in whole blocks of this many tokens (PAYLOADS.md §1.5)."""
MAX_CACHE_KEY = 64
"""Longer keys are replaced by a digest (OpenAI rejects long `prompt_cache_key` values)."""


def annotate(p: Prepared, plan: Plan, costs: Costs, result: FitResult) -> None:
    """Add prompt-cache facts, cost and the cache key to an ok result (in place)."""
    usage = result.usage
    if usage is None or plan.cut is None:
        return
    layout = p.layout
    head = costs.system if layout.system else 0
    if p.info.provider == "openai" and layout.system:
        head += costs.message_framing("system")
    cache = PromptCache(
        stable_history=plan.cut.stable,
        block_tokens=plan.cut.block,
        prefix_tokens=min(usage.total_tokens, head + plan.cut.shared_tokens),
        cut_moved=plan.cut.cut_moved,
        stability_cost_tokens=plan.cut.stability_cost,
        history_grant_tokens=plan.cut.grant,
    )
    result.prompt_cache = cache
    prices = p.info.prices
    ttl: CacheTTL = p.req.budget.cache_ttl or p.caching.anthropic_ttl
    read, written = 0, 0
    if p.info.provider == "anthropic":
        read, written = _anthropic(p, plan, costs, result, cache, ttl)
    elif prices is not None:
        read = _openai_cached(prices, cache.prefix_tokens)
        result.prompt_cache_key = cache_key(p)
    if prices is None:
        usage.cost_unavailable = f"no prices for {p.req.model} in config/models.yaml"
    else:
        usage.cost = estimate(
            prices,
            input_tokens=usage.total_tokens,
            output_reserve=usage.output_reserve,
            cached_tokens=read,
            cache_write_tokens=written,
            write_ttl=ttl,
            max_input_cost=p.req.budget.max_input_cost,
        )
    result.alerts.extend(_cap_alert(p, result))


def _openai_cached(prices: Prices, prefix: int) -> int:
    if prices.cached_input is None or prices.cache_min_tokens is None:
        return 0
    whole = prefix - prefix % OPENAI_CACHE_BLOCK
    return whole if whole >= max(prices.cache_min_tokens, OPENAI_CACHE_BLOCK) else 0


def _anthropic(
    p: Prepared, plan: Plan, costs: Costs, result: FitResult, cache: PromptCache, ttl: CacheTTL
) -> tuple[int, int]:
    """Place breakpoints on the rendered Claude payload; (read, written) tokens expected."""
    from worker.providers.anthropic_cache import (
        Block,
        expected_cache_tokens,
        mark_payload,
        payload_blocks,
        place_breakpoints,
    )

    prices = p.info.prices
    if not p.caching.anthropic_breakpoints or prices is None or prices.cache_min_tokens is None:
        return 0, 0
    usage = result.usage
    assert usage is not None
    system: Any = result.system
    messages = [m.model_dump(include={"role", "content"}) for m in result.messages]
    where = payload_blocks(system, messages)
    # block sizes from the counted pieces; the final user message takes the remainder, so
    # the blocks add up to the confirmed total
    layout = p.layout
    turn_ids = layout.turn_indices(plan.history_kept)
    sizes = [costs.system] if system else []
    sizes += [costs.content[i] + costs.turn_framing(layout, i) for i in turn_ids]
    sizes.append(max(0, usage.total_tokens - sum(sizes)))
    if len(sizes) != len(where):  # a payload shape this step does not know: leave it be
        return 0, 0
    texts = [*([system] if system else []), *(m["content"] for m in messages)]
    if len(texts) != len(where):  # system or messages in block form: not placed here yet
        return 0, 0
    blocks = [
        Block(section, n, cacheable=bool(text), breakpoint_ttl=own)
        for (section, _, _, own), n, text in zip(where, sizes, texts, strict=True)
    ]
    head_blocks = 1 if system else 0
    assert plan.cut is not None
    newest = len(layout.groups[-1]) if plan.history_kept else 0
    shared = plan.cut.shared_tokens > 0  # the previous turn sent all but the newest exchange
    previous = head_blocks + (len(turn_ids) - newest if shared else 0)
    min_tokens = prices.cache_min_tokens
    placed = place_breakpoints(
        blocks,
        stable_blocks=len(blocks) - 1,
        previous_blocks=previous,
        min_tokens=min_tokens,
        ttl=ttl,
    )
    _report(cache, placed, where)
    if placed.breakpoints and placed.placed_by == "tokenheap":
        new_system, new_messages, _ = mark_payload(system, messages, placed)
        cache.anthropic = AnthropicCachePayload(system=new_system, messages=new_messages)
    return expected_cache_tokens(blocks, placed, previous_blocks=previous, min_tokens=min_tokens)


def _report(cache: PromptCache, placed: Placement, where: list[Any]) -> None:
    cache.breakpoints_placed_by = placed.placed_by if placed.breakpoints else None
    cache.breakpoints = [
        CacheBreakpoint(
            section=where[b.index][0],
            index=where[b.index][1],
            ttl=b.ttl,
            why=b.why,
            prefix_tokens=b.prefix_tokens,
        )
        for b in placed.breakpoints
    ]


def cache_key(p: Prepared) -> str | None:
    """OpenAI's `prompt_cache_key`: the conversation id (else the pipeline) or the
    pipeline, per the request or the setting; long keys become a stable digest."""
    mode = p.req.budget.prompt_cache_key or p.caching.prompt_cache_key
    req = p.req
    pipeline = None
    if req.pipeline is not None:
        pipeline = f"{req.tenant}/{req.pipeline}" if req.tenant else req.pipeline
    key = None
    if mode == "conversation":
        key = req.conversation_id or pipeline
    elif mode == "pipeline":
        key = pipeline
    if key is not None and len(key) > MAX_CACHE_KEY:
        key = hashlib.sha256(key.encode("utf-8")).hexdigest()[:MAX_CACHE_KEY]
    return key


def _cap_alert(p: Prepared, result: FitResult) -> list[Alert]:
    """`input_cost_cap` when `max_input_cost` set the budget and something was left out."""
    cap = p.budget.cost_cap_tokens
    usage = result.usage
    if cap is None or usage is None or cap != usage.budget_tokens:
        return []
    if not any(d.reason.endswith("_budget") for d in result.dropped):
        return []
    return [
        Alert(
            type="input_cost_cap",
            severity="info",
            message=f"budget.max_input_cost {p.req.budget.max_input_cost} USD pays for "
            f"{cap} input tokens; items were left out to stay under it",
            value=usage.total_tokens,
            threshold=cap,
        )
    ]
