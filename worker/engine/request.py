"""The prompt-assembly request contract (schemas/request.json is generated from it)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class _Strict(BaseModel):
    # Unknown fields are rejected so a typo in a producer fails loudly, not silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Turn(_Strict):
    """One message of the conversation history, oldest first in `history`."""

    role: Literal["user", "assistant", "tool", "system", "developer"]
    content: str
    name: str | None = None
    """OpenAI's optional participant name; costs tokens, so it is counted."""
    tool_call_id: str | None = None
    """For role `tool`: the call this result answers (kept with its call when trimming)."""
    pin: bool = Field(default=False, exclude=True)
    """Extension: never drop this turn (its exchange) when fitting; never sent."""


NativeMessage = Annotated[
    dict[str, Any],
    Field(
        description="A message in a provider's native shape (OpenAI Chat Completions or "
        "Anthropic Messages: content parts/blocks, tool_calls, tool results, images, "
        "documents, thinking, cache_control), with the extensions `pin` (never drop) and, on "
        "an image given by URL, `width`/`height`. Validated against the provider's rules when "
        "the request is prepared, with the path of a refused part."
    ),
]
"""Loosely typed here so a refused part is reported by the provider rules with its path,
not as a list of every union branch pydantic tried."""

Part = Annotated[
    dict[str, Any],
    Field(description="A content part (OpenAI) or block (Anthropic): text, image, document."),
]


class Chunk(_Strict):
    """A retrieved passage; `chunks` arrive in relevance order, best first."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    text: str
    score: float | None = None


class SlotOverrides(_Strict):
    """Per-request overrides of the profile's slot shares (fractions of the context window)."""

    history: Annotated[float, Field(ge=0, le=1)] | None = None
    context: Annotated[float, Field(ge=0, le=1)] | None = None
    system: Annotated[float, Field(ge=0, le=1)] | None = None


class BudgetSpec(_Strict):
    # strict: JSON `true` is not the number 1, nor 8192.5 a window
    max_context_tokens: Annotated[int, Field(gt=0, strict=True)] | None = None
    """At most the model's context window from config/models.yaml, its default; a larger
    value is fitted to the window, with a `window_capped` alert."""
    output_reserve: Annotated[int, Field(ge=0, strict=True)] | None = None
    """Tokens kept free for the reply; defaults to the profile's output share."""
    profile: str = "rag-chatbot"
    slots: SlotOverrides | None = None
    reflow: bool | None = None
    """Let budget one slot leaves unused flow to the others (profile default if unset)."""
    truncate_chunks: bool | None = None
    """Cut the first chunk that does not fit at a token boundary instead of skipping it."""
    alert_threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    stable_history: bool | None = None
    """Cut history only at cache-stable points so the prompt prefix repeats across turns
    (profile default if unset)."""
    max_input_cost: Annotated[Decimal, Field(ge=0)] | None = None
    """Most USD the input may cost, nothing assumed cached; lowers the token budget."""
    cache_ttl: Literal["5m", "1h"] | None = None
    """Claude: lifetime of the `cache_control` breakpoints placed (setting if unset)."""
    prompt_cache_key: Literal["off", "conversation", "pipeline"] | None = None
    """OpenAI: derive `prompt_cache_key` from the conversation id or the pipeline
    (setting if unset)."""


class AssemblyRequest(_Strict):
    """What a pipeline asks tokenheap to fit into one LLM call."""

    request_id: Annotated[str, Field(min_length=1, max_length=256)]
    model: Annotated[str, Field(min_length=1, max_length=128)]
    system: str | list[Part] = ""
    """A string, or (Anthropic) a list of text blocks, `cache_control` kept."""
    history: list[Annotated[Turn | NativeMessage, Field(union_mode="left_to_right")]] = Field(
        default_factory=list
    )
    """Plain-text turns (the original contract) or provider-native messages, oldest first."""
    chunks: list[Chunk] = Field(default_factory=list)
    query: str | list[Part]
    """A string, or a list of content parts (a user's screenshot with a question)."""
    tools: list[dict[str, Any]] | None = None
    """Tool definitions in either provider's native shape, emitted as given (converted for
    the other provider)."""
    tool_choice: str | dict[str, Any] | None = None
    """Native `tool_choice` of either provider, emitted as given (converted when needed)."""
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    _from_json: bool = PrivateAttr(default=False)
    """Decoded from JSON text (`decode_request`): its native messages hold JSON values only,
    so their JSON text is a faithful key for `worker.engine.memo` (a Python caller's dict
    may hold a tuple where JSON has a list, which strict parsing treats differently)."""
    tenant: str | None = None
    pipeline: str | None = None
    conversation_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
