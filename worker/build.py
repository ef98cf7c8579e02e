"""The engine and request limits as the settings describe them: shared by the CLI and the
Kafka service, so neither imports the other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.catalog import CachingConfig, default_config_dir, load_catalog
from worker.count.backends import BackendName
from worker.count.cache import CountCache
from worker.count.limiter import RateLimiter
from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.memo import MessageMemo
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.count.claude_confirm import PayloadConfirmer


def build_engine(settings: Settings, backend: BackendName | None = None) -> Engine:
    """The engine as configured: catalog, shared cache, counting threads, Claude client.

    The Claude client is one per engine: one rate limiter spaces every request's
    count_tokens calls, and one digest cache answers payloads counted before."""
    catalog = load_catalog(settings.config_dir)
    caching = CachingConfig(
        anthropic_ttl=settings.anthropic_cache_ttl,
        anthropic_breakpoints=settings.anthropic_breakpoints,
        prompt_cache_key=settings.prompt_cache_key,
    )
    catalog = catalog.model_copy(update={"caching": caching})
    cache = CountCache(settings.cache_bytes, settings.cache_text_chars)
    limiter = RateLimiter(settings.anthropic_count_rpm, burst=settings.anthropic_count_burst)

    def anthropic() -> PayloadConfirmer:
        from worker.count.anthropic_api import make_client
        from worker.count.claude_confirm import PayloadConfirmer

        client = make_client(
            settings.api_key() or "unset",
            settings.anthropic_base_url,
            settings.anthropic_timeout_s,
            settings.anthropic_max_retries,
        )
        return PayloadConfirmer(
            client,
            limiter,
            attempts=settings.anthropic_max_retries + 1,
            deadline_s=settings.anthropic_deadline_s,
        )

    configured = bool(settings.api_key() or settings.anthropic_base_url)
    return Engine(
        catalog=catalog,
        cache=cache,
        count_threads=settings.count_workers,
        backend=backend or settings.count_backend,
        anthropic_factory=anthropic if configured else None,
        on_unavailable=settings.on_count_unavailable,
        claude_counting=settings.claude_counting,
        claude_audit_fraction=settings.claude_audit_fraction,
        claude_drift_threshold=settings.claude_drift_threshold,
        claude_tokenizers=(settings.config_dir or default_config_dir()) / "models.yaml",
        memo=MessageMemo(settings.cache_message_bytes) if settings.cache_message_bytes else None,
    )


def limits_of(settings: Settings) -> Limits:
    return Limits(
        max_request_bytes=settings.max_request_bytes,
        max_history_turns=settings.max_history_turns,
        max_chunks=settings.max_chunks,
        max_item_chars=settings.max_item_chars,
    )
