"""Random agent transcripts fitted at every budget: never an orphan, SDK-valid output, the
drop manifest names every message of a dropped unit, usage adds up; tool definitions recount
by the cookbook's rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import chat_tokens
from tests.property.test_provider_transcripts import claude_transcripts, openai_transcripts
from tests.support.contract import assert_result_contract
from tests.unit.test_native_fit import check_anthropic_output, check_openai_output
from worker.count.vocab import encoding
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult

SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("NATIVE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _request(history: list[dict[str, Any]], model: str, window: int) -> AssemblyRequest:
    return AssemblyRequest.model_validate(
        {
            "request_id": "p",
            "model": model,
            "system": "Be brief.",
            "history": history,
            "chunks": [{"id": "c0", "text": "A fact."}, {"id": "c1", "text": "Another fact."}],
            "query": "And now?",
            "budget": {"max_context_tokens": window, "output_reserve": 16},
        }
    )


def _check_common(result: FitResult) -> bool:
    if result.status == "error":
        assert result.error is not None
        assert result.error.code == "over_budget", result.error
        return False
    u = result.usage
    assert u is not None
    assert u.total_tokens == u.system + u.history + u.context + u.query + u.framing + u.tools
    assert u.total_tokens <= u.budget_tokens
    # every message of a dropped exchange is listed under the same unit, and units are whole
    units: dict[int | None, list[int]] = {}
    for d in result.dropped:
        if d.slot == "history":
            units.setdefault(d.unit, []).append(d.index or 0)
    for members in units.values():
        assert members == list(range(members[0], members[0] + len(members)))
    return True


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5"])
@SETTINGS
@given(history=openai_transcripts(), window=st.integers(60, 3000))
def test_openai_agent_transcripts_trim_without_orphans(
    make_engine: Callable[[], Engine], model: str, history: list[dict[str, Any]], window: int
) -> None:
    engine = make_engine()
    engine.on_unavailable = "estimate"
    result = engine.fit_sync(_request(history, model, window))
    assert_result_contract(result)
    if not _check_common(result):
        return
    if model == "gpt-4o":
        check_openai_output(result)
        sent = len(result.messages) - 2  # the system message and the final user message
        dropped = sum(1 for d in result.dropped if d.slot == "history")
        assert sent + dropped == len(history)
        kept_pins = sum(1 for m in history if m.get("pin"))
        assert kept_pins <= sent
    else:
        check_anthropic_output(result)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gpt-4o"])
@SETTINGS
@given(history=claude_transcripts(), window=st.integers(60, 6000))
def test_claude_agent_transcripts_trim_without_orphans(
    make_engine: Callable[[], Engine], model: str, history: list[dict[str, Any]], window: int
) -> None:
    engine = make_engine()
    engine.on_unavailable = "estimate"
    result = engine.fit_sync(_request(history, model, window))
    assert_result_contract(result)
    if not _check_common(result):
        return
    if model == "gpt-4o":
        check_openai_output(result)
    else:
        check_anthropic_output(result)
        pinned = [m for m in history if m.get("pin")]
        if pinned:  # a pinned turn is sent (the final turn may carry the context after it)
            sent = [m.model_dump(exclude_none=True) for m in result.messages]
            first = {k: v for k, v in pinned[0].items() if k != "pin"}
            strip = [
                {**first, "content": _no_sizes(first["content"])},
            ][0]
            assert any(
                m == strip or (m["role"] == strip["role"] and _starts(m, strip)) for m in sent
            )


def _no_sizes(content: Any) -> Any:
    if isinstance(content, str):
        return content
    return [{k: v for k, v in b.items() if k not in ("width", "height")} for b in content]


def _starts(m: dict[str, Any], want: dict[str, Any]) -> bool:
    got, exp = m["content"], want["content"]
    if isinstance(exp, str):
        exp = [{"type": "text", "text": exp}]
    if isinstance(got, str):
        got = [{"type": "text", "text": got}]
    return bool(got[: len(exp)] == exp)


# -- tool definitions recount by the cookbook's num_tokens_for_tools -----------------------

_word = st.text(st.characters(categories=["Ll", "Lu", "Nd"]), min_size=1, max_size=12)
_props = st.dictionaries(
    _word,
    st.fixed_dictionaries(
        {"type": st.just("string"), "description": _word},
        optional={"enum": st.lists(_word, min_size=1, max_size=3, unique=True)},
    ),
    min_size=1,
    max_size=3,
)
_tools = st.lists(
    st.builds(
        lambda name, desc, props: {
            "type": "function",
            "function": {
                "name": name,
                "description": desc,
                "parameters": {"type": "object", "properties": props},
            },
        },
        _word,
        _word,
        _props,
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t["function"]["name"],
)


def cookbook_tools(tools: list[dict[str, Any]], enc_name: str, gpt4o: bool) -> int:
    """The cookbook's num_tokens_for_tools, written out again from the notebook."""
    enc = encoding(enc_name)
    func_init = 7 if gpt4o else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    n = 0
    for tool in tools:
        n += func_init
        fn = tool["function"]
        n += len(enc.encode_ordinary(fn["name"] + ":" + fn["description"].rstrip(".")))
        props = fn["parameters"]["properties"]
        if props:
            n += prop_init
            for key, spec in props.items():
                n += prop_key
                if "enum" in spec:
                    n += enum_init
                    for item in spec["enum"]:
                        n += enum_item + len(enc.encode_ordinary(item))
                line = f"{key}:{spec['type']}:{spec['description'].rstrip('.')}"
                n += len(enc.encode_ordinary(line))
    return n + func_end


