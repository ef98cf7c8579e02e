"""settle_heap: start-up's heap out of the collector's way, cycles still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from worker.runtime import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.mark.usefixtures("restore_gc")
def test_settle_heap_freezes_start_up_and_still_collects_cycles() -> None:
    survivor = _Node()
    settle_heap()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert all(o is not survivor for o in gc.get_objects())  # frozen: no pass walks it
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle made after start-up
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


@pytest.mark.usefixtures("restore_gc")
def test_settle_heap_collects_the_young_cycles_of_start_up_before_freezing() -> None:
    """Garbage start-up just made is freed, not frozen for good (only the older
    generations are left uncollected, see settle_heap)."""
    gc.collect()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    settle_heap()
    assert gone() is None
