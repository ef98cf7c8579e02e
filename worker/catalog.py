"""The model registry, budget profiles and render templates, loaded from `config/*.yaml`.

These are data, not code: operators add a model or tune a profile without a release.
Loaded once at startup and validated, so a bad file stops the process before it consumes.
"""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Callable
from decimal import Decimal
from functools import cache, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.configfiles import default_config_dir as default_config_dir  # re-exported
from worker.configfiles import model_key
from worker.configfiles import read_yaml as read_yaml  # re-exported
from worker.errors import ConfigError, UnknownModel, UnknownProfile

Provider = Literal["openai", "anthropic"]
SlotName = Literal["history", "context"]


CacheTTL = Literal["5m", "1h"]
"""How long a cache write lives: Anthropic's `ephemeral` default, or `ttl: "1h"`."""
Rate = Annotated[Decimal, Field(ge=0)]


class Prices(BaseModel):
    """One model's list prices, USD per million tokens; absent rates fall back to `input`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Rate
    """Uncached input tokens."""
    output: Rate
    """Output tokens, reasoning included."""
    cached_input: Rate | None = None
    """Input read from the prompt cache; None: the model has no cache discount."""
    cache_write_5m: Rate | None = None
    """Input written to a 5-minute cache entry; None: no write fee (billed as `input`)."""
    cache_write_1h: Rate | None = None
    """Input written to a 1-hour cache entry; None: no write fee (billed as `input`)."""
    cache_min_tokens: Annotated[int, Field(ge=0)] | None = None
    """Shortest prefix the provider caches (silently uncached below); None: no caching."""
    currency: Literal["USD"] = "USD"
    source: str
    """Where the figures were read (page or table), so a reviewer can check them."""
    as_of: dt.date
    """When they were read; prices change, an old date is a reason to look again."""

    def write_rate(self, ttl: CacheTTL) -> Decimal:
        rate = self.cache_write_5m if ttl == "5m" else self.cache_write_1h
        return self.input if rate is None else rate

    def read_rate(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Frozen):
    provider: Provider
    context_window: Annotated[int, Field(gt=0)]
    max_output: Annotated[int, Field(gt=0)]
    max_input: Annotated[int, Field(gt=0)] | None = None
    encoding: str | None = None
    prices: Prices | None = None
    """List prices (USD per million tokens); None: cost is not reported for the model."""
    tokenizer_family: str | None = None
    """Claude: a key of `claude_tokenizers.families` (the local estimate's learned ratio)."""

    @model_validator(mode="after")
    def _openai_needs_encoding(self) -> ModelInfo:
        if self.provider == "openai" and not self.encoding:
            raise ValueError("an OpenAI model needs `encoding` (o200k_base or cl100k_base)")
        return self


class ChatFraming(_Frozen):
    per_message: int = 3
    per_name: int = 1
    reply_priming: int = 3


class Shares(_Frozen):
    output: Annotated[float, Field(ge=0, lt=1)] = 0.10
    system: Annotated[float, Field(ge=0, le=1)] = 0.05
    history: Annotated[float, Field(ge=0, le=1)] = 0.30
    context: Annotated[float, Field(ge=0, le=1)] = 0.55


class Profile(_Frozen):
    name: str
    shares: Shares = Shares()
    priority: tuple[SlotName, ...] = ("context", "history")
    alert_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    reflow: bool = True
    truncate_chunks: bool = False
    min_truncate_tokens: Annotated[int, Field(ge=1)] = 64
    min_history_turns: Annotated[int, Field(ge=0)] = 2
    stable_history: bool = False
    """Cut history only on the cache-stable grid (worker/engine/stable_cut.py)."""
    history_block_share: Annotated[float, Field(gt=0, le=1)] = 0.3
    """The grid's block as a share of the context window."""

    @model_validator(mode="after")
    def _priority_is_a_permutation(self) -> Profile:
        if sorted(self.priority) != ["context", "history"]:
            raise ValueError("priority must list `context` and `history` once each")
        return self


# Characters a unit may start with: none of them can extend a pre-tokenizer piece that ends
# in a newline, so counts of consecutive units add up (see tests/property/test_counting.py).
_SAFE_FIRST = frozenset(string.ascii_letters + string.digits + "[<#")


class RenderTemplates(_Frozen):
    context_header: str = "Context:\n\n"
    chunk_template: str = "[{id}] {text}\n\n"
    query_template: str = "Question: {query}"

    def chunk_unit(self) -> Callable[[str, str], str]:
        """`(id, text) -> chunk_template.format(id=id, text=text)`, the same string, built
        by one join when the template is plain fields and literals (every chunk of every
        request goes through it: `str.format` parses the template each call, ~3x the cost)."""
        return _unit_maker(self.chunk_template)

    @model_validator(mode="after")
    def _units_add_up(self) -> RenderTemplates:
        for name, tpl, fields in (
            ("context_header", self.context_header, set()),
            ("chunk_template", self.chunk_template, {"id", "text"}),
            ("query_template", self.query_template, {"query"}),
        ):
            used = {f for _, f, _, _ in string.Formatter().parse(tpl) if f}
            if used != fields:
                raise ValueError(f"{name} must use exactly the fields {sorted(fields)}")
            if not tpl or tpl[0] not in _SAFE_FIRST:
                raise ValueError(f"{name} must start with a letter, digit, '[', '<' or '#'")
        for name, tpl in (
            ("context_header", self.context_header),
            ("chunk_template", self.chunk_template),
        ):
            if not tpl.endswith("\n"):
                raise ValueError(f"{name} must end with a newline")
        return self


@lru_cache(maxsize=8)
def _unit_maker(template: str) -> Callable[[str, str], str]:
    literals = [""]  # the literal text before, between and after the fields
    order: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        literals[-1] += literal  # an escaped brace splits a literal in two
        if field is None:
            continue
        if spec or conversion or field not in ("id", "text"):
            return lambda id, text: template.format(id=id, text=text)
        order.append(field)
        literals.append("")
    if order != ["id", "text"]:
        return lambda id, text: template.format(id=id, text=text)
    a, b, c = literals
    join = "".join
    return lambda id, text: join((a, id, b, text, c))


class CachingConfig(_Frozen):
    """Provider prompt-cache options the deployment sets (TOKENHEAP_* settings)."""

    anthropic_ttl: CacheTTL = "5m"
    """Lifetime of the `cache_control` breakpoints tokenheap places on Claude payloads."""
    anthropic_breakpoints: bool = True
    """Place `cache_control` on Claude payloads' stable prefix."""
    prompt_cache_key: Literal["off", "conversation", "pipeline"] = "off"
    """OpenAI: emit `prompt_cache_key` from the conversation id (else the pipeline) or the
    pipeline."""


class Catalog(_Frozen):
    """Everything the engine needs from `config/`: models, framing, profiles, templates."""

    models: dict[str, ModelInfo]
    framing: ChatFraming = ChatFraming()
    profiles: dict[str, Profile]
    render: RenderTemplates = RenderTemplates()
    caching: CachingConfig = CachingConfig()

    def model(self, name: str) -> ModelInfo:
        found = self.models.get(name)
        if found is not None:
            return found
        best = model_key(self.models, name)
        if best is None:
            raise UnknownModel(
                f"unknown model {name!r}: add it to config/models.yaml "
                "(provider, context_window, max_output, and encoding for OpenAI models)"
            )
        return self.models[best]

    def local_encodings(self) -> list[str]:
        """The vocabularies its OpenAI models count with, sorted: what a worker loads at
        start-up (and a `TOKENHEAP_PROCESSES` parent before forking)."""
        return sorted(
            {m.encoding for m in self.models.values() if m.provider == "openai" and m.encoding}
        )

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise UnknownProfile(
                f"unknown budget profile {name!r}; known: {', '.join(sorted(self.profiles))}"
            ) from None


def load_catalog(config_dir: Path | None = None) -> Catalog:
    folder = config_dir or default_config_dir()
    models_doc = read_yaml(folder / "models.yaml")
    profiles_doc = read_yaml(folder / "profiles.yaml")
    defaults = profiles_doc.get("defaults") or {}
    try:
        profiles = {
            name: Profile(name=name, **{**defaults, **(body or {})})
            for name, body in (profiles_doc.get("profiles") or {}).items()
        }
        return Catalog(
            models=models_doc.get("models") or {},
            framing=(models_doc.get("framing") or {}).get("openai", {}),
            profiles=profiles,
            render=profiles_doc.get("render") or {},
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration in {folder}: {exc}") from None


@cache
def default_catalog() -> Catalog:
    return load_catalog()
