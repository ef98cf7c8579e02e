"""The bytes the worker publishes for a result are pydantic's own JSON of it, whatever the
result holds: `result_json` skips only the `str` that `model_dump_json` makes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.request import Turn
from worker.engine.result import Alert, DroppedItem, FitResult, Message, Usage
from worker.stream.outgoing import result_json

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
turns = st.builds(
    Turn,
    role=st.sampled_from(["user", "assistant", "tool", "system", "developer"]),
    content=text,
    name=st.none() | text,
    tool_call_id=st.none() | text,
    pin=st.booleans(),
)
native = st.builds(
    lambda role, content, extra: Message(role=role, content=content, **extra),
    role=st.sampled_from(["user", "assistant", "tool"]),
    content=st.none() | text | st.lists(st.dictionaries(text, json_values, max_size=3)),
    extra=st.dictionaries(st.sampled_from(["name", "tool_calls", "tool_call_id"]), json_values),
)


@st.composite
def results(draw: st.DrawFn) -> FitResult:
    result = FitResult(
        request_id=draw(text),
        status=draw(st.sampled_from(["ok", "error"])),
        model=draw(text),
        provider=draw(st.none() | text),
        inexact=draw(st.lists(text, max_size=2)),
        system=draw(st.none() | text),
        tools=draw(st.none() | st.lists(st.dictionaries(text, json_values, max_size=2))),
        usage=draw(st.none() | st.builds(Usage, utilization=st.floats(0, 2))),
        dropped=draw(st.lists(st.builds(DroppedItem, slot=st.just("history"), reason=text))),
        alerts=draw(st.lists(st.builds(Alert, value=st.none() | st.floats(allow_nan=False)))),
        metadata=draw(st.none() | st.dictionaries(text, json_values, max_size=3)),
    )
    result.messages = draw(st.lists(turns | native, max_size=5))
    return result


@settings(max_examples=200, deadline=None)
@given(results())
def test_result_json_is_pydantics_json(result: FitResult) -> None:
    expected: Any = result.model_dump_json(exclude_none=True).encode()
    assert result_json(result) == expected
