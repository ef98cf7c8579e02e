"""OtelTelemetry against the SDK's in-memory span exporter and metric reader.

Covers: W3C context in and out of Kafka headers, span names/kinds/attributes, stage spans,
alert events and messages, sustained raise/clear through `on_result`, every metric, the
cardinality cap, the JSON request log, provider setup from OTEL_* variables, OTLP export
over HTTP and gRPC, and a canary proving prompt text reaches no span, metric or log.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support import otlp_receiver
from worker.catalog import Catalog
from worker.engine.engine import Engine
from worker.engine.report import error_result
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.errors import ConfigError, OverBudget
from worker.telemetry import names
from worker.telemetry.alerts import AlertMessage
from worker.telemetry.logs import JsonFormatter, configure_logging
from worker.telemetry.otel import OtelTelemetry, build_telemetry, stage
from worker.telemetry.setup import (
    TelemetryProviders,
    exporter_names,
    otlp_protocol,
    setup_telemetry,
)
from worker.telemetry.spans import KAFKA_GETTER, KAFKA_SETTER
from worker.telemetry.sustained import SustainedConfig

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CANARY = "CANARY-c4n4ry-9f1e"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)


@dataclass
class Rig:
    tel: OtelTelemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    log: io.StringIO

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        (found,) = [s for s in self.finished() if s.name == name]
        return found

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        if data is None:  # nothing recorded yet
            return {}
        return {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }

    def points(self, name: str) -> list[Any]:
        return list(self.metrics()[name].data.data_points)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line]


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(catalog: Catalog) -> Iterator[MakeRig]:
    handlers: list[logging.Handler] = []
    clock = {"t": 0.0}

    def make(
        sustained: SustainedConfig | None = None, max_attribute_values: int = 100, **kw: Any
    ) -> Rig:
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])
        log = io.StringIO()
        handler = configure_logging("INFO", stream=log)
        handlers.append(handler)
        tel = OtelTelemetry(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            catalog=catalog,
            sustained=sustained,
            max_attribute_values=max_attribute_values,
            clock=lambda: clock["t"],
            **kw,
        )
        return Rig(tel, exporter, reader, log)

    yield make
    for h in handlers:
        logging.getLogger().removeHandler(h)


@pytest.fixture
def rig(make_rig: MakeRig) -> Rig:
    return make_rig()


def fit(engine: Engine, req: AssemblyRequest) -> FitResult:
    return asyncio.run(engine.fit(req))


def tight(make_request: Callable[..., AssemblyRequest], **overrides: Any) -> AssemblyRequest:
    """A request that overflows a 600-token window: history and the top chunk dropped."""
    doc: dict[str, Any] = {
        "history": [
            {"role": "user", "content": "hello there " * 30},
            {"role": "assistant", "content": "general kenobi " * 30},
        ]
        * 3,
        "chunks": [
            {"id": "big", "text": "lorem ipsum " * 400},
            {"id": "c2", "text": "dolor sit amet " * 40},
            {"id": "c3", "text": "consectetur " * 40},
        ],
        # today's newest-first trimming: the drops and alerts below are its
        "budget": {"max_context_tokens": 600, "output_reserve": 60, "stable_history": False},
        "tenant": "acme",
        "pipeline": "docs-chat",
    }
    doc.update(overrides)
    return make_request(**doc)


def process(rig: Rig, headers: list[tuple[str, bytes]] | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "topic": "requests",
        "partition": 2,
        "offset": 41,
        "group": "tokenheap",
        "key": b"r1",
        "headers": headers if headers is not None else [],
    }
    args.update(kw)
    return rig.tel.process(**args)


# -- context propagation --------------------------------------------------------------------


def test_process_span_continues_the_trace_in_the_headers(rig: Rig) -> None:
    headers = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=abc")]
    with process(rig, headers):
        pass
    span = rig.span("process requests")
    assert span.kind is SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.context.trace_state.get("vendor") == "abc"
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "requests",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": "tokenheap",
        "messaging.kafka.message.key": "r1",
    }


def test_outgoing_headers_inside_send_carry_the_send_span_and_baggage(rig: Rig) -> None:
    headers = [
        ("traceparent", TRACEPARENT.encode()),
        ("tracestate", b"vendor=abc"),
        ("baggage", b"tenant=acme"),
    ]
    with process(rig, headers), rig.tel.send(topic="results") as send_span:
        out = dict(rig.tel.outgoing_headers())
        assert send_span.is_recording()
    send = rig.span("send results")
    proc = rig.span("process requests")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == proc.context.span_id
    assert out["traceparent"] == f"00-{TRACE_ID}-{send.context.span_id:016x}-01".encode()
    assert out["tracestate"] == b"vendor=abc"
    assert out["baggage"] == b"tenant=acme"
    assert dict(send.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "results",
    }


def test_no_trace_headers_start_a_new_trace_even_under_an_ambient_span(rig: Rig) -> None:
    ambient = trace.get_tracer("test", tracer_provider=TracerProvider()).start_span("poll")
    with trace.use_span(ambient, end_on_exit=True), process(rig, [("other", b"x")]):
        pass
    span = rig.span("process requests")
    assert span.parent is None
    assert span.context.trace_id != ambient.get_span_context().trace_id


def test_headers_outside_any_span_are_empty(rig: Rig) -> None:
    assert rig.tel.outgoing_headers() == []


def test_kafka_header_getter_and_setter() -> None:
    carrier: list[tuple[str, bytes | None]] = [("a", b"1"), ("a", b"2"), ("n", None)]
    assert KAFKA_GETTER.get(carrier, "a") == ["1"]
    assert KAFKA_GETTER.get(carrier, "n") is None
    assert KAFKA_GETTER.get(carrier, "missing") is None
    assert KAFKA_GETTER.keys(carrier) == ["a", "a", "n"]
    out: list[tuple[str, bytes]] = [("traceparent", b"old"), ("x", b"y")]
    KAFKA_SETTER.set(out, "traceparent", "new")
    assert out == [("x", b"y"), ("traceparent", b"new")]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"\xff\xfe", None, id="not-utf8"),
        pytest.param(b"k" * 300, "k" * 256, id="cut"),
    ],
)
def test_message_key_attribute(rig: Rig, key: bytes | None, expected: str | None) -> None:
    with process(rig, key=key):
        pass
    attrs = dict(rig.span("process requests").attributes or {})
    assert attrs.get("messaging.kafka.message.key") == expected


# -- stages ---------------------------------------------------------------------------------


def test_stage_spans_are_children_of_the_process_span(rig: Rig) -> None:
    with process(rig):
        with stage("count", texts=3):
            pass
        with rig.tel.stage("allocate"):
            pass
    proc = rig.span("process requests")
    for name in ("count", "allocate"):
        child = rig.span(name)
        assert child.parent is not None and child.parent.span_id == proc.context.span_id
        assert child.kind is SpanKind.INTERNAL
        assert (child.attributes or {})[names.ATTR_STAGE] == name
    assert (rig.span("count").attributes or {})["texts"] == 3


def test_stage_in_a_thread_pool_needs_the_callers_context(rig: Rig) -> None:
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    def count() -> bool:
        with stage("count") as span:
            return span.is_recording()

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool, process(rig):
            bare = await loop.run_in_executor(pool, count)
            ctx = contextvars.copy_context()
            carried = await loop.run_in_executor(pool, ctx.run, count)
        return bare, carried

    assert asyncio.run(main()) == (False, True)
    assert rig.span("count").parent is not None


def test_stage_outside_a_recording_span_records_nothing(rig: Rig) -> None:
    with stage("count") as span:
        assert not span.is_recording()
    with rig.tel.stage("allocate") as span:
        assert not span.is_recording()
    assert rig.finished() == []


# -- results on spans -----------------------------------------------------------------------


def test_result_attributes_on_the_process_span(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = tight(make_request)
    result = fit(engine, req)
    with process(rig):
        rig.tel.on_result(req, result, 0.02)
    attrs = dict(rig.span("process requests").attributes or {})
    usage = result.usage
    assert usage is not None
    assert attrs[names.GEN_AI_PROVIDER_NAME] == "openai"
    assert attrs[names.GEN_AI_REQUEST_MODEL] == "gpt-4o"
    assert attrs[names.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[names.GEN_AI_USAGE_INPUT_TOKENS] == usage.total_tokens
    per_slot = [attrs[names.attr_tokens(s)] for s in names.SLOTS]
    assert sum(per_slot) == usage.total_tokens
    assert attrs[names.attr_tokens("framing")] == usage.framing
    assert attrs[names.ATTR_BUDGET_TOKENS] == usage.budget_tokens == 540
    assert attrs[names.ATTR_BUDGET_OUTPUT_RESERVE] == 60
    assert attrs[names.ATTR_BUDGET_MAX_CONTEXT_TOKENS] == 600
    assert attrs[names.ATTR_UTILIZATION] == usage.utilization
    assert attrs[names.attr_dropped("history")] == 2
    assert attrs[names.attr_dropped("context")] == 1
    assert attrs[names.ATTR_COUNT_METHOD] == "tiktoken:o200k_base"
    assert attrs[names.ATTR_COUNT_EXACT] is True
    assert attrs[names.ATTR_COUNT_CACHE_MISSES] == result.cache.misses > 0
    assert attrs[names.ATTR_COUNT_CACHE_HITS] == result.cache.hits
    assert attrs[names.ATTR_TENANT] == "acme"
    assert attrs[names.ATTR_PIPELINE] == "docs-chat"
    assert attrs[names.ATTR_PROFILE] == "rag-chatbot"
    assert attrs[names.ATTR_REQUEST_ID] == "r1"
    assert rig.span("process requests").status.status_code is StatusCode.UNSET


def test_request_alerts_become_span_events_and_messages(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = tight(make_request)
    result = fit(engine, req)
    assert {a.type for a in result.alerts} == {"utilization_high", "top_chunk_dropped"}
    with process(rig):
        messages = rig.tel.on_result(req, result, 0.02)
    assert [(m.kind, m.type, m.state) for m in messages] == [
        ("request", a.type, "raised") for a in result.alerts
    ]
    high = next(m for m in messages if m.type == "utilization_high")
    assert (high.request_id, high.tenant, high.pipeline, high.model) == (
        "r1",
        "acme",
        "docs-chat",
        "gpt-4o",
    )
    assert high.value == result.usage.utilization if result.usage else False
    assert high.threshold == 0.8
    events = {e.name: e for e in rig.span("process requests").events}
    assert set(events) == {names.EVENT_BUDGET_ALERT}
    alert_events = [
        dict(e.attributes or {})
        for e in rig.span("process requests").events
        if e.name == names.EVENT_BUDGET_ALERT
    ]
    assert {
        "tokenheap.alert.kind": "request",
        "tokenheap.alert.type": "utilization_high",
        "tokenheap.alert.severity": "warning",
        "tokenheap.alert.value": result.usage.utilization if result.usage else 0,
        "tokenheap.alert.threshold": 0.8,
    } in alert_events
    counted = {
        (p.attributes[names.ATTR_ALERT_TYPE], p.value) for p in rig.points(names.METRIC_ALERTS)
    }
    assert counted == {("utilization_high", 1), ("top_chunk_dropped", 1)}


def test_error_result_marks_the_span_failed(rig: Rig, make_request: Any) -> None:
    req = make_request(tenant="acme")
    result = error_result("r1", "gpt-4o", OverBudget("system and query do not fit"), req)
    with process(rig):
        assert rig.tel.on_result(req, result, 0.001) == []
    span = rig.span("process requests")
    attrs = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attrs[names.ERROR_TYPE] == "over_budget"
    assert attrs[names.ATTR_STATUS] == "error"
    assert names.GEN_AI_USAGE_INPUT_TOKENS not in attrs
    metrics = rig.metrics()
    assert names.METRIC_INPUT_TOKENS not in metrics
    (point,) = rig.points(names.METRIC_FIT_DURATION)
    assert point.attributes[names.ERROR_TYPE] == "over_budget"
    (proc,) = rig.points(names.METRIC_PROCESS_DURATION)
    assert proc.attributes[names.ERROR_TYPE] == "over_budget"


def test_dead_letter_marks_the_span_and_counts(rig: Rig) -> None:
    with process(rig):
        rig.tel.on_dead_letter(reason_code="invalid_request", topic="requests")
    span = rig.span("process requests")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[names.ERROR_TYPE] == "invalid_request"
    assert [e.name for e in span.events] == [names.EVENT_DEAD_LETTER]
    (point,) = rig.points(names.METRIC_DEAD_LETTERS)
    assert point.value == 1
    assert dict(point.attributes) == {
        names.ATTR_DEAD_LETTER_REASON: "invalid_request",
        names.MESSAGING_DESTINATION_NAME: "requests",
    }
    (proc,) = rig.points(names.METRIC_PROCESS_DURATION)
    assert proc.attributes[names.ERROR_TYPE] == "invalid_request"


def test_an_exception_in_processing_is_recorded_by_type_only_and_raised(rig: Rig) -> None:
    with pytest.raises(RuntimeError), process(rig), stage("count"):
        raise RuntimeError(f"could not handle {CANARY}")
    for name in ("process requests", "count"):
        span = rig.span(name)
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})[names.ERROR_TYPE] == "RuntimeError"
        (event,) = span.events
        assert (event.name, dict(event.attributes or {})) == (
            "exception",
            {"exception.type": "RuntimeError"},
        )
        assert CANARY not in span.to_json()
    (proc,) = rig.points(names.METRIC_PROCESS_DURATION)
    assert proc.attributes[names.ERROR_TYPE] == "RuntimeError"


def test_a_failed_send_is_recorded(rig: Rig) -> None:
    with pytest.raises(TimeoutError), process(rig), rig.tel.send(topic="results"):
        raise TimeoutError
    send = rig.span("send results")
    assert send.status.status_code is StatusCode.ERROR
    assert (send.attributes or {})[names.ERROR_TYPE] == "TimeoutError"


def test_cli_path_gives_each_result_a_fit_span_under_the_run(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = make_request()
    result = fit(engine, req)
    with rig.tel.run():
        rig.tel.on_result(req, result, 0.5)
        rig.tel.on_result(req, result, 0.5)
    run = rig.span(names.SPAN_RUN)
    fits = [s for s in rig.finished() if s.name == names.SPAN_FIT]
    assert len(fits) == 2
    for s in fits:
        assert s.parent is not None and s.parent.span_id == run.context.span_id
        assert (s.attributes or {})[names.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.total_tokens  # type: ignore[union-attr]
        assert s.end_time is not None and s.start_time is not None
        assert s.end_time - s.start_time >= 0.5e9 - 1e6


# -- metrics --------------------------------------------------------------------------------


def test_token_utilization_and_duration_histograms(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = tight(make_request)
    result = fit(engine, req)
    with process(rig):
        rig.tel.on_result(req, result, 0.02)
    usage = result.usage
    assert usage is not None
    dims = {
        names.GEN_AI_REQUEST_MODEL: "gpt-4o",
        names.GEN_AI_PROVIDER_NAME: "openai",
        names.ATTR_PROFILE: "rag-chatbot",
        names.ATTR_TENANT: "acme",
        names.ATTR_PIPELINE: "docs-chat",
    }
    slots = {p.attributes[names.ATTR_SLOT]: p for p in rig.points(names.METRIC_SLOT_TOKENS)}
    assert set(slots) == set(names.SLOTS)
    for slot, point in slots.items():
        assert isinstance(point, HistogramDataPoint)
        assert point.sum == getattr(usage, slot)
        assert tuple(point.explicit_bounds) == names.TOKEN_BUCKETS
        assert dict(point.attributes) == {**dims, names.ATTR_SLOT: slot}
    (total,) = rig.points(names.METRIC_INPUT_TOKENS)
    assert (total.sum, tuple(total.explicit_bounds)) == (usage.total_tokens, names.TOKEN_BUCKETS)
    assert dict(total.attributes) == dims
    (util,) = rig.points(names.METRIC_UTILIZATION)
    assert util.sum == pytest.approx(usage.utilization)
    assert tuple(util.explicit_bounds) == names.UTILIZATION_BUCKETS
    (dur,) = rig.points(names.METRIC_FIT_DURATION)
    assert dur.sum == pytest.approx(0.02)
    assert tuple(dur.explicit_bounds) == names.GEN_AI_DURATION_BUCKETS
    (proc,) = rig.points(names.METRIC_PROCESS_DURATION)
    assert tuple(proc.explicit_bounds) == names.MESSAGING_DURATION_BUCKETS
    assert dict(proc.attributes) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "requests",
        "messaging.consumer.group.name": "tokenheap",
    }


def test_dropped_items_and_cache_lookups_are_counted(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = tight(make_request)
    first = fit(engine, req)
    second = fit(engine, req)  # same texts: all cache hits
    with process(rig):
        rig.tel.on_result(req, first, 0.01)
    with process(rig):
        rig.tel.on_result(req, second, 0.01)
    dropped = {
        (p.attributes[names.ATTR_SLOT], p.attributes[names.ATTR_DROP_REASON]): p.value
        for p in rig.points(names.METRIC_DROPPED_ITEMS)
    }
    assert dropped == {("history", "history_budget"): 4, ("context", "context_budget"): 2}
    lookups = {
        p.attributes[names.ATTR_CACHE_OUTCOME]: p.value
        for p in rig.points(names.METRIC_CACHE_LOOKUPS)
    }
    assert lookups == {
        "miss": first.cache.misses + second.cache.misses,
        "hit": first.cache.hits + second.cache.hits,
    }
    assert second.cache.hits > 0


def test_anthropic_count_calls_are_observed(make_rig: MakeRig) -> None:
    class Counts:
        calls = 0
        failures = 0

    counts = Counts()
    rig = make_rig(anthropic=counts)
    counts.calls, counts.failures = 7, 2
    (calls,) = rig.points(names.METRIC_ANTHROPIC_CALLS)
    (failures,) = rig.points(names.METRIC_ANTHROPIC_FAILURES)
    assert (calls.value, failures.value) == (7, 2)
    assert rig.metrics()[names.METRIC_ANTHROPIC_CALLS].data.is_monotonic


def test_anthropic_counts_from_a_lazy_source(make_rig: MakeRig) -> None:
    class Counts:
        calls = 3
        failures = 0

    made: list[Counts] = []
    rig = make_rig()
    assert names.METRIC_ANTHROPIC_CALLS not in rig.metrics()  # no source: nothing observed
    rig.tel.observe_anthropic(lambda: made[0] if made else None)
    assert names.METRIC_ANTHROPIC_CALLS not in rig.metrics()  # no client yet
    made.append(Counts())
    (calls,) = rig.points(names.METRIC_ANTHROPIC_CALLS)
    assert calls.value == 3


def test_claude_count_429s_and_limiter_waits_are_observed(make_rig: MakeRig) -> None:
    class Confirmer:  # what PayloadConfirmer exposes
        calls = 5
        failures = 0
        throttled = 2
        limiter_wait_s = 1.5

    rig = make_rig(anthropic=Confirmer())
    (throttled,) = rig.points(names.METRIC_ANTHROPIC_THROTTLED)
    (waited,) = rig.points(names.METRIC_ANTHROPIC_LIMITER_WAIT)
    assert (throttled.value, waited.value) == (2, 1.5)
    assert rig.metrics()[names.METRIC_ANTHROPIC_THROTTLED].data.is_monotonic


def test_audited_claude_counts_feed_a_drift_histogram_per_model(make_rig: MakeRig) -> None:
    from worker.engine.result import CountAudit

    rig = make_rig()
    for model, drift in (("claude-a", 0.01), ("claude-a", 0.03), ("claude-b", -0.02)):
        audit = CountAudit(local_tokens=100, confirmed_tokens=100, drift=drift)
        result = FitResult(request_id="r", status="ok", model=model, count_audit=audit)
        rig.tel.on_result(None, result, 0.01)
    rig.tel.on_result(None, FitResult(request_id="r", status="ok", model="claude-c"), 0.01)
    points = {
        (p.attributes[names.GEN_AI_REQUEST_MODEL], p.attributes[names.ATTR_DRIFT_DIRECTION]): p
        for p in rig.points(names.METRIC_CLAUDE_COUNT_DRIFT)
    }
    # an unaudited result records none; the sign is an attribute (histograms take no negatives)
    assert set(points) == {("claude-a", "over"), ("claude-b", "under")}
    a = points[("claude-a", "over")]
    assert (a.count, a.sum) == (2, pytest.approx(0.04))
    assert points[("claude-b", "under")].max == pytest.approx(0.02)


def test_tenant_and_pipeline_cardinality_is_capped(
    make_rig: MakeRig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    rig = make_rig(max_attribute_values=2)
    for tenant in ("t1", "t2", "t3", "t4", "t1"):
        req = make_request(tenant=tenant, pipeline=f"p-{tenant}")
        rig.tel.on_result(req, fit(engine, req), 0.01)
    counts = {
        (p.attributes[names.ATTR_TENANT], p.attributes[names.ATTR_PIPELINE]): p.count
        for p in rig.points(names.METRIC_INPUT_TOKENS)
    }
    assert counts == {("t1", "p-t1"): 2, ("t2", "p-t2"): 1, ("_other", "_other"): 2}
    # spans keep the real value: they are per request, not a time series
    assert {(s.attributes or {})[names.ATTR_TENANT] for s in rig.finished()} == {
        "t1",
        "t2",
        "t3",
        "t4",
    }


# -- sustained alerts through on_result -------------------------------------------------------


def test_sustained_utilization_raises_once_and_clears_once(
    make_rig: MakeRig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    cfg = SustainedConfig(window_requests=6, min_requests=4, share_limit=0.5, clear_below=0.2)
    rig = make_rig(sustained=cfg)
    hot = tight(make_request)
    cool = make_request(tenant="acme", pipeline="docs-chat")
    hot_result, cool_result = fit(engine, hot), fit(engine, cool)
    sustained: list[AlertMessage] = []
    for req, res in [(hot, hot_result)] * 12 + [(cool, cool_result)] * 12:
        with process(rig):
            sustained += [m for m in rig.tel.on_result(req, res, 0.01) if m.kind == "sustained"]
    assert [(m.type, m.state) for m in sustained] == [
        ("sustained_utilization", "raised"),
        ("sustained_utilization", "cleared"),
    ]
    raised, cleared = sustained
    assert (raised.tenant, raised.pipeline, raised.model) == ("acme", "docs-chat", "gpt-4o")
    assert raised.window is not None and cleared.window is not None
    assert (raised.window.requests, raised.window.over_threshold, raised.window.share) == (
        4,
        4,
        1.0,
    )
    assert raised.window.share_limit == 0.5 and raised.window.clear_below == 0.2
    assert raised.window.utilization_threshold == 0.8
    assert (cleared.window.requests, cleared.window.over_threshold) == (6, 1)
    assert cleared.severity == "info" and raised.severity == "warning"

    events = [
        dict(e.attributes or {})
        for s in rig.finished()
        for e in s.events
        if e.name == names.EVENT_SUSTAINED_ALERT
    ]
    assert [e[names.ATTR_ALERT_STATE] for e in events] == ["raised", "cleared"]
    assert events[0][names.ATTR_WINDOW_OVER_THRESHOLD] == 4
    states = {
        p.attributes.get(names.ATTR_ALERT_STATE): p.value
        for p in rig.points(names.METRIC_ALERTS)
        if p.attributes[names.ATTR_ALERT_KIND] == "sustained"
    }
    assert states == {"raised": 1, "cleared": 1}
    (active,) = rig.points(names.METRIC_SUSTAINED_ACTIVE)
    assert active.value == 0


def test_sustained_judges_by_the_request_threshold_override(
    make_rig: MakeRig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    cfg = SustainedConfig(window_requests=2, min_requests=2, share_limit=1.0, clear_below=0.5)
    rig = make_rig(sustained=cfg)
    req = make_request(budget={"max_context_tokens": 100, "alert_threshold": 0.2})
    result = fit(engine, req)
    assert result.usage is not None and 0.2 <= result.usage.utilization < 0.8
    messages = [m for _ in range(2) for m in rig.tel.on_result(req, result, 0.01)]
    assert [(m.kind, m.threshold) for m in messages] == [
        ("request", 0.2),
        ("request", 0.2),
        ("sustained", 1.0),
    ]
    assert messages[-1].window is not None
    assert messages[-1].window.utilization_threshold == 0.2


# -- logs -----------------------------------------------------------------------------------


def test_one_json_log_line_per_request_with_trace_ids(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    req = tight(make_request)
    result = fit(engine, req)
    with process(rig, [("traceparent", TRACEPARENT.encode())]):
        rig.tel.on_result(req, result, 0.02)
    (line,) = [r for r in rig.log_lines() if r["logger"] == "tokenheap.requests"]
    usage = result.usage
    assert usage is not None
    span = rig.span("process requests")
    assert line["level"] == "INFO"
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == f"{span.context.span_id:016x}"
    assert line["request_id"] == "r1"
    assert line["model"] == "gpt-4o"
    assert line["tokens"] == {s: getattr(usage, s) for s in names.SLOTS}
    assert line["total_tokens"] == usage.total_tokens
    assert line["budget_tokens"] == 540
    assert line["dropped"] == {"history": 2, "context": 1}
    assert line["alerts"] == ["utilization_high", "top_chunk_dropped"]
    verdict = "dropped 1 context, dropped 2 history"
    assert line["message"] == f"r1 fit {usage.total_tokens}/540 tokens ({verdict})"


def test_json_formatter_keeps_extras_and_exceptions() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %s", ("a",), None)
    record.partition = 3
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert (doc["message"], doc["partition"], doc["exc_type"]) == ("boom a", 3, "ValueError")
    assert "trace_id" not in doc


# -- the canary: prompt text never leaves as telemetry ----------------------------------------


def test_prompt_text_never_reaches_spans_metrics_logs_or_alert_telemetry(
    rig: Rig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    c = CANARY
    req = make_request(
        system=f"You are {c}. " * 3,
        history=[
            {"role": "user", "content": f"{c} question " * 40, "name": f"u{c}"},
            {"role": "assistant", "content": f"{c} answer " * 40},
        ]
        * 2,
        chunks=[
            {"id": "doc-1", "text": f"{c} passage " * 500},
            {"id": "doc-2", "text": f"{c} more " * 30},
        ],
        query=f"What about {c}?",
        metadata={"note": c},
        tenant="acme",
        pipeline="docs-chat",
        budget={"max_context_tokens": 600, "output_reserve": 60},
    )
    result = fit(engine, req)
    assert result.status == "ok" and result.alerts and result.dropped
    assert c in result.model_dump_json()  # the payload does carry it...
    failed = error_result("r2", "gpt-4o", OverBudget(f"cannot fit {c}"), req)
    cfg = SustainedConfig(window_requests=2, min_requests=1, share_limit=0.5, clear_below=0.1)
    rig = Rig(*_rebuild(rig, cfg))
    headers = [("traceparent", TRACEPARENT.encode()), ("baggage", b"k=v")]
    with process(rig, headers), stage("count"):
        messages = rig.tel.on_result(req, result, 0.01)
        rig.tel.on_result(req, failed, 0.01)
        rig.tel.on_dead_letter(reason_code="invalid_request", topic="requests")
        with rig.tel.send(topic="results"):
            out_headers = rig.tel.outgoing_headers()
    assert any(m.kind == "sustained" for m in messages)

    exported = "\n".join(s.to_json() for s in rig.finished())
    data = rig.reader.get_metrics_data()
    assert data is not None
    exported += data.to_json()
    exported += rig.log.getvalue()
    exported += repr(out_headers)
    # ...but no span, metric, log line or header does; alert messages carry ids only
    for event in (e for s in rig.finished() for e in s.events):
        exported += repr(event.attributes)
    assert rig.log.getvalue().count("\n") >= 2
    assert c not in exported
    assert all(c not in m.model_dump_json() for m in messages)


def _rebuild(rig: Rig, cfg: SustainedConfig) -> tuple[OtelTelemetry, Any, Any, Any]:
    """The same rig with another sustained config (same exporters and log)."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(rig.spans))
    reader = InMemoryMetricReader()
    tel = OtelTelemetry(
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
        sustained=cfg,
    )
    return tel, rig.spans, reader, rig.log


