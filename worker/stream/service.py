"""`tokenheap worker`: lifecycle only — clients, signals, drain.

The one place holding both Kafka clients. Startup: the health endpoint (live, not ready),
the vocabularies, then the broker (waited for with backoff up to the start-up deadline;
refused credentials or TLS stop at once), topics (optional), the publisher, the consumer in
the group. A broker outage is ridden out: when the clients fail because of it (a delivery
or a commit timing out), they are replaced once the broker answers again, and whatever was
not committed is read again. On SIGTERM/SIGINT: not live any more, stop fetching, finish
in-flight records, commit, close the producers, leave the group, all within
`drain_timeout_s` whatever the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerFenced

from worker.build import build_engine, limits_of
from worker.engine.engine import Engine
from worker.errors import ConfigError
from worker.runtime import settle_heap
from worker.settings import Settings
from worker.stream.flow import MAX_BATCH, Flow, FlowLimits
from worker.stream.health import HealthServer, flow_status
from worker.stream.kafka import (
    BrokerRefused,
    BrokerUnreachable,
    check_connection,
    client_kwargs,
    consumer_tuning,
    ensure_topics,
    producer_tuning,
    worker_topics,
)
from worker.stream.ledger import LedgerError
from worker.stream.outage import BrokerWatch, ClientLogFilter
from worker.stream.processor import Processor, Topics
from worker.stream.publish import IdempotentPublisher, TransactionalPublisher
from worker.telemetry.hooks import NoopTelemetry, Telemetry

log = logging.getLogger("worker")


PROBE_TIMEOUT_S = 5.0
"""Bound on one connection probe (a frozen broker accepts TCP and never answers)."""
STARTUP_BACKOFF_S = (0.5, 5.0)
"""First and longest wait between connection attempts while the broker is not there yet."""
RESTART_BACKOFF_S = 0.5
HEALTHY_SESSION_S = 60.0
"""Clients that lasted this long start the next restart's backoff from scratch."""
MIN_GRACE_S = 0.2
"""Past the shutdown deadline, each remaining close still gets this long to say goodbye."""


def flow_limits(settings: Settings) -> FlowLimits:
    return FlowLimits(
        max_in_flight=settings.max_in_flight,
        max_in_flight_per_partition=settings.max_in_flight_per_partition,
        commit_interval_s=settings.commit_interval_s,
        settle_timeout_s=settings.drain_timeout_s,
        request_timeout_s=settings.kafka_request_timeout_s,
    )