@pytest.mark.parametrize(
    ("model", "enc_name"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")]
)
@SETTINGS
@given(tools=_tools, query=_word)
def test_tool_definitions_recount_by_the_cookbook(
    make_engine: Callable[[], Engine],
    model: str,
    enc_name: str,
    tools: list[dict[str, Any]],
    query: str,
) -> None:
    doc = {"request_id": "t", "model": model, "system": "S.", "query": query, "tools": tools}
    result = make_engine().fit_sync(AssemblyRequest.model_validate(doc))
    assert_result_contract(result)
    assert result.status == "ok", result.error
    assert result.usage is not None
    messages = [m.model_dump(exclude_none=True) for m in result.messages]
    tools_tokens = cookbook_tools(tools, enc_name, model == "gpt-4o")
    assert result.usage.tools == tools_tokens
    assert result.usage.total_tokens == chat_tokens(messages, enc_name) + tools_tokens
    assert result.exact is True


# -- bad input never crashes --------------------------------------------------------------

_scalar = st.none() | st.booleans() | st.integers(-2, 3) | st.sampled_from(["", "x", "call_1"])
_part = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["text", "image_url", "image", "document", "tool_use", "tool_result", "thinking", "?"]
        )
    },
    optional={
        "text": _scalar,
        "image_url": st.just({"url": "data:image/png;base64,AAAA"}) | _scalar,
        "source": st.just({"type": "base64", "media_type": "image/png", "data": "AA=="}) | _scalar,
        "id": _scalar,
        "tool_use_id": _scalar,
        "name": _scalar,
        "input": st.just({}) | _scalar,
        "content": _scalar,
        "cache_control": st.just({"type": "ephemeral"}),
    },
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system", "developer"])},
    optional={
        "content": _scalar | st.lists(_part, max_size=3),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": _scalar,
                    "type": st.just("function"),
                    "function": st.just({"name": "f", "arguments": "{}"}) | _scalar,
                }
            ),
            max_size=2,
        ),
        "tool_call_id": _scalar,
        "pin": st.booleans(),
    },
)


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5"])
@SETTINGS
@given(
    history=st.lists(_message, max_size=5),
    tools=st.none() | st.lists(st.just({"name": "f", "input_schema": {}}) | _part, max_size=2),
    choice=st.none() | st.sampled_from(["auto", "required", "bogus"]) | st.just({"type": "any"}),
    query=st.just("q") | st.lists(_part, max_size=2),
)
def test_any_native_input_is_a_result_never_an_exception(
    make_engine: Callable[[], Engine],
    model: str,
    history: list[dict[str, Any]],
    tools: list[Any] | None,
    choice: Any,
    query: Any,
) -> None:
    from worker.engine.decode import decode_request
    from worker.errors import TokenheapError

    doc = {"request_id": "f", "model": model, "history": history, "query": query}
    if tools is not None:
        doc["tools"] = tools
    if choice is not None:
        doc["tool_choice"] = choice
    import json

    try:
        req = decode_request(json.dumps(doc))
    except TokenheapError:
        return
    engine = make_engine()
    engine.on_unavailable = "estimate"
    result = engine.fit_sync(req)
    assert_result_contract(result)
    if result.status == "error":
        assert result.error is not None
        assert result.error.code in ("invalid_request", "request_too_large", "over_budget")
    else:
        if model == "gpt-4o":
            check_openai_output(result)
        else:
            check_anthropic_output(result)


