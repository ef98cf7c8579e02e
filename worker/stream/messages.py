"""Contract of the dead letters the worker publishes (schemas/dead-letter.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Header(_Out):
    """One record header. Kafka allows a null value as well as an empty one: `value_b64` is
    null for null, "" for empty, the base64 of the bytes otherwise, and is always written."""

    key: str
    value_b64: str | None


class OriginalReference(_Out):
    """A record too large to copy into its letter (base64 grows it by a third): where it is
    (`source_topic`/`source_partition`/`source_offset` of the letter) and how to recognise it
    there. `record_sha256` covers the key, the value and the headers (see
    `worker.stream.outgoing.record_digest`), so a replay that re-reads the position can tell
    the same record from whatever a recreated topic put at that offset."""

    record_sha256: str
    """Hex SHA-256 of the record's key, value and headers, length-prefixed."""
    value_sha256: str | None
    """Hex SHA-256 of the value alone (null for a null value): compare with `sha256sum`."""
    value_size: int | None
    """Bytes of the value (null for a null value)."""
    key_size: int | None
    """Bytes of the key (null for a null key)."""
    header_count: int
    head_b64: str
    """The first bytes of the value (at most a few KiB), base64, to see what it was."""


_ORIGINAL_RULE: dict[str, Any] = {
    "if": {"properties": {"original": {"const": "reference"}}},
    "then": {
        "properties": {
            "reference": {"type": "object"},
            "key_b64": {"type": "null"},
            "value_b64": {"type": "null"},
            "headers": {"maxItems": 0},
        }
    },
    "else": {"properties": {"reference": {"type": "null"}}},
}
"""The schema's side of `DeadLetter._one_original`."""


class DeadLetter(_Out):
    """A message the worker could not process: why, the original bytes, where it came from.

    `original` says where the original record is. "inline": `key_b64`, `value_b64` and
    `headers` are the record itself (null stays null, empty stays empty), and `reference` is
    null. "reference": the record was too large for one letter; the three are null/empty
    and `reference` says how to find and check it in the source topic."""

    # Every field is always written (nulls included): a reader can tell a null value from
    # a missing one, and the schema says so by requiring all of them.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_serialization_defaults_required=True,
        json_schema_extra={"allOf": [_ORIGINAL_RULE]},
    )

    reason_code: str
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    original: Literal["inline", "reference"]
    key_b64: str | None = None
    value_b64: str | None = None
    headers: list[Header] = Field(default_factory=list)
    reference: OriginalReference | None = None
    group_id: str
    failed_at: datetime

    @model_validator(mode="after")
    def _one_original(self) -> DeadLetter:
        """Inline letters hold the record and no reference; reference letters the reverse."""
        if self.original == "reference":
            copies = self.key_b64 is not None or self.value_b64 is not None or self.headers
            if self.reference is None or copies:
                raise ValueError("a reference letter has a reference and no inline copy")
        elif self.reference is not None:
            raise ValueError("an inline letter has no reference")
        return self
