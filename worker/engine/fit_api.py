"""Fitting Claude requests: a local estimate, the engine's allocator, one count_tokens call.

Claude's tokenizer is not public. Counting every distinct piece with the API (the old
design) cost about one call per piece and made each request wait for its slowest call,
against a per-organisation requests-per-minute limit. Here:

1. every piece is counted locally with the o200k BPE (the engine's `LocalCounter`, off the
   event loop, through the shared count cache);
2. costs are those counts scaled by the tokenizer family's learned ratio (with the margin
   its spread calls for) plus the family's framing guesses (`config/models.yaml`
   `claude_tokenizers`), and the engine's own allocator packs them;
3. the rendered payload is counted **once** by the API (`PayloadConfirmer`: digest-cached,
   rate-limited, retried); that count is `usage.total_tokens` (`exact: true`). Over budget
   (rare): trimmed by the measured excess and confirmed again; far under while something
   was dropped: what fits is taken back, bounded (`claude_fit.fit_confirmed`).

Per-slot usage is the confirmed total apportioned over the slots by the local estimate
(`usage.slots_apportioned`); the API does not itemise.

`TOKENHEAP_CLAUDE_COUNTING=local` makes no call (the estimate is the count, `exact:
false`); `audit` is `local` with a sampled fraction confirmed, the drift recorded.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from worker.catalog import ChatFraming
from worker.count.claude_estimate import (
    ClaudeEstimate,
    ClaudeTokenizers,
    Family,
    RatioLearner,
    conversation_key,
)
from worker.count.claude_fit import FitNotConfirmed, FitPolicy, apportion, fit_confirmed
from worker.count.claude_modes import AuditSampler, ClaudeCounting, DriftTracker, local_count
from worker.count.local import LocalCounter
from worker.engine.allocate import allocate
from worker.engine.budget import policy_for
from worker.engine.costs import Costs
from worker.engine.plan import Drop, Plan, Policy
from worker.engine.prepared import Prepared
from worker.engine.report import build_result, error_result
from worker.engine.result import Alert, CacheUse, CountAudit, FitResult
from worker.engine.stage import stage
from worker.errors import CountingUnavailable, OverBudget, TokenheapError
from worker.values import value

if TYPE_CHECKING:  # the SDK takes over a second to import: only Claude requests pay for it
    from worker.count.claude_confirm import PayloadConfirmer

OnUnavailable = Literal["fail", "estimate"]
LOCAL_ENCODING = "o200k_base"
"""The local tokenizer the estimate is made with (shipped, exact, already loaded)."""
API_METHOD = "anthropic:count_tokens"
RATIO_QUANTILE = 0.8
"""Allocate on this quantile of the confirmed ratios: higher overruns less and takes back
more; on the benchmark's workloads 0.8 (with FIT_POLICY) makes the fewest calls."""
FIT_POLICY = FitPolicy(take_back_aim=0.985)
"""Take-backs aim a little under the budget: one that overshoots costs a third call."""
WARM_SAMPLES = 5
"""Confirmed ratios a family needs before its requests allocate concurrently."""
UNIT = 16
"""The allocator works in 1/UNIT tokens (see `_Fit.costs`)."""


@dataclass(slots=True)
class ClaudeCounter:
    """What all of an engine's Claude requests share: the confirmer (one HTTP client, one
    rate limiter, one digest cache), the learned ratios, the audit sampler and drift.

    ``confirmer_factory`` builds the confirmer on first use (the SDK loads only then);
    None: no API configured.
    """

    tokenizers: ClaudeTokenizers
    confirmer_factory: Callable[[], PayloadConfirmer] | None = None
    mode: ClaudeCounting = "api"
    on_unavailable: OnUnavailable = "fail"
    audit_fraction: float = 0.05
    drift_threshold: float = 0.02
    learner: RatioLearner = field(init=False)
    drift: DriftTracker = field(init=False)
    sampler: AuditSampler = field(init=False)
    _confirmer: PayloadConfirmer | None = None
    _cold: dict[str, asyncio.Lock] = field(default_factory=dict)
    _thawed: set[str] = field(default_factory=set)
    _gated: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.learner = RatioLearner(self.tokenizers.families, quantile=RATIO_QUANTILE)
        self.drift = DriftTracker(threshold=self.drift_threshold)
        self.sampler = AuditSampler(self.audit_fraction)

    @property
    def confirmer(self) -> PayloadConfirmer | None:
        if self._confirmer is None and self.confirmer_factory is not None:
            self._confirmer = self.confirmer_factory()
        return self._confirmer

    @property
    def started(self) -> PayloadConfirmer | None:
        """The confirmer if one was made (metrics read it without making one)."""
        return self._confirmer

    def cold(self, family: str) -> bool:
        """Too few confirmed ratios of ``family`` to allocate on (the prior is a guess)."""
        return family not in self._thawed and self.learner.stats(family).samples < WARM_SAMPLES

    async def calibrated(self, family: str, fit: Callable[[], Awaitable[FitResult]]) -> FitResult:
        """``fit()``, one at a time while ``family`` is cold.

        Requests that arrive together (a file, a burst from Kafka) would otherwise all
        allocate on the prior ratio and most of them pay a second call; in turn, each one
        starts from what the ones before it confirmed. A failure of the API opens the gate:
        there is nothing to learn, and no reason to queue behind a deadline.
        """
        if not self.cold(family):
            return await fit()
        gate = self._cold.setdefault(family, asyncio.Lock())
        async with gate:
            if self.cold(family):
                self._gated[family] = gated = self._gated.get(family, 0) + 1
                if gated >= 4 * WARM_SAMPLES:  # small payloads teach nothing: stop waiting
                    self._thawed.add(family)
                try:
                    return await fit()
                except CountingUnavailable:
                    self._thawed.add(family)
                    raise
        return await fit()  # warmed while this one waited: no need to hold the others

    async def aclose(self) -> None:
        if self._confirmer is not None:
            await self._confirmer.aclose()
            self._confirmer = None


