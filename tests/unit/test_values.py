"""`@value` records: plain slotted dataclasses at run time, frozen for the type checker."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

from worker.values import value


@value
class Point:
    x: int
    y: int = 0


@value(hashable=True)
class Key:
    name: str


def test_a_value_compares_prints_and_replaces_like_a_dataclass() -> None:
    p = Point(1, 2)
    assert p == Point(1, 2) and p != Point(1, 3)
    assert repr(p) == "Point(x=1, y=2)"
    assert dataclasses.replace(p, y=5) == Point(1, 5)
    assert not hasattr(p, "__dict__")  # slotted: no stray attributes
    with pytest.raises(AttributeError):
        p.z = 3  # type: ignore[attr-defined]


def test_only_a_hashable_value_can_be_a_key() -> None:
    with pytest.raises(TypeError):
        {Point(1)}
    assert {Key("a"): 1}[Key("a")] == 1


def test_the_type_checker_holds_values_frozen(tmp_path: Path) -> None:
    """The promise CI enforces: assigning a field of a `@value` record is a mypy error."""
    snippet = tmp_path / "mutate.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from worker.values import value

            @value
            class Local:
                n: int

            @value(hashable=True)
            class Keyed:
                n: int

            def f(v: Local, k: Keyed) -> None:
                v.n = 2
                k.n = 3
            """
        )
    )
    # the project's cache: scripts/test has just filled it for the stdlib stubs
    cache = Path(__file__).resolve().parents[2] / ".mypy_cache"
    out, _, status = mypy_api.run(["--strict", "--cache-dir", str(cache), str(snippet)])
    assert status == 1, out
    assert out.count("is read-only") == 2, out
