"""The fitted-context result contract (schemas/result.json is generated from it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class FitResult(_Out):
    """What tokenheap publishes for one request: the payload to send and its manifest."""

    request_id: str
    status: Literal["ok", "error"]
    model: str
    provider: str | None = None
    profile: str | None = None
    count_method: str | None = None
    """e.g. `tiktoken:o200k_base`, `anthropic:count_tokens`, `estimate:utf8_bytes/3`."""
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