@value
class _Rendered:
    """A payload to confirm; equal when the bodies are (the loop detects repeats)."""

    body: dict[str, object]
    estimate: ClaudeEstimate = field(compare=False)


@value
class _Fit:
    """Everything one request's fit needs, computed once from its local counts."""

    p: Prepared
    family: str
    framing: Family
    counts: list[int]
    """Local (o200k) count per piece of the Claude layout (`costs.pieces` order)."""
    policy: Policy
    use: CacheUse

    def costs(self, ratio: float, unit: int = 1) -> Costs:
        """Costs in 1/``unit`` API tokens under ``ratio``, each piece rounded up, so the
        allocator's total is never under ``ClaudeEstimate.scaled`` of the payload it picks.
        A fine unit keeps that rounding from eating the budget (up to one token a piece)."""
        f = self.framing.framing
        chat = ChatFraming(
            per_message=f.per_message * unit,
            per_name=0,
            reply_priming=(f.per_request + self.tools_fixed()) * unit,
        )
        # Costs prices a message as per_message + role tokens: Claude's roles are not text,
        # and its system prompt costs per_system instead of per_message.
        role = {"user": 0, "assistant": 0, "system": (f.per_system - f.per_message) * unit}
        scaled = [math.ceil(c * ratio * unit) for c in self.counts]
        return Costs.of(self.p.layout, scaled, chat, role, extra_scale=unit)

    def tools_fixed(self) -> int:
        """The hidden tool-use system prompt and per-tool framing, paid once with tools."""
        tools = self.p.layout.tools
        if not tools:
            return 0
        f = self.framing.framing
        return f.tools_prompt + f.per_tool * len(tools)

    def allocate(self, target: int, ratio: float) -> tuple[Plan, float]:
        """The engine's allocator on the scaled costs (the plan's numbers in 1/UNIT tokens;
        only its choices are used), and the ratio it ran on."""
        costs = self.costs(ratio, UNIT)
        wants = costs.wants(self.p.layout, target * UNIT)
        if wants.fixed > wants.budget:
            # The estimate says even system + query do not fit; let the API decide on the
            # smallest payload rather than refuse on a guess.
            wants = replace(wants, budget=wants.fixed)
        return allocate(wants, self.policy), ratio

    def parts(self, plan: Plan) -> dict[str, ClaudeEstimate]:
        """The local estimate of the plan's payload, per usage slot: text (scaled by the
        ratio later) apart from what stated rules price (images, documents: not scaled)."""
        f, layout = self.framing.framing, self.p.layout
        both = self._slots(plan, self.counts)
        stated = self._slots(plan, [0] * len(self.counts))
        fixed = f.per_request + f.per_message * (len(layout.turn_indices(plan.history_kept)) + 1)
        fixed += self.tools_fixed() + (f.per_system if layout.system else 0)
        parts = {k: ClaudeEstimate(both[k] - stated[k], stated[k]) for k in both}
        parts["framing"] = ClaudeEstimate(0, fixed)
        return parts

    def _slots(self, plan: Plan, counts: list[int]) -> dict[str, int]:
        """Tokens per slot of the plan's payload from `counts` (no framing)."""
        layout = self.p.layout
        zero = {"user": 0, "assistant": 0, "system": 0, "tool": 0}
        c = Costs.of(layout, counts, ChatFraming(per_message=0, per_name=0, reply_priming=0), zero)
        context = 0
        if plan.chunks_kept:
            context = c.context_overhead(layout) + sum(c.chunk[i] for i in plan.chunks_kept)
        return {
            "system": c.system if layout.system else 0,
            "history": sum(c.content[i] for i in layout.turn_indices(plan.history_kept)),
            "context": context,
            "query": c.query,
            "tools": c.tools,
        }

    def render(self, planned: tuple[Plan, float]) -> _Rendered:
        plan = planned[0]
        body: dict[str, object] = {"model": self.p.req.model}
        body.update(self.p.layout.render(plan).kwargs())
        parts = self.parts(plan)
        total = ClaudeEstimate(
            sum(e.text for e in parts.values()), sum(e.fixed for e in parts.values())
        )
        return _Rendered(body, total)

    def key(self) -> bytes:
        layout = self.p.layout
        first = (
            json.dumps(layout.messages[0].get("content"), sort_keys=True, ensure_ascii=False)
            if layout.messages
            else layout.query
        )
        return conversation_key(self.p.req.model, layout.system or None, first)

    def result(
        self, planned: tuple[Plan, float], total: int, method: str, exact: bool
    ) -> FitResult:
        """The result with ``total`` as the payload's count, apportioned over the slots by
        the estimate; dropped items priced in whole tokens at the plan's ratio."""
        plan, ratio = planned
        costs = self.costs(ratio)
        unit_history = self.costs(ratio, UNIT).wants(self.p.layout, 0).history
        plan = _in_tokens(plan, costs, unit_history, self.p)
        result = build_result(self.p, plan, costs, method, exact, {}, [], self.use, total)
        usage = result.usage
        if usage is not None:
            slots = apportion(self.parts(plan), total, ratio)
            result.usage = usage.model_copy(update={**slots, "slots_apportioned": True})
        return result


