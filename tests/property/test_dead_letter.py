"""Dead letters as a contract: any record the broker can hold (null, empty and binary keys,
values and header values) becomes a letter that validates against schemas/dead-letter.json
and replays to the same record byte for byte, inline or, when too large, by reference."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import event, given
from hypothesis import strategies as st

from worker.stream.dlq import NotReplayable, check_referenced, inline_original, parse_letter
from worker.stream.outgoing import Source, dead_letter_message, record_digest

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "dead-letter.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)

# Null, empty and arbitrary bytes, each drawn often enough to meet the others.
maybe_bytes = st.one_of(st.none(), st.just(b""), st.binary(max_size=64))
headers = st.lists(st.tuples(st.text(max_size=12), maybe_bytes), max_size=6)
sources = st.builds(
    Source,
    topic=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=40),
    partition=st.integers(0, 1000),
    offset=st.integers(0, 2**62),
    timestamp_ms=st.one_of(st.none(), st.integers(0, 2**41)),
    key=maybe_bytes,
    value=maybe_bytes,
    headers=headers.map(tuple),
)
reasons = st.text(max_size=200)


def _letter(source: Source, reason: str = "bad", **kw: Any) -> tuple[bytes | None, bytes]:
    out = dead_letter_message(
        "dlq", source, reason_code="invalid_request", reason=reason, group_id="g", **kw
    )
    return out.key, out.value


def _record_at(source: Source, **change: Any) -> ConsumerRecord[bytes, bytes]:
    """What a consumer would read back at the source position."""
    fields: dict[str, Any] = {
        "topic": source.topic,
        "partition": source.partition,
        "offset": source.offset,
        "timestamp": source.timestamp_ms or 0,
        "timestamp_type": 0,
        "key": source.key,
        "value": source.value,
        "checksum": None,
        "serialized_key_size": len(source.key or b""),
        "serialized_value_size": len(source.value or b""),
        "headers": list(source.headers),
    }
    fields.update(change)
    return ConsumerRecord(**fields)


@given(sources, reasons)
def test_any_record_round_trips_through_an_inline_letter(source: Source, reason: str) -> None:
    key, value = _letter(source, reason)
    doc = json.loads(value)
    VALIDATOR.validate(doc)
    assert doc["original"] == "inline" and key == source.key
    original = inline_original(parse_letter(value))
    assert original.topic == source.topic
    assert (original.key, original.value, original.headers) == (
        source.key,
        source.value,
        tuple(source.headers),
    )


# Sizes spread up to twice the limit (hypothesis keeps plain binaries short).
_big = st.tuples(st.binary(min_size=6, max_size=16), st.integers(300, 2_000)).map(
    lambda t: t[0] * t[1]
)
big_values = st.one_of(st.none(), st.binary(max_size=64), _big, _big)


@given(
    sources,
    big_values,
    st.one_of(st.none(), st.binary(max_size=3_000)),
    st.integers(8_192, 16_384),
)
def test_a_letter_always_fits_and_refers_only_when_it_must(
    source: Source, value: bytes | None, key: bytes | None, max_bytes: int
) -> None:
    """Under any limit the letter fits; it is inline whenever the inline letter fits, and a
    reference letter finds the original at its position and nothing else."""
    source = Source(
        source.topic, source.partition, source.offset, source.timestamp_ms, key, value,
        source.headers,
    )  # fmt: skip
    inline_key, inline = _letter(source)
    key_out, out = _letter(source, max_bytes=max_bytes)
    doc = json.loads(out)
    VALIDATOR.validate(doc)
    assert len(key_out or b"") + len(out) <= max_bytes
    letter = parse_letter(out)
    if len(inline_key or b"") + len(inline) <= max_bytes:
        assert doc["original"] == "inline" and _same_but_time(out, inline)
        return
    assert doc["original"] == "reference"
    event("by reference")
    ref = doc["reference"]
    assert ref["value_size"] == (None if value is None else len(value))
    assert ref["key_size"] == (None if key is None else len(key))
    assert (value or b"").startswith(base64.b64decode(ref["head_b64"]))
    with pytest.raises(NotReplayable):
        inline_original(letter)
    original = check_referenced(letter, _record_at(source))
    assert (original.key, original.value, original.headers) == (key, value, tuple(source.headers))
    with pytest.raises(NotReplayable, match="no longer"):
        check_referenced(letter, None)
    with pytest.raises(NotReplayable, match="no longer"):
        check_referenced(letter, _record_at(source, offset=source.offset + 1))
    with pytest.raises(NotReplayable, match="not the original"):
        check_referenced(letter, _record_at(source, value=(value or b"") + b"!"))


def _same_but_time(a: bytes, b: bytes) -> bool:
    da, db = json.loads(a), json.loads(b)
    da.pop("failed_at"), db.pop("failed_at")
    return bool(da == db)


@given(
    st.tuples(maybe_bytes, maybe_bytes, headers),
    st.tuples(maybe_bytes, maybe_bytes, headers),
)
def test_the_record_digest_tells_records_apart(
    a: tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]],
    b: tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]],
) -> None:
    assert (record_digest(*a) == record_digest(*b)) == (a == b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((None, b"", []), (b"", None, [])),
        ((b"ab", b"", []), (b"a", b"b", [])),
        ((None, None, [("h", None)]), (None, None, [("h", b"")])),
        ((None, None, [("h", b"v")]), (None, None, [("hv", None)])),
    ],
)
def test_the_digest_keeps_null_empty_and_splits_apart(a: Any, b: Any) -> None:
    assert record_digest(*a) != record_digest(*b)


LEGACY = {  # as the worker wrote letters before `original`: nulls left out
    "reason_code": "invalid_request",
    "reason": "bad JSON",
    "source_topic": "requests",
    "source_partition": 0,
    "source_offset": 7,
    "value_b64": "eyJ4Ijo=",
    "headers": [{"key": "nul"}, {"key": "empty", "value_b64": ""}],
    "group_id": "g",
    "failed_at": "2026-11-30T10:00:00+00:00",
}


def test_an_older_letter_with_a_null_header_is_still_replayable() -> None:
    original = inline_original(parse_letter(json.dumps(LEGACY).encode()))
    assert (original.key, original.value) == (None, b'{"x":')
    assert original.headers == (("nul", None), ("empty", b""))


def test_an_older_letter_that_dropped_its_value_is_refused() -> None:
    doc = {k: v for k, v in LEGACY.items() if k != "value_b64"}
    doc["reason"] = "too big (original value of 900000 bytes not kept: over the limit)"
    with pytest.raises(NotReplayable, match="did not keep"):
        parse_letter(json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[]", b'{"original": "inline"}'])
def test_what_is_not_a_letter_is_refused(raw: bytes | None) -> None:
    with pytest.raises(NotReplayable):
        parse_letter(raw)