# -- setup from the environment ---------------------------------------------------------------


def test_sdk_disabled_records_nothing_but_still_propagates(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    make_request: Callable[..., AssemblyRequest],
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    extra = InMemorySpanExporter()
    providers = setup_telemetry(shutdown_on_exit=False, span_exporters=[extra])
    assert not providers.enabled
    tel = build_telemetry(providers=providers)
    req = tight(make_request)
    with tel.process(
        topic="t",
        partition=0,
        offset=0,
        group="g",
        key=None,
        headers=[("traceparent", TRACEPARENT.encode())],
    ) as span:
        assert not span.is_recording()
        messages = tel.on_result(req, fit(engine, req), 0.01)
        with tel.send(topic="out"):
            out = dict(tel.outgoing_headers())
    assert extra.get_finished_spans() == ()
    assert out["traceparent"].decode().split("-")[1] == TRACE_ID
    assert {m.type for m in messages} == {"utilization_high", "top_chunk_dropped"}
    tel.shutdown()


def test_resource_from_service_name_and_resource_attributes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tokenheap-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging,team=ml")
    providers = setup_telemetry(shutdown_on_exit=False, span_exporters=[InMemorySpanExporter()])
    assert isinstance(providers.tracer_provider, TracerProvider)
    attrs = providers.tracer_provider.resource.attributes
    assert attrs["service.name"] == "tokenheap-eu"
    assert attrs["deployment.environment.name"] == "staging"
    assert attrs["team"] == "ml"
    assert attrs["service.version"]
    providers.shutdown()


def test_default_service_name_is_tokenheap() -> None:
    providers = setup_telemetry(shutdown_on_exit=False, span_exporters=[InMemorySpanExporter()])
    assert isinstance(providers.tracer_provider, TracerProvider)
    assert providers.tracer_provider.resource.attributes["service.name"] == "tokenheap"
    providers.shutdown()


def test_nothing_configured_records_nothing() -> None:
    """No exporter for either signal: the API's no-op providers, not SDK ones recording
    into the void. Each record still gets a span id of its own in the caller's trace (and a
    trace of its own when it came without one), as an SDK span would have given it."""
    providers = setup_telemetry(shutdown_on_exit=False)
    assert isinstance(providers.tracer_provider, trace.NoOpTracerProvider)
    assert isinstance(providers.meter_provider, metrics.NoOpMeterProvider)
    assert (providers.enabled, providers.exporters, providers.own_ids) == (False, (), True)
    tel = build_telemetry(providers=providers, set_global=False)

    def outgoing(headers: list[tuple[str, bytes]]) -> list[str]:
        with (
            tel.process(topic="t", partition=0, offset=0, group="g", key=None, headers=headers),
            tel.send(topic="out"),
        ):
            current = trace.get_current_span().get_span_context()
            out = dict(tel.outgoing_headers())
        version, trace_id, span_id, flags = out["traceparent"].decode().split("-")
        assert (int(trace_id, 16), int(span_id, 16)) == (current.trace_id, current.span_id)
        assert not trace.get_current_span().get_span_context().is_valid  # detached after
        return [version, trace_id, span_id, flags]

    caller = ["00", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "00"]
    mine = outgoing([("traceparent", "-".join(caller).encode())])
    assert mine[1] == caller[1] and mine[2] != caller[2] and mine[3] == caller[3]
    first, second = outgoing([]), outgoing([])
    assert first[1] != second[1] and first[3] == second[3] == "01"


def test_sdk_disabled_carries_the_callers_context_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    providers = setup_telemetry(shutdown_on_exit=False)
    assert not providers.own_ids
    tel = build_telemetry(providers=providers, set_global=False)
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [("traceparent", parent)]
    with (
        tel.process(topic="t", partition=0, offset=0, group="g", key=None, headers=headers),
        tel.send(topic="out"),
    ):
        assert dict(tel.outgoing_headers())["traceparent"] == parent
    with tel.process(topic="t", partition=0, offset=1, group="g", key=None, headers=[]):
        assert "traceparent" not in dict(tel.outgoing_headers())


@pytest.mark.parametrize("recorded", ["traces", "metrics"])
def test_a_signal_without_an_exporter_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, recorded: str
) -> None:
    monkeypatch.setenv(f"OTEL_{recorded.upper()}_EXPORTER", "console")
    providers = setup_telemetry(shutdown_on_exit=False)
    sdk_tracer = isinstance(providers.tracer_provider, TracerProvider)
    sdk_meter = isinstance(providers.meter_provider, MeterProvider)
    assert (sdk_tracer, sdk_meter) == (recorded == "traces", recorded == "metrics")
    assert providers.enabled
    assert providers.own_ids == (recorded == "metrics")  # spans not recorded: own ids
    providers.shutdown()