async def fit(p: Prepared, claude: ClaudeCounter, local: LocalCounter) -> FitResult:
    """Fit a Claude request as ``claude.mode`` says; when the API cannot answer, an error
    or an estimate (``claude.on_unavailable``)."""
    try:
        f = await _prepare(p, claude, local)
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)
    try:
        if claude.mode == "local":
            return _fit_local(f, claude)
        if claude.mode == "audit":
            return await _fit_audited(f, claude)
        confirmer = claude.confirmer
        if confirmer is None:
            # The settings' names, as a user sets them (the Python API's own are
            # `Engine(claude_counting=..., on_unavailable=...)`).
            raise CountingUnavailable(
                "no Anthropic client configured: set ANTHROPIC_API_KEY (or "
                "TOKENHEAP_ANTHROPIC_BASE_URL) for exact counts, or count locally: "
                "TOKENHEAP_CLAUDE_COUNTING=local, or TOKENHEAP_ON_COUNT_UNAVAILABLE=estimate"
            )
        return await claude.calibrated(f.family, lambda: _fit_confirmed(f, claude, confirmer))
    except CountingUnavailable as exc:
        if claude.on_unavailable == "fail":
            return error_result(p.req.request_id, p.req.model, exc, p.req)
        try:
            result = _fit_local(f, claude, prefix="estimate:")
        except TokenheapError as inner:
            return error_result(p.req.request_id, p.req.model, inner, p.req)
        why = (
            "no count API is configured"
            if claude.confirmer is None and claude.mode == "api"
            else "the count API did not answer"
        )
        result.alerts.append(
            Alert(
                type="estimated_count",
                severity="warning",
                message=f"{why}; counts are a local estimate with a margin",
            )
        )
        return result
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)


async def _prepare(p: Prepared, claude: ClaudeCounter, local: LocalCounter) -> _Fit:
    family = claude.tokenizers.family(p.info.tokenizer_family)
    with stage("count", texts=len(p.texts), counter=local.method):
        pending = local.submit(p.texts)
        for fut in pending.futures:
            await asyncio.wrap_future(fut)
        counts, hits, misses = pending.result()
    # Truncating a chunk needs the true tokenizer to cut at a boundary; Claude's is not
    # local, so a chunk that does not fit is left out whole.
    policy = replace(policy_for(p.req, p.profile, p.budget), truncate=False)
    # The allocator runs in 1/UNIT tokens: the policy's token amounts too.
    policy = replace(
        policy,
        history_cap=policy.history_cap * UNIT,
        context_cap=policy.context_cap * UNIT,
        min_truncate_tokens=policy.min_truncate_tokens * UNIT,
        stable_block=None if policy.stable_block is None else policy.stable_block * UNIT,
    )
    return _Fit(
        p,
        family,
        claude.tokenizers.families[family],
        counts,
        policy,
        CacheUse(hits=hits, misses=misses),
    )


