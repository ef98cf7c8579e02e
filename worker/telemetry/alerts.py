"""Contract of the alert messages (schemas/alert.json): per-request alerts and sustained
raises and clears, decided by telemetry and published by the Kafka service."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


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
