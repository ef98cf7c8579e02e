"""The consuming side: fetch, hand records out concurrently, publish each partition in order,
commit what is published, pause what is too busy, and hand partitions over on rebalance.

Per partition, records are processed concurrently but publish one after another in offset
order: each record waits for the one before it to finish *queueing* its messages (not for
their acknowledgement), so a slow request delays its successors' publishing, not their work.

    fetch ─▶ start(offset) ─▶ decode + fit (concurrent) ─▶ wait turn ─▶ publish ─▶ done(offset)
                 └──── OffsetLedger: commit = lowest offset not yet done ◀──────────┘
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from worker.engine.decode import Limits, decode_request
from worker.engine.request import AssemblyRequest
from worker.errors import InvalidRequest
from worker.stream.ledger import OffsetLedger
from worker.stream.publish import Done, Outgoing, Source
from worker.telemetry.instruments import KafkaSnapshot

log = logging.getLogger(__name__)

POLL_MS = 200
"""How long one fetch waits for data; also how soon a stop or a freed slot is noticed."""
MAX_BATCH = 500
OFFLOAD_BYTES = 256 * 1024
"""Requests larger than this are parsed off the event loop."""
SETTLE_AFTER_CANCEL_S = 5.0
CLOSE_RESERVE_S = 5.0
"""Of a shutdown's deadline, what is kept back from in-flight records for the final commit
and the releases (a third of the deadline when that is shorter)."""

Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]
"""Given to the handler: publish this record's messages (once), in its partition's order."""
Handler = Callable[[ConsumerRecord[bytes, bytes], Publish], Awaitable[None]]


class Sink(Protocol):
    """What the flow needs from the publishing side (worker.stream.publish)."""

    commits_offsets: bool
    """True when offsets are committed by the sink (in its transactions), not the consumer."""

    def ready(self) -> bool: ...

    async def assigned(self, tps: Collection[TopicPartition]) -> None: ...

    async def revoked(self, tps: Collection[TopicPartition]) -> None: ...

    async def publish(
        self, tp: TopicPartition, messages: Sequence[Outgoing], done: Done
    ) -> asyncio.Future[None]: ...

    async def commit(
        self, tps: Collection[TopicPartition], offset_of: Callable[[TopicPartition], int | None]
    ) -> dict[TopicPartition, int]: ...

    async def abort(self, tp: TopicPartition) -> None: ...


@dataclass(frozen=True, slots=True)
class FlowLimits:
    max_in_flight: int = 256
    """Records being processed at once, over all partitions (a hard bound)."""
    max_in_flight_per_partition: int = 64
    """A partition holding this many is paused until some finish; records fetched past it
    are fetched again later, so this bound is hard too."""
    commit_interval_s: float = 1.0
    settle_timeout_s: float = 20.0
    """How long a revoke or a shutdown waits for in-flight records before cutting them off."""
    request_timeout_s: float = 30.0
    """Bound on every await on the broker the flow makes (commits, offsets, transactions)."""


@dataclass(eq=False, slots=True)
class _PartitionFlow:
    tp: TopicPartition
    tail: asyncio.Future[None]
    """Resolves when the last handed-out record has queued its messages: the next one's turn."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closing: bool = False
    torn: bool = False
    """A record was cut off while sending: its partial output must not be committed."""


async def decode_record(value: bytes | None, limits: Limits) -> AssemblyRequest:
    """Bytes to a request; raises BadRequest (the record is dead-lettered)."""
    if value is None:
        raise InvalidRequest("the message has no value (a tombstone); send a JSON request")
    if OFFLOAD_BYTES < len(value) <= limits.max_request_bytes:
        return await asyncio.to_thread(decode_request, value, limits)
    return decode_request(value, limits)


def source_of(record: ConsumerRecord[bytes, bytes]) -> Source:
    return Source(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers),
    )