async def _fit_confirmed(f: _Fit, claude: ClaudeCounter, confirmer: PayloadConfirmer) -> FitResult:
    budget = f.p.budget.budget_tokens

    async def count(payload: _Rendered) -> int:
        with stage("confirm"):
            return await confirmer.count(payload.body)

    try:
        got = await fit_confirmed(
            allocate=f.allocate,
            render=f.render,
            estimate=lambda r: r.estimate,
            count=count,
            dropped_any=lambda planned: bool(planned[0].dropped),
            budget=budget,
            learner=claude.learner,
            family=f.family,
            key=f.key(),
            policy=FIT_POLICY,
        )
    except FitNotConfirmed as exc:
        raise OverBudget(
            f"{f.p.req.request_id}: the count API's count of the smallest payload stays over "
            f"the {budget}-token input budget ({exc}): shorten the system prompt or query, "
            "lower output_reserve or pick a larger model"
        ) from None
    # Slots are apportioned at this payload's own ratio: the best split the estimate knows.
    return f.result((got.plan[0], got.ratio), got.tokens, API_METHOD, True)


def _local_plan(f: _Fit, claude: ClaudeCounter) -> tuple[tuple[Plan, float], _Rendered]:
    ratio = claude.learner.safe_ratio(f.family)
    costs = f.costs(ratio, UNIT)
    wants = costs.wants(f.p.layout, f.p.budget.budget_tokens * UNIT)
    planned = (allocate(wants, f.policy), ratio)  # OverBudget when system + query do not fit
    return planned, f.render(planned)


def _fit_local(f: _Fit, claude: ClaudeCounter, prefix: str = "") -> FitResult:
    planned, rendered = _local_plan(f, claude)
    got = local_count(rendered.estimate, claude.learner, f.family, LOCAL_ENCODING)
    return f.result(planned, got.tokens, prefix + got.count_method, False)


async def _fit_audited(f: _Fit, claude: ClaudeCounter) -> FitResult:
    """Local counts; a sampled fraction confirmed, its drift recorded (never fatal)."""
    from worker.count.claude_confirm import payload_digest

    planned, rendered = _local_plan(f, claude)
    got = local_count(rendered.estimate, claude.learner, f.family, LOCAL_ENCODING)
    result = f.result(planned, got.tokens, got.count_method, False)
    confirmer = claude.confirmer
    if confirmer is None or not claude.sampler.sampled(payload_digest(rendered.body)):
        return result
    model = f.p.req.model
    try:
        with stage("confirm", audit=True):
            confirmed = await confirmer.count(rendered.body)
    except TokenheapError:
        return result  # an audit that cannot be made does not fail the request
    claude.learner.observe(f.family, rendered.estimate, confirmed, f.key())
    drift = claude.drift.record(model, got.tokens, confirmed)
    result.count_audit = CountAudit(
        local_tokens=got.tokens, confirmed_tokens=confirmed, drift=round(drift, 6)
    )
    state = claude.drift.drift(model)
    if state.alerting:
        result.alerts.append(
            Alert(
                type="count_drift",
                message=f"local Claude counts of {model} drift from the API's: 95th "
                f"percentile |error| {state.p95_abs:.1%} over {state.samples} audited payloads",
                value=round(state.p95_abs, 6),
                threshold=claude.drift_threshold,
            )
        )
    return result


def _in_tokens(plan: Plan, costs: Costs, unit_history: tuple[int, ...], p: Prepared) -> Plan:
    """The plan's amounts in whole tokens (the allocator's are in 1/UNIT).

    The shared history prefix is re-summed from whole-token exchange costs (the same
    exchanges), so the prompt-cache facts add up exactly like the rest of the result."""
    cut = plan.cut
    if cut is not None:
        history = costs.wants(p.layout, 0).history
        first = len(history) - plan.history_kept
        shared_units = shared = 0
        for u, t in zip(unit_history[first:], history[first:], strict=True):
            if shared_units + u > cut.shared_tokens:
                break
            shared_units += u
            shared += t
        cut = replace(
            cut,
            block=None if cut.block is None else cut.block // UNIT,
            grant=cut.grant // UNIT,
            shared_tokens=shared,
            stability_cost=-(-cut.stability_cost // UNIT),
        )
    return replace(
        plan,
        budget=plan.budget // UNIT,
        fixed=-(-plan.fixed // UNIT),
        history_tokens=-(-plan.history_tokens // UNIT),
        context_tokens=-(-plan.context_tokens // UNIT),
        dropped=tuple(_retoken(d, costs, p) for d in plan.dropped),
        cut=cut,
    )


def _retoken(d: Drop, costs: Costs, p: Prepared) -> Drop:
    """A dropped item's tokens in whole tokens (the plan's are in 1/UNIT)."""
    if d.slot == "history":
        layout = p.layout
        tokens = sum(
            costs.content[i] + costs.turn_framing(layout, i) for i in layout.groups[d.index]
        )
    else:
        tokens = costs.chunk[d.index]
    return replace(d, tokens=tokens)