def test_sampler_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    providers = setup_telemetry(shutdown_on_exit=False, span_exporters=[exporter])
    tel = build_telemetry(providers=providers)
    with tel.process(topic="t", partition=0, offset=0, group="g", key=None, headers=[]):
        pass
    assert exporter.get_finished_spans() == ()
    providers.shutdown()


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        pytest.param({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER", id="sampler"),
        pytest.param({"OTEL_TRACES_EXPORTER": "zipkin"}, "Collector", id="exporter"),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "grpc or http/protobuf",
            id="protocol",
        ),
    ],
)
def test_setup_refuses_what_it_cannot_honour(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=problem):
        setup_telemetry(shutdown_on_exit=False)


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        pytest.param({}, [], [], id="nothing-set"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"], ["otlp"], id="endpoint"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            ["otlp"],
            [],
            id="traces-endpoint",
        ),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"},
            ["console"],
            [],
            id="console",
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"], [], id="both"),
    ],
)
def test_exporter_selection(env: dict[str, str], traces: list[str], metrics: list[str]) -> None:
    assert exporter_names(env, "traces") == traces
    assert exporter_names(env, "metrics") == metrics


def test_protocol_per_signal_over_general() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
    }
    assert otlp_protocol(env, "traces") == "grpc"
    assert otlp_protocol(env, "metrics") == "http/protobuf"
    assert otlp_protocol({}, "traces") == "http/protobuf"