# -- images recount by OpenAI's published tile rule ------------------------------------------


def _png_header(w: int, h: int) -> str:
    """Just the PNG signature and IHDR: sizes come from the header, pixels are never read."""
    import base64
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    crc = struct.pack(">I", zlib.crc32(chunk))
    raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + crc
    return base64.b64encode(raw).decode()


def vision_tiles(w: int, h: int, detail: str | None, base: int, tile: int) -> int:
    """OpenAI vision guide, 'Calculating costs': low = base; otherwise fit in 2048x2048,
    then shortest side 768, then 512-px tiles (never scaled up); auto / absent as high."""
    from fractions import Fraction
    from math import ceil

    if detail == "low":
        return base
    fw, fh = Fraction(w), Fraction(h)
    if max(fw, fh) > 2048:
        s = Fraction(2048) / max(fw, fh)
        fw, fh = fw * s, fh * s
    if min(fw, fh) > 768:
        s = Fraction(768) / min(fw, fh)
        fw, fh = fw * s, fh * s
    return base + tile * ceil(fw / 512) * ceil(fh / 512)


@pytest.mark.parametrize(
    ("model", "base", "tile"), [("gpt-4o", 85, 170), ("gpt-4o-mini", 2833, 5667)]
)
@SETTINGS
@given(
    w=st.integers(1, 6000),
    h=st.integers(1, 6000),
    detail=st.sampled_from([None, "low", "high", "auto"]),
    text=_word,
)
def test_query_image_recounts_by_the_tile_rule(
    make_engine: Callable[[], Engine],
    model: str,
    base: int,
    tile: int,
    w: int,
    h: int,
    detail: str | None,
    text: str,
) -> None:
    image: dict[str, Any] = {"url": "data:image/png;base64," + _png_header(w, h)}
    if detail is not None:
        image["detail"] = detail
    query = [{"type": "text", "text": text}, {"type": "image_url", "image_url": image}]
    doc = {"request_id": "i", "model": model, "query": query}
    result = make_engine().fit_sync(AssemblyRequest.model_validate(doc))
    assert_result_contract(result)
    if result.status == "error":  # over a pixel limit: refused with the part's path
        assert result.error is not None and "query[1]" in result.error.message
        return
    assert result.usage is not None
    enc = encoding("o200k_base")
    assert result.usage.query == len(enc.encode_ordinary(text)) + vision_tiles(
        w, h, detail, base, tile
    )
    check_openai_output(result)


# -- per-message memo: a remembered message fits as a new one ---------------------------------


