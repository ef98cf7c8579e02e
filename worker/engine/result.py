"""The fitted-context result contract (schemas/result.json is generated from it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.engine.pricing import CostEstimate
from worker.engine.request import Turn


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(BaseModel):
    """One message exactly as the provider's SDK takes it: `role`, `content` (a string, a
    list of parts / blocks, or null beside `tool_calls`) and the provider's other keys
    (`name`, `tool_calls`, `tool_call_id`, ...), passed through unchanged."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class Usage(_Out):
    """Tokens per slot; they add up to `total_tokens`, which is what the provider bills."""

    system: int
    history: int
    context: int
    """Kept chunks as rendered, with the context header and the query's label."""
    query: int
    framing: int
    """Per-message chat framing, role strings and reply priming."""
    tools: int = 0
    """Tool definitions (and tool_choice where a rule states it)."""
    total_tokens: int
    budget_tokens: int
    """max_context_tokens - output_reserve (or the model's input cap, when lower)."""
    output_reserve: int
    max_context_tokens: int
    utilization: float
    """total_tokens / budget_tokens."""
    slots_apportioned: bool = False
    """True when only `total_tokens` was counted as a whole (Claude: the count API counts
    whole payloads) and the slot values split it in proportion to a local estimate."""
    cost: CostEstimate | None = None
    """Expected input cost (cached prefix at the cached rate, cache writes at theirs) and
    the worst case of the output reserve; None when the model row has no prices."""
    cost_unavailable: str | None = None
    """Why `cost` is None."""


class DroppedItem(_Out):
    slot: Literal["history", "context"]
    id: str | None = None
    """Chunk id (context slot)."""
    index: int | None = None
    """Position in the request's `history` (history slot) or `chunks` list; for a history
    converted to the other provider's shape, the position in the converted history."""
    unit: int | None = None
    """History slot: the exchange (kept or dropped whole) this message belongs to; every
    message of a dropped unit is listed with the same `unit`."""
    tokens: int
    reason: str


class TruncatedItem(_Out):
    slot: Literal["context"] = "context"
    id: str
    index: int
    original_tokens: int
    kept_tokens: int


class Alert(_Out):
    type: str
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str
    value: float | None = None
    threshold: float | None = None


class ErrorInfo(_Out):
    code: str
    message: str
    retriable: bool = False


class CacheUse(_Out):
    hits: int = 0
    misses: int = 0


class CountAudit(_Out):
    """An audited local count (`TOKENHEAP_CLAUDE_COUNTING=audit`): the API's count beside it."""

    local_tokens: int
    confirmed_tokens: int
    drift: float
    """(local - confirmed) / confirmed."""


class CacheBreakpoint(_Out):
    """One `cache_control` breakpoint on a Claude payload."""

    section: Literal["tools", "system", "messages"]
    index: int
    """Block index within its section: the system text block, or the message."""
    ttl: Literal["5m", "1h"]
    why: Literal["history", "bridge", "system", "tools", "request"]
    prefix_tokens: int
    """Tokens the breakpoint caches: everything up to and including its block."""


class AnthropicCachePayload(_Out):
    """The Claude payload with its breakpoints, as `messages.create` takes it: the same
    system and messages as the result's, in content-block form."""

    system: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]]


class PromptCache(_Out):
    """What the provider's prompt cache can expect of this payload (not the count cache)."""

    stable_history: bool
    """History was cut on the cache-stable grid (else newest first)."""
    block_tokens: int | None = None
    """The grid's block, when stable."""
    prefix_tokens: int
    """Tokens at the start of the payload expected identical to the previous turn's
    (system prompt, then the kept history the previous turn also sent)."""
    cut_moved: bool
    """The previous turn kept history this turn drops: only the head repeats."""
    stability_cost_tokens: int
    """History tokens given up to keep the prefix stable (what newest-first would keep
    more)."""
    history_grant_tokens: int
    """Tokens history could use in this fit."""
    breakpoints: list[CacheBreakpoint] = Field(default_factory=list)
    """Claude: where `cache_control` is placed, in payload order."""
    breakpoints_placed_by: Literal["tokenheap", "request"] | None = None
    anthropic: AnthropicCachePayload | None = None
    """Claude, when breakpoints are placed: the payload to send, `cache_control` on."""


class FitResult(_Out):
    """What tokenheap publishes for one request: the payload to send and its manifest."""

    request_id: str
    status: Literal["ok", "error"]
    model: str
    provider: str | None = None
    profile: str | None = None
    count_method: str | None = None
    """e.g. `tiktoken:o200k_base`, `anthropic:count_tokens`, `local:o200k_base@ratio=1.323`
    (a Claude estimate), `estimate:local:…` (the count API did not answer)."""
    exact: bool = False
    """True only when every part was counted by a documented rule or the provider's counter."""
    inexact: list[str] = Field(default_factory=list)
    """When not exact: why, one reason per kind of part (`tool_calls: undocumented framing`)."""
    system: str | list[dict[str, Any]] | None = None
    """Anthropic only: the top-level `system` parameter (a string or text blocks)."""
    messages: list[Message | Turn] = Field(default_factory=list)
    """Plain-text OpenAI requests pass their own turns through (a `Turn` is a `Message`
    with the plain fields); every other message is the SDK's shape as a `Message`."""
    tools: list[dict[str, Any]] | None = None
    """The request's tool definitions, in the target provider's shape."""
    tool_choice: str | dict[str, Any] | None = None
    usage: Usage | None = None
    dropped: list[DroppedItem] = Field(default_factory=list)
    truncated: list[TruncatedItem] = Field(default_factory=list)
    alerts: list[Alert] = Field(default_factory=list)
    error: ErrorInfo | None = None
    tenant: str | None = None
    pipeline: str | None = None
    conversation_id: str | None = None
    cache: CacheUse = Field(default_factory=CacheUse)
    count_audit: CountAudit | None = None
    """Set when this payload's local count was checked against the count API (audit mode)."""
    prompt_cache: PromptCache | None = None
    """The provider's prompt cache: the stable prefix, breakpoints placed (ok results)."""
    prompt_cache_key: str | None = None
    """OpenAI: pass as `prompt_cache_key` (when configured), to route turns of one
    conversation or pipeline to the same cache."""
    metadata: dict[str, Any] | None = None
    """The request's `metadata`, echoed unchanged so a caller can route its answer."""
