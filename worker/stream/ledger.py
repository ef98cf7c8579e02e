"""Which offset each partition may commit: the lowest one still being worked on.

Records of one partition are handed out in offset order but finish in any order (counting
runs concurrently); committing past an unfinished record would lose it on a crash. PURE: no
Kafka or asyncio imports, so the rule is unit-tested on its own.

>>> ledger = OffsetLedger[str]()
>>> for offset in (5, 6, 9):          # gaps are normal: compaction, transaction markers
...     ledger.start("p0", offset)
>>> ledger.done("p0", 6)
>>> ledger.due()                      # 5 is unfinished, so nothing may be committed yet
{'p0': 5}
>>> ledger.done("p0", 5); ledger.due()
{'p0': 9}
>>> ledger.done("p0", 9); ledger.committed({"p0": 10}); ledger.due()
{}
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LedgerError(RuntimeError):
    """A bookkeeping bug in the caller: an offset started twice, out of order, or finished
    without being started. Never retried: continuing could commit an unpublished record."""


@dataclass(slots=True)
class _Offsets:
    started: deque[int] = field(default_factory=deque)
    """Started offsets, ascending; finished ones leave it once nothing older is open."""
    open: set[int] = field(default_factory=set)
    """Started and not finished."""
    last_started: int = -1
    committed: int = -1
    """The last offset committed (the next one to read), -1 before any commit."""


class OffsetLedger(Generic[K]):
    """Per partition: offsets handed out and not yet done; the next offset to commit."""

    def __init__(self) -> None:
        self._parts: dict[K, _Offsets] = {}

    def start(self, partition: K, offset: int) -> None:
        """A record was handed out for processing. Offsets must rise within a partition."""
        part = self._parts.setdefault(partition, _Offsets())
        if offset <= part.last_started:
            raise LedgerError(
                f"{partition}: offset {offset} started after {part.last_started}; "
                "forget() the partition before reading it again"
            )
        part.started.append(offset)
        part.open.add(offset)
        part.last_started = offset

    def done(self, partition: K, offset: int) -> None:
        """The record's output is published (or sent in the open transaction)."""
        part = self._parts.get(partition)
        if part is None or offset not in part.open:
            raise LedgerError(f"{partition}: offset {offset} finished but not in flight")
        part.open.discard(offset)
        while part.started and part.started[0] not in part.open:
            part.started.popleft()

    def next_offset(self, partition: K) -> int | None:
        """Lowest unfinished offset, else one past the last started; None if nothing started."""
        part = self._parts.get(partition)
        if part is None or part.last_started < 0:
            return None
        return part.started[0] if part.started else part.last_started + 1

    def due(self) -> dict[K, int]:
        """The explicit offset map worth committing: partitions that moved since the last."""
        out: dict[K, int] = {}
        for partition, part in self._parts.items():
            offset = self.next_offset(partition)
            if offset is not None and offset > part.committed:
                out[partition] = offset
        return out

    def committed(self, offsets: Mapping[K, int]) -> None:
        """Record a successful commit; never moves backwards."""
        for partition, offset in offsets.items():
            part = self._parts.get(partition)
            if part is not None:
                part.committed = max(part.committed, offset)

    def in_flight(self, partition: K) -> int:
        part = self._parts.get(partition)
        return 0 if part is None else len(part.open)

    def forget(self, partition: K) -> None:
        """The partition was revoked: its next owner starts from the committed offset."""
        self._parts.pop(partition, None)

    def partitions(self) -> list[K]:
        return list(self._parts)
