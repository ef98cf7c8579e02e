"""OffsetLedger: commit only up to the lowest offset still in flight, never backwards."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.stream.ledger import LedgerError, OffsetLedger

Ledger = OffsetLedger[str]


@pytest.fixture
def make_ledger() -> Callable[..., Ledger]:
    """A ledger with `started` offsets handed out on partition "p" and `done` finished."""

    def make(started: tuple[int, ...] = (), done: tuple[int, ...] = ()) -> Ledger:
        ledger = Ledger()
        for offset in started:
            ledger.start("p", offset)
        for offset in done:
            ledger.done("p", offset)
        return ledger

    return make


@pytest.mark.parametrize(
    ("started", "done", "expected"),
    [
        ((), (), None),
        ((0, 1, 2), (), 0),
        ((0, 1, 2), (0,), 1),
        ((0, 1, 2), (1, 2), 0),
        ((0, 1, 2), (2, 0), 1),
        ((0, 1, 2), (0, 1, 2), 3),
        ((7, 9, 12), (7, 9), 12),
        ((7, 9, 12), (12, 9, 7), 13),
    ],
    ids=[
        "nothing-started",
        "none-done",
        "head-done",
        "head-pending-blocks",
        "gap-in-the-middle",
        "all-done",
        "offset-gaps-are-fine",
        "all-done-with-gaps",
    ],
)
def test_next_offset_is_lowest_unfinished(
    make_ledger: Callable[..., Ledger],
    started: tuple[int, ...],
    done: tuple[int, ...],
    expected: int | None,
) -> None:
    assert make_ledger(started, done).next_offset("p") == expected


def test_due_lists_only_partitions_that_moved(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger((0, 1), (0,))
    ledger.start("q", 5)
    assert ledger.due() == {"p": 1, "q": 5}
    ledger.committed({"p": 1, "q": 5})
    assert ledger.due() == {}
    ledger.done("p", 1)
    assert ledger.due() == {"p": 2}


def test_committed_never_moves_backwards(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger((0, 1, 2), (0, 1, 2))
    ledger.committed({"p": 3})
    ledger.committed({"p": 1})  # a slow, older commit finishing last
    assert ledger.due() == {}


@pytest.mark.parametrize(
    ("started", "done", "bad"),
    [
        ((0, 1), (), ("start", 1)),
        ((0, 1), (), ("start", 0)),
        ((0, 1), (0,), ("done", 0)),
        ((0, 1), (), ("done", 5)),
        ((), (), ("done", 0)),
    ],
    ids=["start-repeat", "start-backwards", "done-twice", "done-unknown", "done-nothing"],
)
def test_bookkeeping_mistakes_raise(
    make_ledger: Callable[..., Ledger],
    started: tuple[int, ...],
    done: tuple[int, ...],
    bad: tuple[str, int],
) -> None:
    ledger = make_ledger(started, done)
    action, offset = bad
    with pytest.raises(LedgerError):
        getattr(ledger, action)("p", offset)


def test_forget_starts_the_partition_over(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger((3, 4), (3,))
    ledger.forget("p")
    assert ledger.next_offset("p") is None and ledger.due() == {}
    ledger.start("p", 3)  # read again after a rebalance: allowed once forgotten
    assert ledger.in_flight("p") == 1


@given(
    offsets=st.lists(st.integers(0, 5), min_size=1, max_size=40).map(
        lambda steps: [sum(steps[: i + 1]) + i for i in range(len(steps))]
    ),
    data=st.data(),
)
def test_commit_point_never_passes_an_unfinished_record(
    offsets: list[int], data: st.DataObject
) -> None:
    """Whatever order records finish in: the commit point only rises, never exceeds an
    unfinished offset, and ends one past the last once all are done."""
    ledger = Ledger()
    for offset in offsets:
        ledger.start("p", offset)
    order = data.draw(st.permutations(offsets))
    finished: set[int] = set()
    last = ledger.next_offset("p")
    assert last == offsets[0]
    for offset in order:
        ledger.done("p", offset)
        finished.add(offset)
        point = ledger.next_offset("p")
        assert point is not None and point >= last
        assert all(o in finished for o in offsets if o < point)
        last = point
    assert last == offsets[-1] + 1
