"""One frozen settings object: `TOKENHEAP_*` environment variables over an optional YAML file.

Only the CLI and the app read Settings; everything else takes plain arguments.
`tokenheap config-docs` prints the reference table the README carries, from this model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENHEAP_", frozen=True, extra="forbid", env_nested_delimiter="__"
    )

    # Kafka
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    group_id: str = Field("tokenheap", description="Consumer group of the fleet")
    requests_topic: str = Field("tokenheap.requests", description="Topic of assembly requests")
    results_topic: str = Field("tokenheap.results", description="Topic of fitted contexts")
    alerts_topic: str = Field("tokenheap.alerts", description="Topic of budget alerts")
    dead_letter_topic: str = Field("tokenheap.dlq", description="Topic of rejected messages")
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once", description="Delivery mode; exactly-once uses Kafka transactions"
    )
    offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new group starts reading"
    )
    processes: int = Field(
        1,
        ge=1,
        le=256,
        description="Worker processes forked from one (each a core's worth; one health port)",
    )
    max_in_flight: int = Field(256, ge=1, description="Messages being processed at once")
    max_in_flight_per_partition: int = Field(
        64, ge=1, description="Backpressure: pause a partition holding this many"
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often offsets are committed")
    drain_timeout_s: float = Field(20.0, gt=0, description="Shutdown drain deadline")
    create_topics: bool = Field(False, description="Create missing topics at startup")
    topic_partitions: int = Field(6, ge=1, description="Partitions of topics it creates")
    topic_replication: int = Field(1, ge=1, description="Replication of topics it creates")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism"
    )
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS")
    health_host: str = Field("127.0.0.1", description="Health endpoint address")
    health_port: int = Field(8080, ge=0, le=65535, description="Health endpoint port (0: off)")
    kafka_session_timeout_s: float = Field(
        10.0, gt=0, description="Group session timeout: how soon a dead worker's partitions move"
    )
    kafka_heartbeat_interval_s: float = Field(
        3.0, gt=0, description="Group heartbeat interval (under a third of the session timeout)"
    )
    kafka_max_poll_interval_s: float = Field(
        300.0, gt=0, description="Longest gap between fetches before the group drops a worker"
    )
    kafka_request_timeout_s: float = Field(
        30.0, gt=0, description="Bound on one Kafka request (commits, joins, metadata)"
    )
    kafka_delivery_timeout_s: float = Field(
        30.0, gt=0, description="Bound on one message's delivery before the client restarts"
    )
    kafka_startup_timeout_s: float = Field(
        300.0, gt=0, description="How long a starting worker waits for an unreachable broker"
    )

    # Engine
    config_dir: Path | None = Field(
        None, description="Folder with models.yaml and profiles.yaml (default: bundled)"
    )
    count_workers: int = Field(2, ge=1, description="Threads counting tokens in parallel")
    count_backend: Literal["tiktoken", "fastokens", "auto"] = Field(
        "auto",
        description="Local BPE: tiktoken, or fastokens (exact, faster, ~2 s to load); "
        "auto = fastokens for the worker, tiktoken for `fit`",
    )
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0, description="Count cache bound, bytes")
    cache_text_chars: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="Text the count cache keeps to answer resent text exactly, characters",
    )
    cache_message_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Native messages whose parsing, SDK form and bill are kept for their "
        "next resend, bytes of their JSON (0: off)",
    )
    max_request_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Largest request accepted; at most TOKENHEAP_MAX_MESSAGE_BYTES",
    )
    max_history_turns: int = Field(2000, ge=0, description="Most history turns per request")
    max_chunks: int = Field(2000, ge=0, description="Most chunks per request")
    max_item_chars: int = Field(262_144, ge=1, description="Longest single text item")

    # Anthropic counting
    anthropic_api_key: SecretStr | None = Field(
        None, description="Key for messages.count_tokens (falls back to ANTHROPIC_API_KEY)"
    )
    anthropic_base_url: str | None = Field(None, description="Anthropic API base URL")
    anthropic_timeout_s: float = Field(10.0, gt=0, description="Per-call timeout")
    anthropic_max_retries: int = Field(
        3, ge=0, description="Retries of 5xx/timeouts (429s wait in the count rate limiter)"
    )
    anthropic_deadline_s: float = Field(
        30.0, gt=0, description="Bound on one count call, retries and retry-after waits included"
    )
    on_count_unavailable: Literal["fail", "estimate"] = Field(
        "fail",
        description="When the count API cannot answer: a retriable error, or an estimate",
    )
    claude_counting: Literal["api", "local", "audit"] = Field(
        "api",
        description="Claude counts: api = one count_tokens call per payload (exact); "
        "local = no call (estimate); audit = local, a sample confirmed",
    )
    anthropic_count_rpm: float = Field(
        100.0,
        gt=0,
        description="count_tokens calls per minute this worker allows itself "
        "(your organisation's limit: 100 on the lowest older tier)",
    )
    anthropic_count_burst: int = Field(
        10, ge=1, description="count_tokens calls allowed at once before the RPM spacing"
    )
    claude_audit_fraction: float = Field(
        0.05, ge=0, le=1, description="audit mode: share of payloads confirmed by the API"
    )
    claude_drift_threshold: float = Field(
        0.02,
        gt=0,
        description="audit mode: alert when the p95 of abs(local - API) / API passes this",
    )

    # Provider prompt caches
    anthropic_cache_ttl: Literal["5m", "1h"] = Field(
        "5m", description="Lifetime of the cache_control breakpoints placed on Claude payloads"
    )
    anthropic_breakpoints: bool = Field(
        True, description="Place cache_control on Claude payloads' stable prefix"
    )
    prompt_cache_key: Literal["off", "conversation", "pipeline"] = Field(
        "off",
        description="OpenAI prompt_cache_key in results: from conversation_id (else the "
        "pipeline), the pipeline, or none",
    )

    # Telemetry (OpenTelemetry itself is configured by the standard OTEL_* variables)
    sustained_window_requests: int = Field(
        100,
        ge=0,
        description="Sustained alert: last N requests per tenant/pipeline/model (0: time only)",
    )
    sustained_min_requests: int = Field(
        20, ge=1, description="Sustained alert: fewest requests to judge"
    )
    sustained_share_limit: float = Field(
        0.5, gt=0, le=1, description="Sustained alert: over-threshold share that raises"
    )
    sustained_clear_below: float = Field(
        0.25, ge=0, lt=1, description="Sustained alert: share under which it clears"
    )
    sustained_window_s: float | None = Field(
        None, gt=0, description="Sustained alert: time window, seconds"
    )
    sustained_max_keys: int = Field(
        10_000, ge=1, description="Sustained alert: keys tracked at once"
    )
    telemetry_max_attribute_values: int = Field(
        100, ge=1, description="Distinct tenant/pipeline/model values per metric before _other"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
    log_format: Literal["json", "text"] = Field(
        "json", description="JSON lines with trace ids, or text"
    )

    # Appended (operations): message size
    max_message_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Largest Kafka message the producers send (their max_request_size); "
        "keep it at most the broker's message.max.bytes (default 1 MiB)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = os.environ.get("TOKENHEAP_SETTINGS_FILE")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def api_key(self) -> str | None:
        if self.anthropic_api_key is not None:
            return self.anthropic_api_key.get_secret_value()
        return os.environ.get("ANTHROPIC_API_KEY")


def reference_table() -> str:
    """Markdown table of every setting, its variable and default (for the README)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, f in Settings.model_fields.items():
        default = "" if f.default is None else f"`{f.default}`"
        rows.append(f"| `TOKENHEAP_{name.upper()}` | {default} | {f.description or ''} |")
    return "\n".join(rows)