def is_outage(exc: BaseException) -> bool:
    """A failure the broker's absence explains (a timeout, a lost connection, a transaction
    that could not reach its coordinator): worth new clients once the broker is back. A
    fenced producer (another worker owns the partition now) or any other error is not."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ProducerFenced | ConfigError | LedgerError):
            return False
        if isinstance(seen, TimeoutError | KafkaTimeoutError):
            return True
        if isinstance(seen, KafkaError) and seen.retriable:
            return True
        seen = seen.__cause__
    return False


@dataclass(eq=False, slots=True)
class _State:
    """What the health endpoint and the shutdown read: the current session's flow, and
    whether (and by when) the worker is stopping."""

    watch: BrokerWatch
    engine: Engine | None = None
    flow: Flow | None = None
    stopping: bool = False
    deadline: float | None = None
    """Loop time by which everything must be closed once a stop was asked for."""

    def live(self) -> bool:
        return not self.stopping

    def ready(self) -> bool:
        flow = self.flow
        return not self.stopping and not self.watch.down and flow is not None and flow.member()

    def status(self) -> dict[str, Any]:
        """/status and /readyz details of the current session's flow (none between them)."""
        counting = self.engine.counting() if self.engine is not None else {}
        if self.flow is None:
            return {
                "member": False,
                "partitions": [],
                "in_flight": 0,
                "paused_partitions": 0,
                "counting": counting,
            }
        return {**flow_status(self.flow)(), "counting": counting}

    def until(self, budget_s: float) -> float:
        """The shutdown deadline once stopping, else `budget_s` from now."""
        now = asyncio.get_running_loop().time()
        if self.deadline is not None:
            return max(self.deadline, now + MIN_GRACE_S)
        return now + budget_s


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    telemetry: Telemetry | None = None,
    engine: Engine | None = None,
    health_socket: socket.socket | None = None,
) -> int:
    """Run until `stop` is set (then drain) or something fails for good. Returns 0 after a
    stop, 1 after a failure (or the broker not coming up within the start-up deadline), 2
    when the broker refuses us (credentials, TLS). A broker outage is ridden out: the
    clients are replaced once it is back and uncommitted records are read again."""
    client_kwargs(settings)  # a ConfigError surfaces before anything starts
    engine = engine or build_engine(settings)
    telemetry = telemetry or NoopTelemetry()
    observe = getattr(telemetry, "observe_anthropic", None)
    if observe is not None:  # count_tokens calls, 429s, limiter waits, once a client exists
        observe(lambda: engine.anthropic_started)
    watch = BrokerWatch(
        lambda: check_connection(settings, _probe_timeout(settings)),
        what=settings.bootstrap_servers,
        on_start=telemetry.on_kafka_outage_start,
        on_end=telemetry.on_kafka_outage_end,
    )
    state = _State(watch, engine)
    quiet = ClientLogFilter(watch)
    health = HealthServer(
        settings.health_host,
        settings.health_port,
        state.ready,
        status=state.status,
        live=state.live,
        socks=[health_socket] if health_socket is not None else (),
    )
    watch.bind()
    quiet.install()
    stamp = asyncio.create_task(_stamp_stop(stop, state, settings.drain_timeout_s))
    code: int | None = 1
    try:
        if settings.health_port or health_socket is not None:  # first: live, not ready
            await health.start()
        await _warm(engine)
        code = await _startup_wait(settings, stop)
        restarts = 0
        while code is None:
            began = asyncio.get_running_loop().time()
            code = await _session(settings, stop, telemetry, engine, state)
            if code is None:  # new clients, after a pause that grows if they keep failing fast
                healthy = asyncio.get_running_loop().time() - began >= HEALTHY_SESSION_S
                restarts = 0 if healthy else restarts + 1
                if await _stopped_within(stop, min(RESTART_BACKOFF_S * 2**restarts, 30.0)):
                    code = 0
    finally:
        state.stopping = True
        stamp.cancel()
        await health.stop()
        quiet.remove()
        await watch.close()
        await _close_engine(engine)
    if code == 0:
        log.info("worker stopped cleanly")
    return 1 if code is None else code


async def _stamp_stop(stop: asyncio.Event, state: _State, drain_timeout_s: float) -> None:
    """When a stop is asked for: not live any more, and the deadline of the whole shutdown."""
    await stop.wait()
    state.stopping = True
    state.deadline = asyncio.get_running_loop().time() + drain_timeout_s


def _probe_timeout(settings: Settings) -> float:
    return min(settings.kafka_request_timeout_s, PROBE_TIMEOUT_S)


