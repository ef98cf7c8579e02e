"""`@value`: the engine's immutable records, frozen where it is checked and cheap where it runs.

A ``@dataclass(frozen=True, slots=True)`` costs twice on Python 3.11. Defining it executes
five generated methods one `exec` at a time (about 1.1 ms a class; the 22 dataclasses of
ours on `tokenheap fit`'s path took ~22 ms of its start-up, ~17 ms now that 15 of them are
`@value`). And each instance is built through ``object.__setattr__`` for every field, about
4x the time of a plain slotted ``__init__``; plans, drops, costs and layouts are built on
every request.

Immutability of these records is a promise between modules, not a run-time defence: nothing
here is handed to code that would mutate it. So the type checker, which CI runs strictly,
holds them frozen (``dataclass_transform(frozen_default=True)``: assigning a field is a mypy
error), and at run time they are plain slotted dataclasses with ``eq`` and ``repr``.

The one run-time difference: an instance is not hashable (``eq`` without ``frozen`` sets
``__hash__`` to None), so a record used as a dict key or set member must say
``@value(hashable=True)``.

Stdlib only, imported by the engine's pure modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar, cast, dataclass_transform, overload

T = TypeVar("T", bound=type)


@overload
def value(cls: T, /) -> T: ...
@overload
def value(*, hashable: bool = False) -> Callable[[T], T]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def value(cls: T | None = None, /, *, hashable: bool = False) -> T | Callable[[T], T]:
    """``@value`` or ``@value(hashable=True)`` on a class with annotated fields."""

    def make(c: T) -> T:
        return cast(T, dataclasses.dataclass(slots=True, unsafe_hash=hashable)(c))

    return make if cls is None else make(cls)
