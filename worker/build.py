"""The engine and request limits as the settings describe them: shared by the CLI and the
Kafka service, so neither imports the other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.catalog import CachingConfig, load_catalog
from worker.count.backends import BackendName
from worker.count.cache import CountCache
from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.count.anthropic_api import AnthropicCounter


def build_engine(settings: Settings, backend: BackendName | None = None) -> Engine:
    """The engine as configured: catalog, shared cache, counting threads, Claude client."""
    catalog = load_catalog(settings.config_dir)
    caching = CachingConfig(
        anthropic_ttl=settings.anthropic_cache_ttl,
        anthropic_breakpoints=settings.anthropic_breakpoints,
        prompt_cache_key=settings.prompt_cache_key,
    )
    catalog = catalog.model_copy(update={"caching": caching})
    cache = CountCache(settings.cache_bytes)

    def anthropic() -> AnthropicCounter:
        from worker.count.anthropic_api import AnthropicCounter, make_client

        client = make_client(
            settings.api_key() or "unset",
            settings.anthropic_base_url,
            settings.anthropic_timeout_s,
            settings.anthropic_max_retries,
        )
        return AnthropicCounter(client, cache=cache, deadline_s=settings.anthropic_deadline_s)

    configured = bool(settings.api_key() or settings.anthropic_base_url)
    return Engine(
        catalog=catalog,
        cache=cache,
        count_threads=settings.count_workers,
        backend=backend or settings.count_backend,
        anthropic_factory=anthropic if configured else None,
        on_unavailable=settings.on_count_unavailable,
    )


def limits_of(settings: Settings) -> Limits:
    return Limits(
        max_request_bytes=settings.max_request_bytes,
        max_history_turns=settings.max_history_turns,
        max_chunks=settings.max_chunks,
        max_item_chars=settings.max_item_chars,
    )
