"""Telemetry end to end: a real broker, the real worker process, OTLP/HTTP to a local receiver.

The test plays an upstream service: it produces a request under its own PRODUCER span,
with W3C trace context in the Kafka headers. The worker (a subprocess) exports spans and
metrics over OTLP/HTTP protobuf to `tests/support/otlp_receiver.py`. Then:

- one connected trace: test `send` span -> worker `process` span -> worker `send` span, and
  the result message's traceparent names that send span, in the same trace;
- token attributes on the process span match the published result;
- a run of over-threshold requests raises ONE sustained alert, a run of small ones clears
  it ONCE (small windows via TOKENHEAP_SUSTAINED_*), on the alerts topic, as span events
  and as metrics;
- the JSON request log carries the trace id; a canary in the prompt text reaches no span,
  metric or log line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from tests.support import otlp_receiver
from worker.engine.result import FitResult
from worker.telemetry import names
from worker.telemetry.alerts import AlertMessage
from worker.telemetry.spans import KAFKA_SETTER

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARY-e2e-5d1c"
HOT = 8
"""Over-threshold requests (the traced one included): enough to fill the window."""
COOL = 8
"""Small requests afterwards: enough to push the over share below clear_below."""
SUSTAINED_ENV = {
    "TOKENHEAP_SUSTAINED_WINDOW_REQUESTS": "6",
    "TOKENHEAP_SUSTAINED_MIN_REQUESTS": "4",
    "TOKENHEAP_SUSTAINED_SHARE_LIMIT": "0.5",
    "TOKENHEAP_SUSTAINED_CLEAR_BELOW": "0.2",
}


def worker_command() -> list[str]:
    """`tokenheap worker`, as an operator starts it (it builds OtelTelemetry from OTEL_*)."""
    return [sys.executable, "-m", "worker", "worker"]


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The worker process, stdout and stderr (its JSON log) into `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            worker_command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as an orchestrator would: the worker drains, flushes telemetry and exits."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def hot_request(i: int) -> dict[str, Any]:
    """Overflows a 600-token window: >90% utilization, history and the top chunk dropped."""
    c = CANARY
    return {
        "request_id": f"hot-{i}",
        "model": "gpt-4o",
        "tenant": "acme",
        "pipeline": "docs-chat",
        "system": f"You are {c}.",
        "history": [
            {"role": "user", "content": f"{c} " + "hello there " * 25},
            {"role": "assistant", "content": f"{c} " + "general kenobi " * 25},
        ]
        * 3,
        "chunks": [
            {"id": "big", "text": f"{c} " + "lorem ipsum " * 400},
            {"id": "c2", "text": f"{c} " + "dolor sit amet " * 40},
            {"id": "c3", "text": f"{c} " + "consectetur " * 40},
        ],
        "query": f"What about {c}?",
        # today's newest-first trimming: the utilization asserted below is its
        "budget": {"max_context_tokens": 600, "output_reserve": 60, "stable_history": False},
    }


def cool_request(i: int) -> dict[str, Any]:
    return {
        "request_id": f"cool-{i}",
        "model": "gpt-4o",
        "tenant": "acme",
        "pipeline": "docs-chat",
        "system": "You are helpful.",
        "query": f"What is {CANARY}?",
        "budget": {"max_context_tokens": 600, "output_reserve": 60},
    }


@pytest.fixture
def receiver() -> Iterator[Any]:
    with otlp_receiver.OtlpHttpReceiver() as rx:
        yield rx


class Reader:
    """Everything on a few topics, from the start, collected in the background."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.records: dict[str, list[ConsumerRecord[bytes, bytes]]] = {t: [] for t in topics}
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=f"e2e-reader-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )

    async def __aenter__(self) -> Reader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def drain(self, seconds: float) -> None:
        """Keep collecting for `seconds`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            batch = await self._consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                self.records[tp.topic].extend(recs)

    async def until(
        self, done: Callable[[Reader], bool], what: str, timeout_s: float = 90.0
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not done(self):
                    batch = await self._consumer.getmany(timeout_ms=200)
                    for tp, recs in batch.items():
                        self.records[tp.topic].extend(recs)
        except TimeoutError:
            counts = {t: len(r) for t, r in self.records.items()}
            raise AssertionError(f"timed out waiting for {what}; have {counts}") from None


@pytest.mark.kafka
async def test_trace_tokens_and_sustained_alerts_end_to_end(
    kafka_bootstrap: str,
    make_topics: Callable[..., Awaitable[list[str]]],
    receiver: Any,
    tmp_path: Path,
) -> None:
    requests, results, alerts, dlq = await make_topics(4, partitions=1, prefix="tel")

    # -- the upstream service: its own tracer, exporting to the same receiver ---------------
    upstream = TracerProvider(resource=Resource({"service.name": "e2e-upstream"}))
    upstream.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
    )
    tracer = upstream.get_tracer("e2e")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        with tracer.start_as_current_span(f"send {requests}", kind=SpanKind.PRODUCER) as up:
            headers: list[tuple[str, bytes]] = []
            inject(headers, setter=KAFKA_SETTER)
            await producer.send_and_wait(
                requests, json.dumps(hot_request(0)).encode(), key=b"hot-0", headers=headers
            )
        upstream_span = up.get_span_context()
        for i in range(1, HOT):
            await producer.send_and_wait(requests, json.dumps(hot_request(i)).encode())

        # -- the worker --------------------------------------------------------------------
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TOKENHEAP_"))}
        env.update(
            {
                "TOKENHEAP_BOOTSTRAP_SERVERS": kafka_bootstrap,
                "TOKENHEAP_GROUP_ID": f"tokenheap-e2e-{uuid.uuid4().hex[:8]}",
                "TOKENHEAP_REQUESTS_TOPIC": requests,
                "TOKENHEAP_RESULTS_TOPIC": results,
                "TOKENHEAP_ALERTS_TOPIC": alerts,
                "TOKENHEAP_DEAD_LETTER_TOPIC": dlq,
                "TOKENHEAP_HEALTH_PORT": "0",
                "TOKENHEAP_COMMIT_INTERVAL_S": "0.2",
                **SUSTAINED_ENV,
                "OTEL_SERVICE_NAME": "tokenheap-e2e",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            }
        )
        stderr_path = tmp_path / "worker.stderr"
        proc = start_worker(env, stderr_path)
        try:
            async with Reader(kafka_bootstrap, [results, alerts]) as reader:
                await reader.until(
                    lambda r: len(r.records[results]) >= HOT and _sustained(r, alerts),
                    "the hot results and the sustained raise",
                )
                for i in range(COOL):
                    await producer.send_and_wait(requests, json.dumps(cool_request(i)).encode())
                await reader.until(
                    lambda r: (
                        len(r.records[results]) >= HOT + COOL and len(_sustained(r, alerts)) >= 2
                    ),
                    "the cool results and the sustained clear",
                )
                await reader.drain(2.0)  # would a flood follow? give it the chance
        finally:
            code = await asyncio.to_thread(stop_worker, proc)
        log_text = stderr_path.read_text(encoding="utf-8", errors="replace")
        assert code == 0, log_text[-4000:]
    finally:
        await producer.stop()
        upstream.shutdown()

    # -- one connected trace ---------------------------------------------------------------
    trace_id = f"{upstream_span.trace_id:032x}"
    receiver.wait_for(
        lambda r: (
            any(s.name == f"process {requests}" and s.trace_id == trace_id for s in r.spans)
            and r.latest(names.METRIC_INPUT_TOKENS) is not None
        ),
        timeout_s=30,
    )
    in_trace = [s for s in receiver.spans if s.trace_id == trace_id]
    (up_rec,) = [s for s in in_trace if s.resource.get("service.name") == "e2e-upstream"]
    (process,) = [s for s in in_trace if s.name == f"process {requests}"]
    sends = [s for s in in_trace if s.name == f"send {results}"]
    assert up_rec.span_id == f"{upstream_span.span_id:016x}" and up_rec.kind == "PRODUCER"
    assert process.kind == "CONSUMER"
    assert process.parent_span_id == up_rec.span_id
    assert process.resource["service.name"] == "tokenheap-e2e"
    assert process.resource["deployment.environment.name"] == "test"
    (send,) = sends
    assert send.kind == "PRODUCER" and send.parent_span_id == process.span_id
    alert_sends = [s for s in in_trace if s.name == f"send {alerts}"]
    assert alert_sends and all(s.parent_span_id == process.span_id for s in alert_sends)

    (traced,) = [r for r in reader.records[results] if r.key == b"hot-0"]
    out_headers = {k: v for k, v in traced.headers}
    version, out_trace, out_span, flags = out_headers["traceparent"].decode().split("-")
    assert (version, out_trace, out_span) == ("00", trace_id, send.span_id)
    assert int(flags, 16) & 1  # sampled

    # -- token attributes on the process span match the published result -------------------
    result = FitResult.model_validate_json(traced.value)
    assert result.usage is not None
    a = process.attributes
    assert a["messaging.system"] == "kafka"
    assert a["messaging.destination.name"] == requests
    assert a["messaging.destination.partition.id"] == "0"
    assert a["messaging.kafka.offset"] == 0
    assert a["messaging.consumer.group.name"] == env["TOKENHEAP_GROUP_ID"]
    assert a["messaging.kafka.message.key"] == "hot-0"
    assert a["messaging.operation.type"] == "process"
    assert a[names.GEN_AI_PROVIDER_NAME] == "openai"
    assert a[names.GEN_AI_REQUEST_MODEL] == "gpt-4o"
    assert a[names.GEN_AI_OPERATION_NAME] == "chat"
    assert a[names.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.total_tokens
    for slot in names.SLOTS:
        assert a[names.attr_tokens(slot)] == getattr(result.usage, slot)
    assert a[names.ATTR_BUDGET_TOKENS] == result.usage.budget_tokens
    assert a[names.ATTR_BUDGET_OUTPUT_RESERVE] == 60
    assert a[names.ATTR_UTILIZATION] == result.usage.utilization
    assert a[names.attr_dropped("context")] == 1
    assert a[names.ATTR_COUNT_METHOD] == result.count_method  # tiktoken: or fastokens:o200k_base
    assert str(result.count_method).endswith(":o200k_base")
    assert a[names.ATTR_COUNT_EXACT] is True
    alert_types = {
        e.attributes[names.ATTR_ALERT_TYPE]
        for e in process.events
        if e.name == names.EVENT_BUDGET_ALERT
    }
    assert alert_types == {"utilization_high", "top_chunk_dropped"}

    # -- sustained: one raise, one clear, no flood ------------------------------------------
    sustained = _sustained(reader, alerts)
    assert [(m.type, m.state) for m in sustained] == [
        ("sustained_utilization", "raised"),
        ("sustained_utilization", "cleared"),
    ]
    raised, cleared = sustained
    assert (raised.tenant, raised.pipeline, raised.model) == ("acme", "docs-chat", "gpt-4o")
    assert raised.window is not None and cleared.window is not None
    assert raised.window.share >= 0.5 and raised.window.requests >= 4
    assert cleared.window.share < 0.2
    per_request = [
        AlertMessage.model_validate_json(r.value)
        for r in reader.records[alerts]
        if r.value and b'"kind":"request"' in r.value
    ]
    assert {m.request_id for m in per_request} == {f"hot-{i}" for i in range(HOT)}
    events = [
        e.attributes[names.ATTR_ALERT_STATE]
        for s in receiver.spans
        for e in s.events
        if e.name == names.EVENT_SUSTAINED_ALERT
    ]
    assert events == ["raised", "cleared"]

    # -- metrics (the final export at shutdown holds the totals) ----------------------------
    receiver.wait_for(lambda r: _alert_states(r) == {"raised": 1, "cleared": 1}, timeout_s=30)
    tokens = receiver.latest(names.METRIC_INPUT_TOKENS)
    assert sum(p.count for p in tokens.points) == HOT + COOL
    assert tuple(tokens.points[0].explicit_bounds) == names.TOKEN_BUCKETS
    slots = receiver.latest(names.METRIC_SLOT_TOKENS)
    assert {p.attributes[names.ATTR_SLOT] for p in slots.points} == set(names.SLOTS)
    (active,) = receiver.latest(names.METRIC_SUSTAINED_ACTIVE).points
    assert active.value == 0
    duration = receiver.latest(names.METRIC_PROCESS_DURATION)
    assert sum(p.count for p in duration.points) == HOT + COOL

    # -- logs: one JSON line per request, with the trace id; no prompt text anywhere ---------
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    (fit_line,) = [x for x in lines if x.get("request_id") == "hot-0"]
    assert fit_line["trace_id"] == trace_id
    assert fit_line["span_id"] == process.span_id
    assert fit_line["tokens"] == {s: getattr(result.usage, s) for s in names.SLOTS}
    assert CANARY not in log_text
    assert CANARY not in repr(receiver.spans) + repr(receiver.metrics)


def _sustained(reader: Reader, alerts: str) -> list[AlertMessage]:
    return [
        AlertMessage.model_validate_json(r.value)
        for r in reader.records[alerts]
        if r.value and b'"kind":"sustained"' in r.value
    ]


def _alert_states(receiver: Any) -> dict[str, int]:
    found = receiver.latest(names.METRIC_ALERTS)
    if found is None:
        return {}
    return {
        p.attributes[names.ATTR_ALERT_STATE]: p.value
        for p in found.points
        if p.attributes.get(names.ATTR_ALERT_KIND) == "sustained"
    }
