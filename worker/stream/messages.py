"""Contract of the dead letters the worker publishes (schemas/dead-letter.json)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
