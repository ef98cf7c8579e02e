"""Bad input gets a clear error that names the field, never echoes the content."""

from __future__ import annotations

import json

import pytest

from worker.engine.decode import Limits, decode_request
from worker.errors import InvalidRequest, RequestTooLarge

BASE = {"request_id": "r", "model": "gpt-4o", "query": "q"}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({**BASE, "extra_field": 1}, "extra_field"),
        ({"model": "gpt-4o", "query": "q"}, "request_id"),
        ({**BASE, "history": [{"role": "wizard", "content": "x"}]}, "history.0.role"),
        ({**BASE, "chunks": [{"id": "", "text": "x"}]}, "chunks.0.id"),
        ({**BASE, "budget": {"max_context_tokens": -5}}, "budget.max_context_tokens"),
    ],
    ids=["unknown-field", "missing-id", "bad-role", "empty-chunk-id", "negative-budget"],
)
def test_schema_violations_name_the_field(doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment.replace(".", r"\.")):
        decode_request(json.dumps(doc).encode())


def test_malformed_json_is_invalid() -> None:
    with pytest.raises(InvalidRequest):
        decode_request(b'{"request_id": ')


def test_content_is_not_echoed_in_errors() -> None:
    canary = "CANARY-7f3a-secret-prompt"
    doc = {**BASE, "history": [{"role": canary, "content": canary}]}
    with pytest.raises(InvalidRequest) as err:
        decode_request(json.dumps(doc).encode())
    assert canary not in str(err.value)


@pytest.mark.parametrize(
    ("limits", "doc"),
    [
        (Limits(max_request_bytes=100), {**BASE, "system": "s" * 200}),
        (Limits(max_chunks=2), {**BASE, "chunks": [{"id": str(i), "text": "t"} for i in range(3)]}),
        (Limits(max_history_turns=1), {**BASE, "history": [{"role": "user", "content": "a"}] * 2}),
        (Limits(max_item_chars=10), {**BASE, "query": "q" * 11}),
    ],
    ids=["bytes", "chunks", "turns", "item-chars"],
)
def test_limits_bound_the_work(limits: Limits, doc: dict[str, object]) -> None:
    with pytest.raises(RequestTooLarge):
        decode_request(json.dumps(doc).encode(), limits)