class Flow:
    """Owns the consumer's loop, the offset ledger and per-partition order; calls `handler`
    once per record and `sink` to publish and (exactly-once) to commit."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        sink: Sink,
        handler: Handler,
        limits: FlowLimits,
        *,
        suspect: Callable[[], None] = lambda: None,
    ) -> None:
        """`suspect` is told when a broker call failed or timed out (the outage watch)."""
        self._consumer = consumer
        self._suspect = suspect
        self._commit_warned = False
        self._pending_commit: asyncio.Future[None] | None = None
        self._sink = sink
        self._handler = handler
        self._limits = limits
        self._ledger = OffsetLedger[TopicPartition]()
        self._parts: dict[TopicPartition, _PartitionFlow] = {}
        self._paused: set[TopicPartition] = set()
        self._assigning = False
        self._draining = False
        self._in_flight = 0
        self._wake = asyncio.Event()
        self.failure: BaseException | None = None
        self.listener: ConsumerRebalanceListener = _Listener(self)
        self.joined = False
        """Set once the group has answered our first join (with or without partitions)."""
        self.on_commit: Callable[[float], None] | None = None
        """Metric hook: seconds one commit took."""
        self.on_rebalance: Callable[..., None] | None = None
        """Metric hook: `(kind="assigned"|"revoked", partitions=n)`."""

    # -- state --------------------------------------------------------------------------

    def ready(self) -> bool:
        return (
            bool(self._parts)
            and not self._assigning
            and not self._draining
            and self.failure is None
            and self._sink.ready()
        )

    def member(self) -> bool:
        """Ready in the orchestrator's sense: in the group and able to publish. Unlike
        `ready`, owning no partition (a spare replica) or rebalancing does not count."""
        return self.joined and not self._draining and self.failure is None and self._sink.ready()

    def assignment(self) -> list[tuple[str, int]]:
        """The partitions this worker processes now, sorted."""
        return sorted((tp.topic, tp.partition) for tp in self._parts)

    def paused(self) -> int:
        """How many partitions backpressure holds paused now."""
        return len(self._paused)

    def snapshot(self) -> KafkaSnapshot:
        """For the gauges: per owned partition, the log end (last fetched highwater) minus
        the lowest offset not yet done; partitions with nothing fetched yet are left out."""
        lag: dict[tuple[str, int], int] = {}
        for tp in list(self._parts):
            end = self._consumer.highwater(tp)
            start = self._ledger.next_offset(tp)
            if end is not None and start is not None:
                lag[(tp.topic, tp.partition)] = max(0, end - start)
        return KafkaSnapshot(
            lag=lag,
            in_flight=self._in_flight,
            paused_partitions=len(self._paused),
            assigned_partitions=len(self._parts),
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            log.error("stopping: %s", _why(exc) or f"{type(exc).__name__} (Kafka did not answer)")
            self.failure = exc
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and hand out records until `stop` is set or something fails; in-flight work
        is left to `drain`."""
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + self._limits.commit_interval_s
        while not stop.is_set() and self.failure is None:
            capacity = self._limits.max_in_flight - self._in_flight
            if capacity > 0:
                batch = await self._fetch(stop, min(capacity, MAX_BATCH))
                if batch is None:
                    break
                self._dispatch(batch)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_MS / 1000)
            self._backpressure()
            if loop.time() >= next_commit:
                commit = asyncio.ensure_future(self._commit(list(self._parts)))
                if not await _done_unless_stopped(stop, commit):
                    # Left running, not cancelled: a transaction cut off mid-commit leaves its
                    # producer unusable. The drain awaits it within its deadline.
                    self._pending_commit = commit
                    break
                next_commit = loop.time() + self._limits.commit_interval_s

    async def _fetch(
        self, stop: asyncio.Event, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] | None:
        """One getmany, abandoned if `stop` comes first (a fetch blocks for as long as a
        rebalance takes); None when stopped."""
        fetch = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=POLL_MS, max_records=max_records)
        )
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not fetch.done():
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
            return None
        return fetch.result()  # type: ignore[no-any-return]

    def _dispatch(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, records in batch.items():
            part = self._parts.get(tp)
            if part is None or part.closing:
                # Fetched while the partition changes hands: leave the records to whoever owns
                # it next (a partition still being set up reads them again after its rewind).
                if part is None and tp in self._consumer.assignment():
                    self._consumer.seek(tp, records[0].offset)
                continue
            room = max(0, self._limits.max_in_flight_per_partition - len(part.tasks))
            for record in records[:room]:
                self._start(part, record)
            if room < len(records):  # over the partition's bound: fetch the rest again later
                self._consumer.seek(tp, records[room].offset)
                self._consumer.pause(tp)
                self._paused.add(tp)

    def _start(self, part: _PartitionFlow, record: ConsumerRecord[bytes, bytes]) -> None:
        prev = part.tail
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        part.tail = mine
        self._ledger.start(part.tp, record.offset)
        self._in_flight += 1
        task = asyncio.create_task(
            self._process(part, record, prev, mine),
            name=f"{part.tp.topic}[{part.tp.partition}]@{record.offset}",
        )
        part.tasks.add(task)
        task.add_done_callback(lambda t: self._finished(part, t))

    async def _process(
        self,
        part: _PartitionFlow,
        record: ConsumerRecord[bytes, bytes],
        prev: asyncio.Future[None],
        mine: asyncio.Future[None],
    ) -> None:
        published = False
        sending = False

        async def publish(messages: Sequence[Outgoing]) -> None:
            nonlocal published, sending
            if published:
                raise RuntimeError("a record's messages are published once")
            published = True
            await asyncio.shield(prev)  # our turn; cancelling us must not cancel theirs
            sending = True
            delivered = await self._sink.publish(
                part.tp, messages, lambda: self._done(part, record.offset)
            )
            sending = False
            _resolve(mine)  # the next record may queue now; our acks arrive in order anyway
            await delivered

        try:
            await self._handler(record, publish)
            if not published:
                raise RuntimeError(f"the handler published nothing for offset {record.offset}")
        except asyncio.CancelledError:
            if sending:
                part.torn = True
            raise
        finally:
            _resolve(mine)

    def _done(self, part: _PartitionFlow, offset: int) -> None:
        if self._parts.get(part.tp) is part:  # not a leftover of a revoked assignment
            self._ledger.done(part.tp, offset)

    def _finished(self, part: _PartitionFlow, task: asyncio.Task[None]) -> None:
        part.tasks.discard(task)
        self._in_flight -= 1
        self._wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(exc)
        self._backpressure()

    def _backpressure(self) -> None:
        """Pause partitions holding too much (all of them when the global bound is hit)."""
        assigned = self._consumer.assignment()
        if self._draining:
            want = set(assigned)
        else:
            full = self._in_flight >= self._limits.max_in_flight
            cap = self._limits.max_in_flight_per_partition
            want = {
                tp
                for tp, p in self._parts.items()
                if not p.closing and (full or len(p.tasks) >= cap)
            }
        self._paused &= assigned
        pause = [tp for tp in want - self._paused if tp in assigned]
        resume = [tp for tp in self._paused - want if tp in self._parts]
        if pause:
            self._consumer.pause(*pause)
        if resume:
            self._consumer.resume(*resume)
        self._paused = (self._paused | set(pause)) - set(resume)

    # -- commits ------------------------------------------------------------------------

    async def _commit(self, tps: Iterable[TopicPartition], *, fatal: bool = True) -> None:
        """Commit the ledger's offsets of `tps`: explicitly through the consumer (at least
        once) or inside each partition's transaction (exactly once). A failed transaction
        poisons its partition, so the worker stops (`fatal`) unless the partitions are being
        released anyway: their next owner reads the aborted records again."""
        live = [tp for tp in tps if tp in self._parts and not self._parts[tp].torn]
        if not live:
            return
        began = asyncio.get_running_loop().time()
        bound = self._limits.request_timeout_s
        if self._sink.commits_offsets:
            try:
                async with asyncio.timeout(bound):
                    committed = await self._sink.commit(live, self._ledger.next_offset)
            except Exception as exc:
                self._suspect()
                if fatal:
                    self._fail(exc)
                else:
                    log.warning("final commit failed: %s: %s", type(exc).__name__, exc)
                return
        else:
            due = self._ledger.due()
            assigned = self._consumer.assignment()
            committed = {tp: due[tp] for tp in live if tp in due and tp in assigned}
            if not committed:
                return
            try:
                async with asyncio.timeout(bound):
                    await self._consumer.commit(committed)
            except (CommitFailedError, IllegalStateError) as exc:
                log.warning("commit skipped, the group is rebalancing (%s)", type(exc).__name__)
                return
            except (KafkaError, TimeoutError) as exc:
                self._suspect()
                if not self._commit_warned:  # once until one succeeds: an outage is logged apart
                    log.warning(
                        "commit failed, retrying every interval (%s)",
                        _why(exc) or f"no answer in {bound:.0f} s",
                    )
                    self._commit_warned = True
                return
            self._commit_warned = False
        self._ledger.committed(committed)
        if committed:
            if self.on_commit is not None:
                self.on_commit(asyncio.get_running_loop().time() - began)
            log.debug("committed %s", _fmt(committed))

    # -- rebalance ----------------------------------------------------------------------

    async def _assigned(self, tps: Collection[TopicPartition]) -> None:
        """Paused until the sink is ready for the partitions and positions are rewound to
        the committed offsets (read after the sink started: stable under exactly-once)."""
        new = [tp for tp in tps if tp not in self._parts]
        if not new:
            return
        self._assigning = True
        self._consumer.pause(*new)
        try:
            async with asyncio.timeout(self._limits.request_timeout_s):
                await self._sink.assigned(new)
                await self._rewind(new)
        except Exception as exc:  # aiokafka would only log it
            self._suspect()
            self._fail(exc)
            return
        finally:
            self._assigning = False
        loop = asyncio.get_running_loop()
        for tp in new:
            first: asyncio.Future[None] = loop.create_future()
            first.set_result(None)
            self._parts[tp] = _PartitionFlow(tp, first)
            self._paused.discard(tp)
        self._consumer.resume(*new)
        if self.on_rebalance is not None:
            self.on_rebalance(kind="assigned", partitions=len(new))
        log.info("assigned %s", _fmt_tps(new))

    async def _rewind(self, tps: Sequence[TopicPartition]) -> None:
        committed = await asyncio.gather(*(self._consumer.committed(tp) for tp in tps))
        for tp, offset in zip(tps, committed, strict=True):
            if offset is not None:
                self._consumer.seek(tp, offset)

    async def _revoked(self, tps: Collection[TopicPartition]) -> None:
        """Finish (or cut off) the partitions' records, commit them, release the sink."""
        parts = [self._parts[tp] for tp in tps if tp in self._parts]
        if not parts:
            return
        for p in parts:
            p.closing = True
        await self._settle(parts)
        await self._close(parts)
        if self.on_rebalance is not None:
            self.on_rebalance(kind="revoked", partitions=len(parts))
        log.info("revoked %s", _fmt_tps(p.tp for p in parts))

    async def _settle(
        self, parts: Sequence[_PartitionFlow], until: float | None = None
    ) -> tuple[int, int]:
        """Wait for the partitions' records (until the loop time `until`, else the settle
        timeout), cancel what is left; returns (finished, cut off)."""
        tasks = {t for p in parts for t in p.tasks}
        if not tasks:
            return 0, 0
        loop = asyncio.get_running_loop()
        wait_s = self._limits.settle_timeout_s
        if until is not None:
            wait_s = max(0.0, min(wait_s, until - loop.time()))
        _, pending = await asyncio.wait(tasks, timeout=wait_s)
        if pending:
            log.warning(
                "%d records still in flight after %.0f s; cutting them off (they are read "
                "again from the committed offset)",
                len(pending),
                wait_s,
            )
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=SETTLE_AFTER_CANCEL_S)
        return len(tasks) - len(pending), len(pending)

    async def _close(self, parts: Sequence[_PartitionFlow], until: float | None = None) -> None:
        """Commit, abort torn transactions, release the sink: every step on the broker
        bounded (by `until`, a loop time, else the request timeout), so a dead broker cannot
        hold a revoke or a shutdown; what was not committed is read again by the next owner."""
        tps = [p.tp for p in parts]
        if until is None:
            until = asyncio.get_running_loop().time() + self._limits.request_timeout_s
        pending = self._pending_commit
        self._pending_commit = None
        try:
            async with asyncio.timeout_at(until):
                if pending is not None:
                    await pending
                await self._commit(tps, fatal=False)
                for p in parts:
                    if p.torn:
                        await self._sink.abort(p.tp)
                await self._sink.revoked(tps)
        except Exception as exc:  # the next owner re-reads what is uncommitted
            self._suspect()
            log.warning(
                "releasing %s: %s%s (what was not committed is read again)",
                _fmt_tps(tps),
                type(exc).__name__,
                f": {exc}" if str(exc) else " (the broker did not answer in time)",
            )
        finally:
            for tp in tps:
                self._parts.pop(tp, None)
                self._ledger.forget(tp)
                self._paused.discard(tp)

    # -- shutdown -----------------------------------------------------------------------

    async def drain(self, deadline: float | None = None) -> None:
        """Stop fetching, let in-flight records finish, commit, release the sink; all of it
        by `deadline` (a loop time; default: the settle timeout plus the request timeout).
        Records get all but a reserve of the time, the commit and releases get the reserve."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._limits.settle_timeout_s + self._limits.request_timeout_s
        reserve = min(CLOSE_RESERVE_S, max(0.0, deadline - loop.time()) / 3)
        self._draining = True
        self._backpressure()
        parts = list(self._parts.values())
        finished, cut_off = await self._settle(parts, until=deadline - reserve)
        await self._close(parts, until=deadline)
        log.info("drained: %d records finished, %d cut off", finished, cut_off)

    async def abandon(self) -> int:
        """Cut off every in-flight record and forget every partition without committing
        (the clients are being replaced after a broker failure): the next session reads
        them again from the committed offsets. Returns how many were cut off."""
        self._draining = True
        tasks = {t for p in self._parts.values() for t in p.tasks}
        for p in self._parts.values():
            p.torn = True  # nothing of this session may be committed any more
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=SETTLE_AFTER_CANCEL_S)
        for tp in list(self._parts):
            self._parts.pop(tp, None)
            self._ledger.forget(tp)
        self._paused.clear()
        return len(tasks)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka awaits these during a rebalance, before the group moves on."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._flow._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        await self._flow._assigned(assigned)
        self._flow.joined = True


async def _done_unless_stopped(stop: asyncio.Event, task: asyncio.Future[None]) -> bool:
    """Wait for `task` unless `stop` is set first: False then (the task goes on)."""
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    either: set[asyncio.Future[Any]] = {task, stopped}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
        return True
    return False


def _why(exc: BaseException) -> str:
    """`Type: message`, or empty for a bare timeout (its message is empty)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else ""


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]={o}" for tp, o in sorted(offsets.items()))


def _fmt_tps(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "nothing"


__all__ = [
    "Flow",
    "FlowLimits",
    "Handler",
    "Publish",
    "Sink",
    "decode_record",
    "source_of",
]