async def _startup_wait(settings: Settings, stop: asyncio.Event) -> int | None:
    """Until the broker lets us in (None). With backoff while it is unreachable, up to the
    start-up deadline (then 1); at once 2 if it refuses us; 0 if stopped meanwhile."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    until = began + settings.kafka_startup_timeout_s
    delay, longest = STARTUP_BACKOFF_S
    waiting = False
    while True:
        try:
            await check_connection(settings, _probe_timeout(settings))
        except BrokerRefused as exc:
            log.error("Kafka refused the worker, not retrying (exit 2): %s", exc)
            return 2
        except BrokerUnreachable as exc:
            left = until - loop.time()
            if left <= 0:
                log.error(
                    "Kafka still unreachable after %.0f s (TOKENHEAP_KAFKA_STARTUP_TIMEOUT_S); "
                    "giving up (exit 1): %s",
                    loop.time() - began,
                    exc,
                )
                return 1
            if not waiting:
                log.warning(
                    "waiting for Kafka at %s (%s); retrying with backoff for up to %.0f s",
                    settings.bootstrap_servers,
                    exc,
                    settings.kafka_startup_timeout_s,
                )
                waiting = True
            if await _stopped_within(stop, min(delay, left)):
                return 0
            delay = min(delay * 2, longest)
            continue
        if waiting:
            log.info("Kafka reachable after %.1f s; starting", loop.time() - began)
        return None


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _session(
    settings: Settings,
    stop: asyncio.Event,
    telemetry: Telemetry,
    engine: Engine,
    state: _State,
) -> int | None:
    """One life of the Kafka clients: start, consume until stopped or failed, close (every
    step bounded). None when the clients failed because of an outage and the broker is back:
    the caller starts a new session, which reads the uncommitted records again."""
    request_s = settings.kafka_request_timeout_s
    common = client_kwargs(settings)
    sink, consumer = _clients(settings, common, telemetry)
    topics = Topics(settings.results_topic, settings.alerts_topic, settings.dead_letter_topic)
    processor = Processor(
        engine, limits_of(settings), telemetry, topics, settings.group_id,
        max_message_bytes=settings.max_message_bytes,
    )  # fmt: skip
    flow = Flow(consumer, sink, processor, flow_limits(settings), suspect=state.watch.suspect)
    telemetry.watch_kafka(flow.snapshot)
    flow.on_commit, flow.on_rebalance = telemetry.on_commit, telemetry.on_rebalance
    failure: BaseException | None = None
    try:
        started = await _unless_stopped(
            stop, _start(settings, common, sink, consumer, flow), request_s
        )
        if started:
            state.flow = flow
            log.info(
                "worker up: group %s reads %s (%s, up to %d in flight)",
                settings.group_id, settings.requests_topic, settings.delivery,
                settings.max_in_flight,
            )  # fmt: skip
            await flow.run(stop)
            if stop.is_set():
                log.info("draining %d in-flight records (up to %.0f s)", flow.in_flight,
                         settings.drain_timeout_s)  # fmt: skip
                await flow.drain(state.until(settings.drain_timeout_s) - MIN_GRACE_S * 2)
        failure = flow.failure
    except (KafkaError, TimeoutError) as exc:
        failure = flow.failure or exc
        log.error("kafka: %s: %s", type(exc).__name__, exc)
    finally:
        state.flow = None
    if failure is not None and is_outage(failure):
        cut = await flow.abandon()
        if not stop.is_set():
            log.warning(
                "restarting the Kafka clients once the broker answers (%s%s); %d records "
                "in flight are read again from the committed offsets",
                type(failure).__name__, f": {failure}" if str(failure) else "", cut,
            )  # fmt: skip
            state.watch.suspect()
            await state.watch.wait_up(stop)
    # Both even if they never started: an unstarted client still holds a connection pool.
    await _quietly("closing the producers", sink.stop(), state.until(request_s))
    await _quietly("leaving the group", consumer.stop(), state.until(request_s))
    if failure is None:
        return 0
    if is_outage(failure):
        return 0 if stop.is_set() else None
    return 1


async def _start(
    settings: Settings,
    common: dict[str, Any],
    sink: IdempotentPublisher | TransactionalPublisher,
    consumer: AIOKafkaConsumer,
    flow: Flow,
) -> None:
    if settings.create_topics:
        await ensure_topics(
            common, worker_topics(settings), settings.topic_partitions, settings.topic_replication
        )
    await sink.start()
    await consumer.start()
    consumer.subscribe([settings.requests_topic], listener=flow.listener)


async def _unless_stopped(stop: asyncio.Event, step: Awaitable[None], timeout_s: float) -> bool:
    """`step` within `timeout_s` (else TimeoutError), unless `stop` comes first (False)."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, timeout=timeout_s, return_when=FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if stop.is_set():
        return False
    raise TimeoutError(f"no answer from Kafka within {timeout_s:.0f} s")


