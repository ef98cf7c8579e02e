"""JSON or JSON lines, told apart by content: JSON lines keep one entry per non-blank line;
a pretty-printed document is one entry, whatever its layout."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.cli.inputs import read_requests

scalars = st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none())
docs = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.one_of(
        scalars,
        st.lists(scalars, max_size=3),
        st.dictionaries(st.text(max_size=5), scalars, max_size=3),
    ),
    min_size=1,
    max_size=5,
)


def read(tmp: Path, name: str, text: str) -> tuple[list[str], bool]:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    requests = read_requests(str(path))
    try:
        # JSON lines keep their blank lines, numbering the rest; `fit` and `send` skip them
        return [t for t in requests.texts if t.strip()], requests.document
    finally:
        requests.close()


@hsettings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(docs, min_size=1, max_size=8), blanks=st.integers(0, 2))
def test_json_lines_keep_one_entry_per_line(
    tmp_path: Path, items: list[dict[str, object]], blanks: int
) -> None:
    text = ("\n" * blanks).join(json.dumps(d) + "\n" for d in items)
    texts, document = read(tmp_path, "in.ndjson", text)
    assert not document
    assert [json.loads(t) for t in texts] == items


@hsettings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=docs, indent=st.integers(1, 4))
def test_a_pretty_printed_document_is_one_entry(
    tmp_path: Path, doc: dict[str, object], indent: int
) -> None:
    texts, document = read(tmp_path, "in.json", json.dumps(doc, indent=indent))
    assert len(texts) == 1 and json.loads(texts[0]) == doc
    assert document or "\n" not in json.dumps(doc, indent=indent).strip()


@hsettings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=docs, indent=st.integers(1, 4), cut=st.integers(1, 40))
def test_a_broken_pretty_printed_document_is_still_one_entry(
    tmp_path: Path, doc: dict[str, object], indent: int, cut: int
) -> None:
    text = json.dumps(doc, indent=indent)
    broken = text[: max(2, len(text) - cut)]  # cut short: it does not parse
    texts, document = read(tmp_path, "in.json", broken)
    # one error result to come, not one per line; its end placed on its last line
    assert document and texts == [broken.rstrip()]
