"""handle(request) -> FitResult: count, allocate, render. The engine the CLI and worker share.

Each request is prepared (model, profile, budget, layout), its pieces are counted (local BPE
for OpenAI, the count API for Claude), then `finish` allocates and renders. The CLI counts
the pieces of many requests in one call, so a piece repeated across requests costs once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from worker.accounting import Costs, pieces
from worker.allocate.budget import Drop, DropReason, Plan, Truncation
from worker.allocate.policy import allocate
from worker.budgeting import Budget, alert_threshold, budget_for, policy_for, system_share
from worker.config import Catalog, ChatFraming, ModelInfo, Profile
from worker.count.backends import BackendName, make_backend
from worker.count.cache import CountCache
from worker.count.local import LocalCounter, Pending
from worker.count.vocab import encoding
from worker.errors import CountingUnavailable, TokenheapError
from worker.render.layout import Layout, build_layout
from worker.render.models import (
    Alert,
    CacheUse,
    DroppedItem,
    ErrorInfo,
    FitResult,
    TruncatedItem,
    Usage,
)
from worker.request.models import AssemblyRequest
from worker.telemetry.stage import stage

if TYPE_CHECKING:  # the SDK takes over a second to import: only Claude requests pay for it
    from worker.count.anthropic_api import AnthropicCounter

OnUnavailable = Literal["fail", "estimate"]
# Claude's per-message framing is not published; this guess only steers packing, the
# final payload is confirmed by one count call and trimmed further if it is over.
CLAUDE_FRAMING = ChatFraming(per_message=4, per_name=0, reply_priming=0)
ESTIMATE_BYTES_PER_TOKEN = 3.0
"""Claude averages well over 3 UTF-8 bytes a token on prose; 3 leaves a safety margin."""
CONFIRM_ROUNDS = 4


@dataclass(slots=True)
class Prepared:
    req: AssemblyRequest
    info: ModelInfo
    profile: Profile
    budget: Budget
    layout: Layout
    texts: list[str]


@dataclass(slots=True)
class Started:
    """A prepared OpenAI request whose pieces are being counted."""

    prep: Prepared
    counter: LocalCounter
    pending: Pending


@dataclass(slots=True)
class Engine:
    """Counting clients and configuration; stateless per request, safe to share."""

    catalog: Catalog
    cache: CountCache = field(default_factory=CountCache)
    executor: Executor = field(default_factory=lambda: ThreadPoolExecutor(2, "tokenheap-count"))
    backend: BackendName = "tiktoken"
    """Local BPE backend: tiktoken, or the exact and faster fastokens (`auto`: if installed)."""
    anthropic_factory: Callable[[], AnthropicCounter] | None = None
    """Builds the Claude counter on first use (None: no API configured)."""
    on_unavailable: OnUnavailable = "fail"
    _local: dict[str, LocalCounter] = field(default_factory=dict)
    _anthropic: AnthropicCounter | None = None

    @property
    def anthropic_started(self) -> AnthropicCounter | None:
        """The Claude counter if one was created (metrics read it without creating one)."""
        return self._anthropic

    @property
    def anthropic(self) -> AnthropicCounter | None:
        if self._anthropic is None and self.anthropic_factory is not None:
            self._anthropic = self.anthropic_factory()
        return self._anthropic

    async def aclose(self) -> None:
        """Close what the engine opened (the count API client)."""
        if self._anthropic is not None:
            await self._anthropic.aclose()
            self._anthropic = None

    def local(self, encoding_name: str) -> LocalCounter:
        counter = self._local.get(encoding_name)
        if counter is None:
            enc = encoding(encoding_name)
            counter = LocalCounter(
                enc,
                cache=self.cache,
                executor=self.executor,
                backend=make_backend(enc, self.backend),
            )
            self._local[encoding_name] = counter
        return counter

    # -- preparation -------------------------------------------------------------------

    def prepare(self, req: AssemblyRequest) -> Prepared:
        info = self.catalog.model(req.model)
        profile = self.catalog.profile(req.budget.profile)
        budget = budget_for(req, info, profile)
        layout = build_layout(req, info.provider, self.catalog.render)
        return Prepared(req, info, profile, budget, layout, pieces(layout))

    # -- OpenAI: local, exact -----------------------------------------------------------

    def start(self, req: AssemblyRequest) -> Started | FitResult:
        """Prepare an OpenAI-model request and start counting its pieces; never blocks on
        counting, so the caller can start the next one (or serve its event loop)."""
        try:
            p = self.prepare(req)
        except TokenheapError as exc:
            return error_result(req.request_id, req.model, exc, req)
        return self._start(p)

    def _start(self, p: Prepared) -> Started:
        if p.info.encoding is None:
            raise ValueError(f"{p.req.model} is not counted locally; use fit()")
        counter = self.local(p.info.encoding)
        return Started(p, counter, counter.submit(p.texts))

    def finish(self, started: Started | FitResult) -> FitResult:
        """Allocate and render once the counts are in (blocks until they are)."""
        if isinstance(started, FitResult):
            return started
        counts, hits, misses = started.pending.result()
        return self._finish_local(
            started.prep, started.counter, counts, CacheUse(hits=hits, misses=misses)
        )

    def fit_many(self, reqs: Sequence[AssemblyRequest]) -> list[FitResult]:
        """Fit OpenAI-model requests (blocking); counting of later requests overlaps the
        allocation and rendering of earlier ones."""
        return [self.finish(s) for s in [self.start(r) for r in reqs]]

    def _finish_local(
        self, p: Prepared, counter: LocalCounter, counts: list[int], use: CacheUse
    ) -> FitResult:
        costs = Costs.of(p.layout, counts, self.catalog.framing, counter.role_tokens())
        try:
            plan = allocate(
                costs.wants(p.layout, p.budget.budget_tokens),
                policy_for(p.req, p.profile, p.budget),
            )
        except TokenheapError as exc:
            return error_result(p.req.request_id, p.req.model, exc, p.req)
        plan, costs, units, truncated = _truncate(p, plan, costs, counter)
        return self._result(p, plan, costs, counter.method, True, units, truncated, use)

    async def fit(self, req: AssemblyRequest) -> FitResult:
        """Fit one request without blocking the event loop (the worker's entry point).

        Preparation, allocation and rendering are light and run on the loop; counting runs
        on the counting threads and is awaited.
        """
        try:
            with stage("prepare"):
                p = self.prepare(req)
        except TokenheapError as exc:
            return error_result(req.request_id, req.model, exc, req)
        if p.info.provider == "anthropic":
            return await self._fit_anthropic(p)
        with stage("count", texts=len(p.texts)):
            started = self._start(p)
            for fut in started.pending.futures:
                await asyncio.wrap_future(fut)
        with stage("allocate"):
            return self.finish(started)

    # -- Claude: the count API, confirmed ----------------------------------------------

    async def _fit_anthropic(self, p: Prepared) -> FitResult:
        try:
            if self.anthropic is None:
                raise CountingUnavailable(
                    "no Anthropic client configured: set ANTHROPIC_API_KEY (or "
                    "TOKENHEAP_ANTHROPIC_BASE_URL) or use on_unavailable=estimate"
                )
            return await self._fit_anthropic_exact(p, self.anthropic)
        except CountingUnavailable as exc:
            if self.on_unavailable == "fail":
                return error_result(p.req.request_id, p.req.model, exc, p.req)
            return self._fit_estimated(p)
        except TokenheapError as exc:
            return error_result(p.req.request_id, p.req.model, exc, p.req)

    async def _fit_anthropic_exact(self, p: Prepared, api: AnthropicCounter) -> FitResult:
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
            messages = p.layout.render(plan)
            with stage("confirm", round=round_):
                confirmed = await api.count_payload(
                    model,
                    p.layout.system or None,
                    [m.model_dump(include={"role", "content"}) for m in messages],
                )
            if confirmed <= p.budget.budget_tokens:
                use = CacheUse(hits=0, misses=api.calls - calls_before)
                return self._result(
                    p, plan, costs, "anthropic:count_tokens", True, {}, [], use, confirmed
                )
            slack += confirmed - p.budget.budget_tokens
            plan = allocate(replace(wants, budget=p.budget.budget_tokens - slack), policy)
        raise CountingUnavailable(
            f"{p.req.request_id}: the confirmed payload stayed over budget after "
            f"{CONFIRM_ROUNDS} rounds of trimming"
        )

    def _fit_estimated(self, p: Prepared) -> FitResult:
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
        result = self._result(p, plan, costs, method, False, {}, [], CacheUse())
        result.alerts.append(
            Alert(
                type="estimated_count",
                severity="warning",
                message="the count API did not answer; counts are estimates with a margin",
            )
        )
        return result

    # -- the result ---------------------------------------------------------------------

    def _result(
        self,
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
        messages = layout.render(plan, units)
        turn_ids = layout.turn_indices(plan.history_kept)
        history = sum(costs.content[i] for i in turn_ids)
        context = 0
        if plan.chunks_kept:
            context = costs.header + sum(costs.chunk[i] for i in plan.chunks_kept)
            context += costs.query_unit - costs.query
        system = costs.system if layout.system else 0
        _, fixed_framing = costs.fixed(layout)
        framing = fixed_framing + sum(costs.turn_framing(layout, i) for i in turn_ids)
        total = system + history + context + costs.query + framing
        if confirmed is not None:
            framing += confirmed - total
            total = confirmed
        usage = Usage(
            system=system,
            history=history,
            context=context,
            query=costs.query,
            framing=framing,
            total_tokens=total,
            budget_tokens=p.budget.budget_tokens,
            output_reserve=p.budget.output_reserve,
            max_context_tokens=p.budget.max_context_tokens,
            utilization=round(total / p.budget.budget_tokens, 4),
        )
        dropped = _dropped(p, plan, costs)
        result = FitResult(
            request_id=req.request_id,
            status="ok",
            model=req.model,
            provider=p.info.provider,
            profile=p.profile.name,
            count_method=method,
            exact=exact,
            system=layout.system if p.info.provider == "anthropic" and layout.system else None,
            messages=messages,
            usage=usage,
            dropped=dropped,
            truncated=truncated,
            tenant=req.tenant,
            pipeline=req.pipeline,
            conversation_id=req.conversation_id,
            cache=use,
        )
        result.alerts.extend(request_alerts(p, usage, dropped, plan))
        return result


def _dropped(p: Prepared, plan: Plan, costs: Costs) -> list[DroppedItem]:
    layout, req = p.layout, p.req
    out: list[DroppedItem] = []
    for d in plan.dropped:
        if d.slot == "history":
            for i in layout.groups[d.index]:
                out.append(
                    DroppedItem(
                        slot="history",
                        index=i,
                        tokens=costs.content[i] + costs.turn_framing(layout, i),
                        reason=d.reason.value,
                    )
                )
        else:
            out.append(
                DroppedItem(
                    slot="context",
                    id=req.chunks[d.index].id,
                    index=d.index,
                    tokens=d.tokens,
                    reason=d.reason.value,
                )
            )
    for i, why in enumerate(layout.excluded):
        if why is not None:
            out.append(
                DroppedItem(
                    slot="context", id=req.chunks[i].id, index=i, tokens=costs.chunk[i], reason=why
                )
            )
    return out


def request_alerts(
    p: Prepared, usage: Usage, dropped: list[DroppedItem], plan: Plan
) -> list[Alert]:
    """Per-request alerts: high utilization, the best chunk lost, history cut short."""
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
    groups = len(p.layout.groups)
    floor = min(p.profile.min_history_turns, groups)
    if plan.history_kept < floor:
        alerts.append(
            Alert(
                type="history_below_min",
                message=f"{plan.history_kept} of {groups} exchanges kept, profile wants {floor}",
                value=plan.history_kept,
                threshold=floor,
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