def _clients(
    settings: Settings, common: dict[str, Any], telemetry: Telemetry
) -> tuple[IdempotentPublisher | TransactionalPublisher, AIOKafkaConsumer]:
    sink: IdempotentPublisher | TransactionalPublisher
    producing = {**common, **producer_tuning(settings)}
    if settings.delivery == "exactly-once":
        sink = TransactionalPublisher(
            producing, settings.group_id, telemetry, settings.max_message_bytes,
            outputs=(settings.results_topic, settings.alerts_topic, settings.dead_letter_topic),
        )  # fmt: skip
    else:
        sink = IdempotentPublisher(producing, telemetry, settings.max_message_bytes)
    consumer = AIOKafkaConsumer(
        **common,
        **consumer_tuning(settings),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.offset_reset,
        isolation_level="read_committed",  # never act on an aborted upstream transaction
        max_poll_records=MAX_BATCH,
    )
    return sink, consumer


async def _warm(engine: Engine) -> None:
    """Load the local vocabularies before joining the group, so the first requests of a
    ready worker do not wait for them. fastokens (about 2 s to load) loads behind: the
    worker joins counting with tiktoken (exact too, a fifth of the load time) and each
    vocabulary switches over once loaded."""
    began = time.perf_counter()
    names = engine.catalog.local_encodings()
    behind = await asyncio.to_thread(engine.preload, names, behind=True)
    log.info("vocabularies %s loaded in %.1f s", ", ".join(names), time.perf_counter() - began)
    if behind is not None:
        behind.add_done_callback(lambda f: _loaded_behind(f, names, began))
    settle_heap()  # start-up is over: out of the collector's way (worker.runtime)


def _loaded_behind(done: Future[None], names: list[str], began: float) -> None:
    exc = done.exception()
    if exc is not None:
        log.warning("fastokens could not be loaded, counting goes on with tiktoken: %r", exc)
    else:
        log.info(
            "fastokens counts %s from now on (%.1f s from start-up)",
            ", ".join(names),
            time.perf_counter() - began,
        )


async def _quietly(what: str, step: Awaitable[object], until: float | None = None) -> None:
    """Await `step` (by the loop time `until`, if given); report a failure and go on."""
    try:
        if until is None:
            await step
        else:
            async with asyncio.timeout_at(until):
                await step
    except TimeoutError:
        log.warning("%s: Kafka did not answer in time; going on without it", what)
    except asyncio.CancelledError:
        # aiokafka's close awaits the fetch tasks it cancelled and can let their
        # CancelledError escape; only a cancellation of this task itself goes on up.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("%s: the client's own tasks were cancelled; going on", what)
    except Exception as exc:  # shutting down: report and go on
        log.warning("%s: %s: %s", what, type(exc).__name__, exc)


async def _close_engine(engine: Engine) -> None:
    await _quietly("closing the engine", engine.aclose())


def run_worker(
    settings: Settings,
    telemetry: Telemetry | None = None,
    health_socket: socket.socket | None = None,
) -> int:
    """Entry point of `tokenheap worker`: the exit code (0 clean stop, 1 failure)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    return asyncio.run(_main(settings, telemetry, health_socket))


async def _main(
    settings: Settings, telemetry: Telemetry | None, health_socket: socket.socket | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s: already draining", sig.name)
            return
        log.info("%s: stopping; finishing in-flight work", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    # A TOKENHEAP_PROCESSES child starts with both blocked (worker.stream.processes): one
    # sent while it started is held until now and drains it like any other (no-op else).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        return await serve(settings, stop=stop, telemetry=telemetry, health_socket=health_socket)
    finally:
        # Drained: held from here to the exit, so a late one (a TOKENHEAP_PROCESSES parent
        # passing on a stop this worker already made) cannot kill it in its last export.
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
