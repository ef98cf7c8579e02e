"""Contracts of what tokenheap publishes besides results: alerts and dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowStats(_Out):
    """The sliding window behind a sustained alert."""

    requests: int
    over_threshold: int
    share: float
    """over_threshold / requests."""
    share_limit: float
    """The share that raises the alert."""
    clear_below: float
    """The share under which a raised alert clears (hysteresis)."""
    utilization_threshold: float
    window_seconds: float | None = None


class AlertMessage(_Out):
    """One message on the alerts topic: a per-request alert, or a sustained raise/clear."""

    kind: Literal["request", "sustained"]
    type: str
    """e.g. utilization_high, top_chunk_dropped, history_below_min, sustained_utilization."""
    state: Literal["raised", "cleared"] = "raised"
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str
    request_id: str | None = None
    tenant: str | None = None
    pipeline: str | None = None
    model: str
    value: float | None = None
    threshold: float | None = None
    window: WindowStats | None = None
    at: datetime


class Header(_Out):
    key: str
    value_b64: str | None


class DeadLetter(_Out):
    """A message the worker could not process: why, the original bytes, where it came from."""

    reason_code: str
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    key_b64: str | None = None
    value_b64: str | None = None
    headers: list[Header] = Field(default_factory=list)
    group_id: str
    failed_at: datetime