def test_console_exporter_writes_to_stderr_not_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    err = sys.stderr
    providers = setup_telemetry(shutdown_on_exit=False)
    assert providers.exporters == ("traces:console",)
    tel = build_telemetry(providers=providers)
    with tel.run():
        pass
    providers.shutdown()
    assert capsys.readouterr().out == ""
    assert names.SPAN_RUN in err.getvalue()  # type: ignore[attr-defined]


# -- OTLP export to a local receiver ----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_otlp_export_reaches_a_receiver(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    make_request: Callable[..., AssemblyRequest],
    protocol: str,
) -> None:
    otlp = otlp_receiver
    receiver_type = otlp.OtlpHttpReceiver if protocol == "http/protobuf" else otlp.OtlpGrpcReceiver
    with receiver_type() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "tokenheap-test")
        providers = setup_telemetry(shutdown_on_exit=False)
        assert providers.exporters == (f"traces:otlp/{protocol}", f"metrics:otlp/{protocol}")
        tel = build_telemetry(providers=providers)
        req = tight(make_request)
        with tel.process(
            topic="requests",
            partition=0,
            offset=1,
            group="g",
            key=b"r1",
            headers=[("traceparent", TRACEPARENT.encode())],
        ):
            tel.on_result(req, fit(engine, req), 0.01)
        tel.shutdown()
        rx.wait_for(lambda r: r.spans and r.latest(names.METRIC_INPUT_TOKENS), timeout_s=15)
        (span,) = rx.spans_named("process requests")
        assert span.kind == "CONSUMER"
        assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT_ID
        assert span.resource["service.name"] == "tokenheap-test"
        assert span.attributes[names.GEN_AI_REQUEST_MODEL] == "gpt-4o"
        assert [e.name for e in span.events].count(names.EVENT_BUDGET_ALERT) == 2
        tokens = rx.latest(names.METRIC_INPUT_TOKENS)
        assert tokens.unit == "{token}"
        assert tuple(tokens.points[0].explicit_bounds) == names.TOKEN_BUCKETS


