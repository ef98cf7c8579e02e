"""Sending the messages of `outgoing.py` (results, alerts, dead letters) through one of two
publishers.

    IdempotentPublisher     at-least-once: one idempotent producer; a record counts as done
                            when every message it caused is acknowledged.
    TransactionalPublisher  exactly-once: one transactional producer per input partition
                            (aiokafka has no KIP-447 group fencing, so the transactional id
                            is what fences a zombie owner of that partition); a record counts
                            as done once its messages are in the open transaction, which
                            commits together with the consumed offsets.

Every message carries the trace context of the span that sent it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from worker.errors import TransactionFailed
from worker.stream.outgoing import DEFAULT_MAX_MESSAGE_BYTES, Outgoing
from worker.telemetry.hooks import Telemetry

log = logging.getLogger(__name__)

Done = Callable[[], None]


async def _send(producer: AIOKafkaProducer, msg: Outgoing, telemetry: Telemetry) -> Any:
    """Queue one message inside a `send` span; returns its delivery future."""
    with telemetry.send(topic=msg.topic):
        headers = [*msg.headers, *telemetry.outgoing_headers()]
        return await producer.send(msg.topic, msg.value, key=msg.key, headers=headers)


def _when_all(futures: Sequence[asyncio.Future[Any]], done: Done | None) -> asyncio.Future[None]:
    """A future for all deliveries; `done` runs only if every one succeeded. Cancelling the
    result never cancels a delivery (that would not unsend it)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[None] = loop.create_future()
    left = len(futures)
    errors: list[BaseException] = []

    def one(fut: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if fut.cancelled():
            errors.append(asyncio.CancelledError())
        elif (exc := fut.exception()) is not None:
            errors.append(exc)
        if left == 0 and not out.done():
            if errors:
                out.set_exception(errors[0])
            else:
                if done is not None:
                    done()
                out.set_result(None)

    if not futures:
        if done is not None:
            done()
        out.set_result(None)
    for fut in futures:
        fut.add_done_callback(one)
    return out


def producer_kwargs(
    common: dict[str, Any], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Durable and ordered: idempotence implies acks=all and no reordering on retry."""
    return {
        **common,
        "enable_idempotence": True,
        "max_request_size": max_message_bytes,
        "max_batch_size": 256 * 1024,
        "linger_ms": 2,
    }


class IdempotentPublisher:
    """At-least-once: the consumer commits offsets once deliveries are acknowledged."""

    commits_offsets = False

    def __init__(
        self,
        common: dict[str, Any],
        telemetry: Telemetry,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(common, max_message_bytes))
        self._telemetry = telemetry
        self._healthy = False

    async def start(self) -> None:
        await self._producer.start()
        self._healthy = True

    async def stop(self) -> None:
        self._healthy = False
        await self._producer.stop()

    def ready(self) -> bool:
        return self._healthy

    async def assigned(self, tps: Collection[TopicPartition]) -> None:
        return None

    async def revoked(self, tps: Collection[TopicPartition]) -> None:
        return None

    async def publish(
        self, tp: TopicPartition, messages: Sequence[Outgoing], done: Done
    ) -> asyncio.Future[None]:
        """Queue in call order (so per partition in offset order); `done` after the acks."""
        futures = [await _send(self._producer, m, self._telemetry) for m in messages]
        delivered = _when_all(futures, done)
        delivered.add_done_callback(self._watch)
        return delivered

    def _watch(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._healthy = False

    async def commit(
        self, tps: Collection[TopicPartition], offset_of: Callable[[TopicPartition], int | None]
    ) -> dict[TopicPartition, int]:
        raise NotImplementedError("at-least-once offsets are committed by the consumer")

    async def abort(self, tp: TopicPartition) -> None:
        return None


@dataclass(slots=True)
class _Txn:
    producer: AIOKafkaProducer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = False
    closed: bool = False
    deliveries: list[asyncio.Future[Any]] = field(default_factory=list)


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """Stable per (group, input partition): whoever owns the partition next fences us."""
    return f"tokenheap-{group_id}-{tp.topic}-{tp.partition}"


class TransactionalPublisher:
    """Exactly-once: consume-transform-produce in per-partition transactions."""

    commits_offsets = True

    def __init__(
        self,
        common: dict[str, Any],
        group_id: str,
        telemetry: Telemetry,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        outputs: Sequence[str] = (),
    ) -> None:
        """`outputs`: every topic this worker writes to (results, alerts, dead letters),
        swept for a predecessor's forgotten transaction when a partition is assigned."""
        self._common = common
        self._max_message_bytes = max_message_bytes
        self._group_id = group_id
        self._outputs = tuple(dict.fromkeys(outputs))
        self._telemetry = telemetry
        self._txns: dict[TopicPartition, _Txn] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.revoked(list(self._txns))

    def ready(self) -> bool:
        return all(not t.closed for t in self._txns.values())

    async def assigned(self, tps: Collection[TopicPartition]) -> None:
        """Start a producer per new partition. Starting registers the transactional id, which
        aborts (or waits out) whatever the previous owner left open, so offsets read after
        this are stable."""
        new = [tp for tp in tps if tp not in self._txns]
        producers = {
            tp: AIOKafkaProducer(
                **producer_kwargs(self._common, self._max_message_bytes),
                transactional_id=transactional_id(self._group_id, tp),
            )
            for tp in new
        }
        results = await asyncio.gather(
            *(self._start(tp, p) for tp, p in producers.items()), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(p.stop() for p in producers.values()), return_exceptions=True)
            raise failed[0]
        for tp, producer in producers.items():
            self._txns[tp] = _Txn(producer)

    async def _start(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        await producer.start()
        if self._outputs:
            await self._sweep(tp, producer)

    async def _sweep(self, source: TopicPartition, producer: AIOKafkaProducer) -> None:
        """Abort, with the new producer epoch, whatever an earlier owner of this
        transactional id left open in the output partitions without the coordinator
        knowing: one empty transaction over every output partition and the group's
        offsets, aborted.

        Why: `start()` resolved every transaction the coordinator knows of, but a broker
        that crashes while committing can mark a prepared transaction complete without
        writing its markers (seen with a single-node Kafka 4.3 killed and restarted: no
        marker in any partition, the offsets' one included). Its batches stay open under
        our producer id: read_committed readers stop at them (the partition's last stable
        offset is stuck), and this producer's next commit in that partition commits them
        too, while their input, whose offsets never became visible, is processed again:
        published twice. Aborting is what Kafka's own remedy for a hanging transaction
        does (`kafka-transactions.sh abort`); an abort marker where nothing is open costs
        one control record. aiokafka has no call to add a partition without sending to it,
        so the transaction manager is told directly (pinned by an integration test).

        Limits: were only some partitions' markers lost while the offsets' marker was
        written, the abort would drop output whose input counts as done (not seen: the
        crash lost all of them together; telling the cases apart per partition needs
        DescribeProducers, which aiokafka lacks). And while an output partition has no
        leader, the abort's markers wait for it, and so does this producer's next
        transaction, as any transaction writing there would.

        A failure on the way is raised without an abort (an abort would wait for the same
        broker, unbounded): `assigned` stops the producers, the worker's next session
        fences the transaction and the coordinator aborts it.
        """
        manager: Any = getattr(producer, "_txn_manager", None)
        if not hasattr(manager, "maybe_add_partition_to_txn"):
            log.warning("this aiokafka cannot add a partition to a transaction; not swept")
            return
        tps = [
            TopicPartition(topic, p)
            for topic in self._outputs
            for p in sorted(await producer.partitions_for(topic))
        ]
        await producer.begin_transaction()
        for tp in tps:
            manager.maybe_add_partition_to_txn(tp)
        # Puts the group's offsets partition in the transaction too: its abort marker
        # drops any offset the forgotten transaction left pending (this one is aborted).
        await producer.send_offsets_to_transaction({source: 0}, self._group_id)
        await producer.abort_transaction()
        log.debug("%s: swept %d output partitions", manager.transactional_id, len(tps))

    async def revoked(self, tps: Collection[TopicPartition]) -> None:
        """Close the partitions' producers; a transaction still open is aborted."""
        await asyncio.gather(*(self._close(tp) for tp in tps if tp in self._txns))

    async def _close(self, tp: TopicPartition) -> None:
        txn = self._txns.pop(tp)
        async with txn.lock:
            txn.closed = True
            if txn.open:
                await self._abort_quietly(tp, txn)
            await txn.producer.stop()

    async def publish(
        self, tp: TopicPartition, messages: Sequence[Outgoing], done: Done
    ) -> asyncio.Future[None]:
        """Send into the partition's open transaction; `done` runs under the same lock a
        commit takes, so a commit never splits one record's messages from its offset."""
        txn = self._txns.get(tp)
        if txn is None:
            raise TransactionFailed(f"{tp.topic}[{tp.partition}] has no producer: not assigned")
        async with txn.lock:
            if txn.closed:
                raise TransactionFailed(f"{tp.topic}[{tp.partition}] was revoked")
            if not txn.open:
                await txn.producer.begin_transaction()
                txn.open = True
            for m in messages:
                txn.deliveries.append(await _send(txn.producer, m, self._telemetry))
            done()
        return _when_all([], None)

    async def commit(
        self, tps: Collection[TopicPartition], offset_of: Callable[[TopicPartition], int | None]
    ) -> dict[TopicPartition, int]:
        """Commit each partition's open transaction with its next offset; raises
        TransactionFailed (after aborting) if any could not commit."""
        results = await asyncio.gather(
            *(self._commit_one(tp, offset_of) for tp in tps if tp in self._txns),
            return_exceptions=True,
        )
        committed: dict[TopicPartition, int] = {}
        failure: BaseException | None = None
        for r in results:
            if isinstance(r, BaseException):
                failure = failure or r
            elif r is not None:
                committed[r[0]] = r[1]
        if failure is not None:
            raise failure
        return committed

    async def _commit_one(
        self, tp: TopicPartition, offset_of: Callable[[TopicPartition], int | None]
    ) -> tuple[TopicPartition, int] | None:
        txn = self._txns.get(tp)
        if txn is None:
            return None
        async with txn.lock:
            if not txn.open or txn.closed:
                return None
            offset = offset_of(tp)  # under the lock: exactly the records sent so far
            try:
                if offset is not None:
                    await txn.producer.send_offsets_to_transaction({tp: offset}, self._group_id)
                await txn.producer.commit_transaction()
            except Exception as exc:
                # Poisoned: the ledger counts the aborted records as done, so nothing more
                # may be sent or committed for this partition by this process.
                txn.closed = True
                await self._abort_quietly(tp, txn)
                raise TransactionFailed(
                    f"{tp.topic}[{tp.partition}]: transaction commit failed "
                    f"({type(exc).__name__}: {exc}); its records will be read again"
                ) from exc
            finally:
                txn.open = False
                _settle(txn.deliveries)
                txn.deliveries = []
        return (tp, offset) if offset is not None else None

    async def abort(self, tp: TopicPartition) -> None:
        """Throw away the open transaction (a record was cut off half-sent)."""
        txn = self._txns.get(tp)
        if txn is None:
            return
        async with txn.lock:
            if txn.open:
                await self._abort_quietly(tp, txn)

    async def _abort_quietly(self, tp: TopicPartition, txn: _Txn) -> None:
        try:
            await txn.producer.abort_transaction()
        except Exception as exc:  # the next owner's producer aborts it anyway
            log.warning("%s[%d]: abort failed (%s)", tp.topic, tp.partition, type(exc).__name__)
        finally:
            txn.open = False
            _settle(txn.deliveries)
            txn.deliveries = []


def _settle(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Read the outcome of finished deliveries so asyncio does not warn about them."""
    for fut in futures:
        if fut.done() and not fut.cancelled():
            fut.exception()
        else:
            fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
