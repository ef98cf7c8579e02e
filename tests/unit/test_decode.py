"""Bad input gets a clear error that names the field, never echoes the content."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.engine.decode import Limits, _items, check_limits, decode_request
from worker.errors import InvalidRequest, RequestTooLarge

BASE = {"request_id": "r", "model": "gpt-4o", "query": "q"}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({**BASE, "extra_field": 1}, "extra_field"),
        ({"model": "gpt-4o", "query": "q"}, "request_id"),
        ({**BASE, "history": [{"role": "wizard", "content": "x"}]}, "history[0].role"),
        ({**BASE, "chunks": [{"id": "", "text": "x"}]}, "chunks[0].id"),
        ({**BASE, "budget": {"max_context_tokens": -5}}, "budget.max_context_tokens"),
    ],
    ids=["unknown-field", "missing-id", "bad-role", "empty-chunk-id", "negative-budget"],
)
def test_schema_violations_name_the_field(doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(fragment)):
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


_text = st.text(alphabet="aé\u4e2d😀 ", max_size=12)
_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_content = st.one_of(_text, st.lists(_part, min_size=1, max_size=3))


@given(
    system=_text,
    query=st.one_of(_text.filter(bool), st.lists(_part, min_size=1, max_size=2)),
    history=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant"]), "content": _content}
        ),
        max_size=4,
    ),
    chunks=st.lists(_text, max_size=3),
    cap=st.integers(0, 12),
)
def test_item_limit_refuses_exactly_the_texts_over_it(
    system: str, query: object, history: list[object], chunks: list[str], cap: int
) -> None:
    """The quick check (no path built per text) agrees with the texts the error names."""
    doc = {
        **BASE,
        "system": system,
        "query": query,
        "history": history,
        "chunks": [{"id": str(i), "text": t} for i, t in enumerate(chunks)],
    }
    req = decode_request(json.dumps(doc))
    over = [where for where, text in _items(req) if len(text) > cap]
    if over:
        with pytest.raises(RequestTooLarge, match=re.escape(over[0])):
            check_limits(req, Limits(max_item_chars=cap))
    else:
        check_limits(req, Limits(max_item_chars=cap))


@given(
    system=_text,
    history=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant"]), "content": _content}
        ),
        max_size=2,
    ),
    long=st.one_of(
        st.text(alphabet="ab ", min_size=200, max_size=400),
        st.text(alphabet='a\u00e9\u4e2d\U0001f600\n"\\ ', min_size=1, max_size=300),
    ),
    where=st.sampled_from(["query", "chunk", "turn"]),
    ascii_only=st.booleans(),
    as_bytes=st.booleans(),
    data=st.data(),
)
def test_a_request_within_the_item_limit_skips_the_walk_and_misses_nothing(
    system: str,
    history: list[dict[str, object]],
    long: str,
    where: str,
    ascii_only: bool,
    as_bytes: bool,
    data: st.DataObject,
) -> None:
    """decode_request skips the per-text walk when the JSON is no bigger than the item
    limit; that is sound only because no text has more characters than its JSON has
    bytes, escapes (`\\ud83d\\ude00` is one character) included. With one text that is most
    of the request and limits at and around its length and the request's size, decode
    refuses exactly what the walk over every text would."""
    doc: dict[str, object] = {**BASE, "system": system, "history": history}
    if where == "query":
        doc["query"] = long
    elif where == "chunk":
        doc["chunks"] = [{"id": "c", "text": long}]
    else:
        doc["history"] = [*history, {"role": "user", "content": long}]
    text = json.dumps(doc, ensure_ascii=ascii_only)
    size = len(text.encode("utf-8"))
    walked = decode_request(text)
    assert max(len(t) for _, t in _items(walked)) <= size
    edges = [len(long) - 1, len(long), size - 1, size]
    cap = data.draw(st.sampled_from(edges) | st.integers(1, size + 2), label="cap")
    limits = Limits(max_item_chars=cap)
    over = [w for w, t in _items(walked) if len(t) > limits.max_item_chars]
    raw = text.encode("utf-8") if as_bytes else text
    if over:
        with pytest.raises(RequestTooLarge, match=re.escape(over[0])):
            decode_request(raw, limits)
    else:
        decode_request(raw, limits)


def test_the_walk_is_skipped_only_when_the_request_is_within_the_item_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.engine.decode as decode

    def walked(req: object) -> int:
        raise AssertionError("walked")

    monkeypatch.setattr(decode, "_longest", walked)
    text = json.dumps({**BASE, "query": "q" * 50})
    size = len(text.encode("utf-8"))
    decode_request(text, Limits(max_item_chars=size))  # not walked
    with pytest.raises(AssertionError, match="walked"):
        decode_request(text, Limits(max_item_chars=size - 1))


@pytest.mark.parametrize("text", ["a" * 60, "é" * 30, "😀" * 15])
def test_byte_limit_counts_utf8_bytes_of_a_str(text: str) -> None:
    doc = json.dumps({**BASE, "system": text}, ensure_ascii=False)
    size = len(doc.encode("utf-8"))
    decode_request(doc, Limits(max_request_bytes=size))
    with pytest.raises(RequestTooLarge, match=f"request is {size} bytes"):
        decode_request(doc, Limits(max_request_bytes=size - 1))