# -- names ----------------------------------------------------------------------------------


def test_every_name_is_lowercase_dotted_and_unique() -> None:
    import re

    values = {
        k: v
        for k, v in vars(names).items()
        if k.isupper() and isinstance(v, str) and (k.startswith(("ATTR_", "METRIC_", "EVENT_")))
    }
    pattern = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
    assert all(pattern.match(v) for v in values.values()), values
    metrics = [v for k, v in values.items() if k.startswith("METRIC_")]
    assert len(metrics) == len(set(metrics))
    attrs = [v for k, v in values.items() if k.startswith("ATTR_")]
    assert len(attrs) == len(set(attrs))


def test_cost_is_counted_by_model_tenant_pipeline_and_part(
    make_rig: MakeRig, engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    rig = make_rig(max_attribute_values=2)
    results = []
    for tenant in ("t1", "t2", "t3", "t1"):
        req = make_request(model="gpt-5", tenant=tenant, pipeline="chat")
        results.append(res := fit(engine, req))
        rig.tel.on_result(req, res, 0.01)
    costs = {
        (
            p.attributes[names.GEN_AI_REQUEST_MODEL],
            p.attributes[names.ATTR_TENANT],
            p.attributes[names.ATTR_PIPELINE],
            p.attributes[names.ATTR_COST_PART],
        ): p.value
        for p in rig.points(names.METRIC_COST)
    }
    each = [r.usage.cost for r in results if r.usage is not None and r.usage.cost is not None]
    assert len(each) == 4
    assert costs == pytest.approx(
        {
            ("gpt-5", "t1", "chat", "input"): each[0].input + each[3].input,
            ("gpt-5", "t2", "chat", "input"): each[1].input,
            ("gpt-5", "_other", "chat", "input"): each[2].input,
            ("gpt-5", "t1", "chat", "output_worst_case"): 2 * each[0].output_worst_case,
            ("gpt-5", "t2", "chat", "output_worst_case"): each[1].output_worst_case,
            ("gpt-5", "_other", "chat", "output_worst_case"): each[2].output_worst_case,
        }
    )
    assert rig.metrics()[names.METRIC_COST].data.is_monotonic


# -- the no-op fast path ------------------------------------------------------------------------


def _noop_span_headers(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """What the OpenTelemetry API's own no-op spans leave for `outgoing_headers`: the
    reference the no-op fast path of `process` and `send` must match."""
    from opentelemetry import context as context_api
    from opentelemetry import propagate
    from opentelemetry.context import Context

    tracer = trace.NoOpTracer()
    parent = propagate.extract(headers, context=Context(), getter=KAFKA_GETTER)
    token = context_api.attach(parent)
    try:
        with tracer.start_as_current_span("process"), tracer.start_as_current_span("send"):
            carrier: list[tuple[str, bytes]] = []
            propagate.inject(carrier, setter=KAFKA_SETTER)
            return carrier
    finally:
        context_api.detach(token)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", TRACEPARENT.encode())],
        [("traceparent", TRACEPARENT.encode()), ("baggage", b"tenant=acme,k=v")],
        [("baggage", b"only=baggage")],
        [("traceparent", b"not a traceparent")],
    ],
)
def test_noop_providers_carry_the_context_as_noop_spans_would(
    headers: list[tuple[str, bytes]],
    engine: Engine,
    make_request: Callable[..., AssemblyRequest],
) -> None:
    tel = OtelTelemetry(
        tracer_provider=trace.NoOpTracerProvider(),
        meter_provider=metrics.NoOpMeterProvider(),
    )
    log = io.StringIO()
    handler = configure_logging("INFO", stream=log)
    try:
        req = tight(make_request)
        result = fit(engine, req)
        kw: dict[str, Any] = {"partition": 0, "offset": 0, "group": "g", "key": None}
        with tel.process(topic="t", headers=headers, **kw) as span:
            assert not span.is_recording()
            messages = tel.on_result(req, result, 0.01)
            with tel.send(topic="out"):
                out = tel.outgoing_headers()
        assert trace.get_current_span() is trace.INVALID_SPAN  # detached again
    finally:
        logging.getLogger().removeHandler(handler)
    assert out == _noop_span_headers(headers)
    assert {m.type for m in messages} == {"utilization_high", "top_chunk_dropped"}
    (line,) = [json.loads(x) for x in log.getvalue().splitlines() if "tokenheap.requests" in x]
    if any(k == "traceparent" and v == TRACEPARENT.encode() for k, v in headers):
        assert (line["trace_id"], line["span_id"]) == (TRACE_ID, PARENT_ID)
    else:
        assert "trace_id" not in line


