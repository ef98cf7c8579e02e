"""Counting properties against tiktoken, the reference: additivity of rendered units, and a
fitted payload never over budget with usage equal to an independent recount."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import chat_tokens
from tests.support.contract import assert_result_contract
from worker.catalog import Catalog
from worker.count.vocab import encoding
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

# Text that stresses the pre-tokenizer: punctuation runs, newlines, '/', contractions,
# digits, combining marks, CJK, emoji, whitespace runs, a literal special token.
_alphabet = st.sampled_from(
    [
        *"ab Z9'/.,;:!?-_()[]{}<>#\n\r\t",
        " ",
        "  ",
        "\n\n",
        "'s",
        "\u2019",
        "é",
        "e\u0301",
        "中文",
        "🙂",
        "<|endoftext|>",
        "1234",
        "—",
        "\u00a0",
        "ß",
        "ﬁ",
        "😀👍🏽",
    ]
)
texts = st.lists(_alphabet, max_size=40).map("".join)


@pytest.mark.parametrize("enc_name", ["o200k_base", "cl100k_base"])
@given(parts=st.lists(texts, min_size=1, max_size=6), query=texts)
def test_rendered_units_add_up(
    catalog: Catalog, enc_name: str, parts: list[str], query: str
) -> None:
    enc = encoding(enc_name)
    tpl = catalog.render
    units = [tpl.context_header]
    units += [tpl.chunk_template.format(id=f"c{i}", text=t) for i, t in enumerate(parts)]
    units.append(tpl.query_template.format(query=query))
    whole = len(enc.encode_ordinary("".join(units)))
    assert whole == sum(len(enc.encode_ordinary(u)) for u in units)


turns = st.lists(
    st.tuples(
        # no `tool`: a plain history cannot hold the call a tool turn answers, so it is
        # refused (test_orphan_tool_turn_is_refused); tool use is covered by native tests
        st.sampled_from(["user", "assistant", "system", "developer"]),
        texts,
        st.one_of(st.none(), st.sampled_from(["alice", "bob_2"])),
    ),
    max_size=8,
)
chunk_lists = st.lists(texts, max_size=8)


def _request(
    turn_list: list[tuple[str, str, str | None]],
    chunks: list[str],
    query: str,
    system: str,
    window: int,
    model: str,
    truncate: bool,
) -> AssemblyRequest:
    doc: dict[str, Any] = {
        "request_id": "p",
        "model": model,
        "system": system,
        "history": [
            {
                "role": r,
                "content": c,
                **({"name": n} if n else {}),
            }
            for r, c, n in turn_list
        ],
        "chunks": [{"id": f"c{i}", "text": t} for i, t in enumerate(chunks)],
        "query": query,
        "budget": {"max_context_tokens": window, "output_reserve": 16, "truncate_chunks": truncate},
    }
    return AssemblyRequest.model_validate(doc)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
@given(
    turn_list=turns,
    chunks=chunk_lists,
    query=texts,
    system=texts,
    window=st.integers(40, 400),
    truncate=st.booleans(),
)
def test_fit_is_within_budget_and_usage_equals_recount(
    make_engine: Callable[[], Engine],
    model: str,
    turn_list: list[tuple[str, str, str | None]],
    chunks: list[str],
    query: str,
    system: str,
    window: int,
    truncate: bool,
) -> None:
    engine = make_engine()
    req = _request(turn_list, chunks, query, system, window, model, truncate)
    [result] = engine.fit_many_sync([req])
    assert_result_contract(result)
    if result.status == "error":
        assert result.error is not None
        assert result.error.code == "over_budget"
        return
    usage = result.usage
    assert usage is not None
    messages = [m.model_dump(exclude_none=True) for m in result.messages]
    enc_name = "o200k_base" if model == "gpt-4o" else "cl100k_base"
    assert usage.total_tokens == chat_tokens(messages, enc_name)
    assert usage.total_tokens <= usage.budget_tokens
    assert usage.total_tokens == (
        usage.system + usage.history + usage.context + usage.query + usage.framing
    )
    # nothing vanishes: every chunk is kept, truncated or reported
    accounted = {d.index for d in result.dropped if d.slot == "context"}
    accounted |= {t.index for t in result.truncated}
    final = result.messages[-1].content
    kept = {i for i in range(len(chunks)) if f"[c{i}] " in final}
    assert accounted | kept == set(range(len(chunks)))
    # the system prompt and the query are never cut
    if system:
        assert result.messages[0].content == system
    assert final.endswith(query)


@given(
    st.lists(
        st.tuples(st.text(min_size=0, max_size=12), st.integers(0, 10**6)),
        max_size=60,
    ),
    st.integers(0, 64),
)
def test_the_exact_text_tier_is_bounded_and_never_answers_wrong(
    puts: list[tuple[str, int]], max_chars: int
) -> None:
    """Whatever is put, the tier holds at most `max_chars` characters, and a text it
    answers for gets the count last put for it (or, after it was let go, no answer)."""
    from worker.count.cache import TextMemo

    memo = TextMemo(max_chars)
    last: dict[str, int] = {}
    for text, count in puts:
        memo.put(text, count)
        last[text] = count
        assert memo.chars <= max_chars
    for text in last:
        got = memo.get(text)
        assert got is None or got == last[text]
        assert memo.chars <= max_chars


_template_text = st.lists(st.sampled_from([*"[]<#ab \n:", "{{", "}}", "é"]), max_size=5).map(
    "".join
)  # literal template text: braces only escaped


@given(
    st.tuples(_template_text, _template_text, _template_text),
    st.sampled_from(["{id}", "{id!r}", "{id:>4}"]),
    st.text(max_size=8),
    st.text(max_size=40),
)
def test_a_chunk_unit_is_the_template_formatted(
    literals: tuple[str, str, str], id_field: str, chunk_id: str, text: str
) -> None:
    """The joined fast form gives `str.format`'s string for every template the catalog
    accepts (escaped braces, format specs and conversions take `format` itself)."""
    from pydantic import ValidationError

    from worker.catalog import RenderTemplates

    a, b, c = literals
    template = f"[{a}{id_field}{b}{{text}}{c}\n"
    try:
        tpl = RenderTemplates(chunk_template=template)
    except ValidationError:
        return  # not a template the catalog takes
    assert tpl.chunk_unit()(chunk_id, text) == template.format(id=chunk_id, text=text)