@pytest.fixture(scope="module")
def remembering(catalog: Any) -> Any:
    """One engine whose message memo every example adds to, and one without a memo."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.count.cache import CountCache

    pool = ThreadPoolExecutor(2)
    shared = Engine(catalog=catalog, cache=CountCache(1024 * 1024), executor=pool)
    plain = Engine(catalog=catalog, cache=CountCache(1024 * 1024), executor=pool, memo=None)
    yield shared, plain
    shared.close()
    plain.close()
    pool.shutdown()


def _comparable(result: FitResult) -> dict[str, Any]:
    doc = result.model_dump(mode="json", exclude_none=True)
    doc.pop("cache")  # the count cache's hit/miss split differs between the two engines
    return doc


@SETTINGS
@given(
    history=openai_transcripts() | st.lists(_message, max_size=5),
    cut=st.integers(0, 12),
    window=st.integers(60, 3000),
    tools=st.none() | _tools | st.lists(st.just({"name": "f", "input_schema": {}}), max_size=2),
    choice=st.none()
    | st.sampled_from(["auto", "required", "none", "bogus"])
    | st.just({"type": "function", "function": {"name": "f"}}),
    models=st.lists(st.sampled_from(["gpt-4o", "gpt-4", "gpt-4.1"]), min_size=1, max_size=2),
    system=st.sampled_from(["Be brief.", ""]),
)
def test_a_remembered_message_fits_as_a_new_one(
    remembering: Any,
    history: list[dict[str, Any]],
    cut: int,
    window: int,
    tools: list[dict[str, Any]] | None,
    choice: str | dict[str, Any] | None,
    models: list[str],
    system: str,
) -> None:
    """The same conversation a turn earlier and now (and random, often invalid, messages and
    tool definitions), decoded from JSON: the engine that remembers messages and tool sets
    across every example (and every model) gives the result, or the error naming the same
    path, that an engine without a memo gives."""
    import itertools
    import json

    from worker.engine.decode import decode_request
    from worker.errors import TokenheapError

    shared, plain = remembering
    for part, model in itertools.product((history[:cut], history, history[:cut]), models):
        doc = {
            "request_id": "m",
            "model": model,
            "system": system,
            "history": part,
            "query": "And now?",
            "tools": tools,
            "tool_choice": choice,
            "budget": {"max_context_tokens": window, "output_reserve": 16},
        }
        try:
            req = decode_request(json.dumps(doc))
        except TokenheapError:
            return
        assert _comparable(shared.fit_sync(req)) == _comparable(plain.fit_sync(req))


@given(
    st.lists(
        st.tuples(st.text(max_size=30), st.integers(0, 5)),
        max_size=60,
    ),
    st.integers(0, 400),
)
def test_the_message_memo_is_bounded_and_answers_only_what_was_put(
    puts: list[tuple[str, int]], max_bytes: int
) -> None:
    from worker.engine.memo import MessageMemo, Remembered, _size

    memo = MessageMemo(max_bytes)
    last: dict[Any, Remembered] = {}
    for text, n in puts:
        key = memo.key({"role": "user", "content": text, "n": n})
        item = Remembered(parsed=(text, n), shape=None)
        memo.put(key, item)
        last[key] = item
        held = sum(_size(k) for k in (*memo._young, *memo._old))
        assert held <= max_bytes
    for key, item in last.items():
        got = memo.get(key)
        assert got is None or got is item


@given(
    st.lists(st.tuples(st.text(max_size=40), st.sampled_from([None, "auto"])), max_size=300),
    st.integers(0, 20_000),
)
def test_remembered_tool_sets_are_bounded_and_answer_only_what_was_put(
    puts: list[tuple[str, str | None]], max_bytes: int
) -> None:
    from worker.engine.memo import MAX_TOOL_SETS, KnownTools, MessageMemo

    memo = MessageMemo(max_bytes)
    last: dict[bytes, KnownTools] = {}
    for name, choice in puts:
        tools = [{"type": "function", "function": {"name": name}}]
        key = memo.tools_key(tools, choice)
        assert key is not None
        assert memo.tools_key(tools, "required" if choice else "auto") != key
        known = KnownTools(parsed=tools, choice=choice)
        memo.put_tools(key, known)
        last[key] = known
        assert len(memo._tools) <= MAX_TOOL_SETS
        assert sum(map(len, memo._tools)) <= max_bytes // 2
    for key, known in last.items():
        got = memo.tools(key)
        assert got is None or got is known