def test_noop_process_reraises_and_restores_the_context() -> None:
    tel = build_telemetry(
        providers=TelemetryProviders(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), False)
    )
    headers = [("traceparent", TRACEPARENT.encode())]
    kw: dict[str, Any] = {"partition": 0, "offset": 0, "group": "g", "key": None}
    with pytest.raises(ValueError, match="boom"), tel.process(topic="t", headers=headers, **kw):
        raise ValueError("boom")
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize(
    "created",
    [0.0, 0.0005, 0.9995, 0.9999995, 1.0000004, 1764632096.9995, 1764632096.4059999,
     852504596.4059999, 1764632099.999999, 2**31 + 0.0000005, 4102444800.123456],
)  # fmt: skip
def test_json_log_timestamps_match_isoformat(created: float) -> None:
    from datetime import UTC, datetime

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.created = created
    formatter = JsonFormatter()
    for _ in range(2):  # formatted, then from the per-second cache
        doc = json.loads(formatter.format(record))
        assert doc["ts"] == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def test_request_log_record_names_its_caller(
    engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    from worker.telemetry import logs

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("tokenheap.requests.test")
    logger.addHandler(keep := Keep())
    logger.setLevel(logging.INFO)
    try:
        logs.log_result(logger, fit(engine, tight(make_request)), 0.5)
    finally:
        logger.removeHandler(keep)
    (record,) = seen
    assert (record.funcName, record.pathname) == ("log_result", logs.__file__)
    assert record.getMessage().startswith("r1 fit ")
    assert record.__dict__["duration_ms"] == 500.0


class _Pass(logging.Filter):
    """A filter of someone else's: it changes nothing, but the ledger line must then go
    the standard way, through `LogRecord` and every filter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return True


@contextmanager
def worker_logging(out: io.StringIO) -> Iterator[logging.Handler]:
    """The root logger as a worker process has it: `configure_logging`'s JSON handler to
    `out` and no other (pytest's log capture, on the root while a test runs, is another
    way out), until the block ends."""
    root = logging.getLogger()
    saved = root.handlers[:]
    for h in saved:
        root.removeHandler(h)
    handler = configure_logging("INFO", stream=out)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)


@pytest.mark.parametrize("process", [None, 1])
@pytest.mark.parametrize("in_span", [False, True])
def test_request_line_written_directly_is_the_handlers_own(
    engine: Engine, make_request: Callable[..., AssemblyRequest], in_span: bool, process: int | None
) -> None:
    """The ledger line `log_result` writes through the stream of the JSON handler is the
    line the handler writes for the record: same keys in the same order, same values (the
    timestamp aside, read a moment apart), the span's ids and the process tag included."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from worker.telemetry import logs

    results = [
        fit(engine, tight(make_request)),
        fit(engine, make_request()),
        error_result("e1", "gpt-4o", OverBudget("too big")),
    ]
    out = io.StringIO()
    logger = logging.getLogger(logs.REQUEST_LOGGER)
    ctx = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    span = NonRecordingSpan(ctx) if in_span else trace.INVALID_SPAN
    lines: dict[str, list[str]] = {}
    passing = _Pass()
    with worker_logging(out) as handler:
        if process is not None:
            logs.tag_process(process)
        try:
            for way in ("direct", "standard"):
                if way == "standard":
                    logger.addFilter(passing)
                assert (logs._only_handler(logger) is handler) == (way == "direct")
                with trace.use_span(span):
                    for r in results:
                        logs.log_result(logger, r, 0.25)
                lines[way] = out.getvalue().splitlines()
                out.seek(0)
                out.truncate()
        finally:
            logger.removeFilter(passing)
    direct = [json.loads(x) for x in lines["direct"]]
    standard = [json.loads(x) for x in lines["standard"]]
    assert len(direct) == len(standard) == len(results)
    for a, b in zip(direct, standard, strict=True):
        assert abs(_epoch(a.pop("ts")) - _epoch(b.pop("ts"))) < 5
        assert list(a.items()) == list(b.items())
        assert ("trace_id" in a) == in_span and a.get("worker_process") == process
    assert direct[0]["dropped"] and direct[2]["error_code"] == "over_budget"


def _epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts).timestamp()


