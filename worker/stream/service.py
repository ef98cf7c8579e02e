"""`tokenheap worker`: lifecycle only — clients, signals, drain.

The one place holding both Kafka clients. Startup: topics (optional), the publisher, the
consumer in the group, the health endpoint. On SIGTERM/SIGINT: stop fetching, finish
in-flight records within `drain_timeout_s`, commit, close the producers, leave the group.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from worker.build import build_engine, limits_of
from worker.engine.engine import Engine
from worker.settings import Settings
from worker.stream.flow import MAX_BATCH, Flow, FlowLimits
from worker.stream.health import HealthServer
from worker.stream.kafka import client_kwargs, ensure_topics, worker_topics
from worker.stream.processor import Processor, Topics
from worker.stream.publish import IdempotentPublisher, TransactionalPublisher
from worker.telemetry.hooks import NoopTelemetry, Telemetry

log = logging.getLogger("worker")


def flow_limits(settings: Settings) -> FlowLimits:
    return FlowLimits(
        max_in_flight=settings.max_in_flight,
        max_in_flight_per_partition=settings.max_in_flight_per_partition,
        commit_interval_s=settings.commit_interval_s,
        settle_timeout_s=settings.drain_timeout_s,
    )


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    telemetry: Telemetry | None = None,
    engine: Engine | None = None,
) -> int:
    """Run until `stop` is set (then drain) or something fails; 0 after a clean stop."""
    engine = engine or build_engine(settings)
    telemetry = telemetry or NoopTelemetry()
    observe = getattr(telemetry, "observe_anthropic", None)
    if observe is not None:  # count_tokens calls, 429s, limiter waits, once a client exists
        observe(lambda: engine.anthropic_started)
    common = client_kwargs(settings)
    if settings.create_topics:
        await ensure_topics(
            common, worker_topics(settings), settings.topic_partitions, settings.topic_replication
        )
    sink, consumer = _clients(settings, common, telemetry)
    topics = Topics(settings.results_topic, settings.alerts_topic, settings.dead_letter_topic)
    processor = Processor(engine, limits_of(settings), telemetry, topics, settings.group_id)
    flow = Flow(consumer, sink, processor, flow_limits(settings))
    health = HealthServer(settings.health_host, settings.health_port, flow.ready)
    try:
        if settings.health_port:  # first: live (and not ready) while loading and joining
            await health.start()
        await _warm(engine)
        await sink.start()
        await consumer.start()
        consumer.subscribe([settings.requests_topic], listener=flow.listener)
        log.info(
            "worker up: group %s reads %s (%s, up to %d in flight)",
            settings.group_id, settings.requests_topic, settings.delivery, settings.max_in_flight,
        )  # fmt: skip
        await flow.run(stop)
        log.info("draining %d in-flight records (up to %.0f s)", flow.in_flight,
                 settings.drain_timeout_s)  # fmt: skip
        await flow.drain()
    except KafkaError as exc:
        log.error("kafka: %s: %s", type(exc).__name__, exc)
        flow.failure = flow.failure or exc
    finally:
        await health.stop()
        # Both even if they never started: an unstarted client still holds a connection pool.
        await _quietly("closing the producers", sink.stop())
        await _quietly("leaving the group", consumer.stop())
        await _close_engine(engine)
    if flow.failure is not None:
        return 1
    log.info("worker stopped cleanly")
    return 0


def _clients(
    settings: Settings, common: dict[str, Any], telemetry: Telemetry
) -> tuple[IdempotentPublisher | TransactionalPublisher, AIOKafkaConsumer]:
    sink: IdempotentPublisher | TransactionalPublisher
    if settings.delivery == "exactly-once":
        sink = TransactionalPublisher(common, settings.group_id, telemetry)
    else:
        sink = IdempotentPublisher(common, telemetry)
    consumer = AIOKafkaConsumer(
        **common,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.offset_reset,
        isolation_level="read_committed",  # never act on an aborted upstream transaction
        max_poll_records=MAX_BATCH,
    )
    return sink, consumer


async def _warm(engine: Engine) -> None:
    """Load the local vocabularies before joining the group (seconds each), so the first
    requests of a ready worker do not wait for them."""
    began = time.perf_counter()
    names = sorted(
        {
            m.encoding
            for m in engine.catalog.models.values()
            if m.provider == "openai" and m.encoding
        }
    )
    await asyncio.to_thread(engine.preload, names)
    log.info("vocabularies %s loaded in %.1f s", ", ".join(names), time.perf_counter() - began)


async def _quietly(what: str, step: Awaitable[object]) -> None:
    try:
        await step
    except Exception as exc:  # shutting down: report and go on
        log.warning("%s: %s: %s", what, type(exc).__name__, exc)


async def _close_engine(engine: Engine) -> None:
    await _quietly("closing the engine", engine.aclose())


def run_worker(settings: Settings, telemetry: Telemetry | None = None) -> int:
    """Entry point of `tokenheap worker`: the exit code (0 clean stop, 1 failure)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    return asyncio.run(_main(settings, telemetry))


async def _main(settings: Settings, telemetry: Telemetry | None) -> int:
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
    try:
        return await serve(settings, stop=stop, telemetry=telemetry)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