def test_request_line_reaches_every_handler_when_there_are_others(
    engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    """Another handler anywhere on the way (pytest's caplog, an application's own) gets
    its record, and the JSON handler its line, as `logging` would deliver them."""
    from worker.telemetry import logs

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    out = io.StringIO()
    parent = logging.getLogger("tokenheap")
    logger = logging.getLogger(logs.REQUEST_LOGGER)
    with worker_logging(out) as handler:
        assert logs._only_handler(logger) is handler
        parent.addHandler(keep := Keep())
        try:
            assert logs._only_handler(logger) is None
            logs.log_result(logger, fit(engine, make_request()), 0.1)
        finally:
            parent.removeHandler(keep)
    (record,) = seen
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["message"] == record.getMessage()


def test_request_line_is_written_once_when_the_stream_cannot_flush(
    engine: Engine, make_request: Callable[..., AssemblyRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line written but not flushed (a full non-blocking pipe) is reported as
    `StreamHandler` reports it, not written a second time the standard way."""
    from worker.telemetry import logs

    class Stuck(io.StringIO):
        def flush(self) -> None:
            raise BlockingIOError("pipe full")

    out = Stuck()
    reported: list[logging.LogRecord] = []
    logger = logging.getLogger(logs.REQUEST_LOGGER)
    with worker_logging(out) as handler:
        monkeypatch.setattr(handler, "handleError", reported.append)
        assert logs._only_handler(logger) is handler
        logs.log_result(logger, fit(engine, make_request()), 0.1)
    (line,) = out.getvalue().splitlines()
    (record,) = reported
    assert json.loads(line)["message"] == record.getMessage()


def test_request_line_goes_the_standard_way_for_another_record_factory(
    engine: Engine, make_request: Callable[..., AssemblyRequest]
) -> None:
    """An instrumentation that makes records of its own (extra fields from a record
    factory) gets them: the line is then made from a `LogRecord`."""
    from worker.telemetry import logs

    standard = logging.getLogRecordFactory()

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = standard(*args, **kwargs)
        record.deployment = "blue"
        return record

    out = io.StringIO()
    logger = logging.getLogger(logs.REQUEST_LOGGER)
    with worker_logging(out):
        logging.setLogRecordFactory(tagged)
        try:
            assert logs._only_handler(logger) is None
            logs.log_result(logger, fit(engine, make_request()), 0.1)
        finally:
            logging.setLogRecordFactory(standard)
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["deployment"] == "blue"


def test_json_lines_write_what_pydantic_cannot() -> None:
    """A value with no JSON of its own is written as its `str`; a line the fast writer
    refuses whole (bytes that are not UTF-8) is still written, by the stdlib's encoder."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.thing = ConfigError("no models.yaml")
    record.raw = b"\xff\xfe"
    line = JsonFormatter().format(record)
    doc = json.loads(line)
    assert doc["raw"] == str(b"\xff\xfe") and doc["thing"] == str(record.thing)
    assert line.startswith('{"ts":"')  # compact, as pydantic-core writes the others
    record.raw = b"ok"
    assert json.loads(JsonFormatter().format(record))["raw"] == "ok"
