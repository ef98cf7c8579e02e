"""`OtelTelemetry`: the `Telemetry` protocol on OpenTelemetry, and the `stage()` span helper.

Context flow for one Kafka record:

    headers --extract--> parent --process <topic> (CONSUMER)--+-- count / allocate (stage)
                                                               +-- send <results> (PRODUCER)
                                                                     `--inject--> headers out

`process()` continues the W3C trace context (traceparent, tracestate, baggage) found in the
record's headers; `outgoing_headers()` injects the current one, so call it inside `send()`
and consumers of the result continue from the send span. The `tokenheap fit` CLI has no
Kafka: `run()` opens one root span and `on_result` gives each result a short `fit` span.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from opentelemetry import context as context_api
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import AttributeValue

from worker.catalog import Catalog, Profile
from worker.engine.request import AssemblyRequest
from worker.engine.result import Alert, FitResult
from worker.engine.stage import _ACTIVE_TRACER, SpanLike, record_failure, stage
from worker.telemetry import names, spans
from worker.telemetry.alerts import AlertMessage, WindowStats
from worker.telemetry.hooks import KafkaHeaders
from worker.telemetry.instruments import (
    AnthropicSource,
    Attrs,
    CardinalityCap,
    Instruments,
    KafkaSource,
)
from worker.telemetry.logs import REQUEST_LOGGER, log_result
from worker.telemetry.setup import DEFAULT_SERVICE_NAME, TelemetryProviders, setup_telemetry
from worker.telemetry.sustained import SustainedConfig, SustainedDetector, Transition

DEFAULT_ALERT_THRESHOLD: Final[float] = Profile.model_fields["alert_threshold"].default
SUSTAINED_TYPE: Final = "sustained_utilization"
_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Processing:
    """What one `process()` scope knows: its span, and the error it ended with, if any."""

    span: Span
    error_type: str | None = None


_IDS = RandomIdGenerator()


def _own_span(parent: SpanContext) -> NonRecordingSpan:
    """A span context of a record's own, recorded nowhere: in the parent's trace (sampled
    or not as it was), else in a new sampled one, with a new span id: what an SDK span
    with no processor would have carried, at the cost of two random numbers."""
    if parent.is_valid:
        trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
    else:
        trace_id, flags, state = _IDS.generate_trace_id(), TraceFlags(TraceFlags.SAMPLED), None
    own = SpanContext(trace_id, _IDS.generate_span_id(), False, flags, state)
    return NonRecordingSpan(own)


class OtelTelemetry:
    """Spans, metrics, alerts and the request log line, behind the `Telemetry` protocol."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider,
        meter_provider: metrics.MeterProvider,
        catalog: Catalog | None = None,
        anthropic: AnthropicSource | None = None,
        sustained: SustainedConfig | None = None,
        max_attribute_values: int = 100,
        providers: TelemetryProviders | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._tracer = tracer_provider.get_tracer(names.SCOPE)
        self._tracing = not isinstance(self._tracer, trace.NoOpTracer)
        """False under a no-op tracer provider (OTEL_SDK_DISABLED, or no trace exporter):
        `process` and `send` then only carry the trace context through, which is all a
        no-op span would do, without building and attaching spans for every record."""
        self._own_ids = providers.own_ids if providers is not None else False
        """No trace exporter, SDK not disabled: `process` still gives each record a span
        context of its own (`_own_span`), recorded nowhere, so messages and log lines carry
        the ids an SDK span would have given them."""
        self._metering = not isinstance(meter_provider, metrics.NoOpMeterProvider)
        """False under a no-op meter provider: nothing to record, so the per-result
        attribute dictionaries are not built either."""
        self.instruments = Instruments(meter_provider.get_meter(names.SCOPE), anthropic=anthropic)
        self._cap = CardinalityCap(max_attribute_values)
        self.detector = SustainedDetector(sustained, clock=clock)
        self._detector_lock = threading.Lock()
        self._clock = clock
        self._now = now
        self._last_sweep = clock()
        self._thresholds: Mapping[str, float] = (
            {n: p.alert_threshold for n, p in catalog.profiles.items()} if catalog else {}
        )
        self.providers = providers
        self._requests_log = logging.getLogger(REQUEST_LOGGER)
        self._processing: ContextVar[_Processing | None] = ContextVar(
            f"tokenheap_processing_{id(self)}", default=None
        )

    # -- the Telemetry protocol -----------------------------------------------------------

    def process(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        group: str,
        key: bytes | None,
        headers: KafkaHeaders,
    ) -> AbstractContextManager[SpanLike]:
        """A CONSUMER `process <topic>` span, child of the trace context in `headers`
        (under a no-op tracer, `_carry` itself: one generator a record, not two)."""
        if not self._tracing:
            return self._carry(topic=topic, group=group, headers=headers)
        return self._traced(topic, partition, offset, group, key, headers)

    @contextmanager
    def _traced(
        self,
        topic: str,
        partition: int,
        offset: int,
        group: str,
        key: bytes | None,
        headers: KafkaHeaders,
    ) -> Iterator[SpanLike]:
        parent = propagate.extract(headers, context=Context(), getter=spans.KAFKA_GETTER)
        attrs = spans.process_attributes(
            topic=topic, partition=partition, offset=offset, group=group, key=key
        )
        started = time.perf_counter()
        token = context_api.attach(parent)  # baggage stays current for outgoing_headers()
        tracer_token = _ACTIVE_TRACER.set(self._tracer)
        state: _Processing | None = None
        try:
            with self._tracer.start_as_current_span(
                names.process_span_name(topic),
                kind=SpanKind.CONSUMER,
                attributes=attrs,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                state = _Processing(span)
                state_token = self._processing.set(state)
                try:
                    yield span
                except BaseException as exc:
                    state.error_type = type(exc).__qualname__
                    record_failure(span, exc=exc)
                    raise
                finally:
                    self._processing.reset(state_token)
        finally:
            _ACTIVE_TRACER.reset(tracer_token)
            context_api.detach(token)
            self._process_duration(started, topic, group, state)

    @contextmanager
    def _carry(self, *, topic: str, group: str, headers: KafkaHeaders) -> Iterator[SpanLike]:
        """`process` under a no-op tracer: the extracted context made current, as the no-op
        span would leave it (the same span context, so the same trace ids in the log lines
        and in `outgoing_headers`, baggage included); the duration metric as always."""
        parent = propagate.extract(headers, context=Context(), getter=spans.KAFKA_GETTER)
        started = time.perf_counter()
        span = trace.get_current_span(parent)
        if self._own_ids:
            span = _own_span(span.get_span_context())
            parent = trace.set_span_in_context(span, parent)
        token = context_api.attach(parent)
        state = _Processing(span)
        state_token = self._processing.set(state)
        try:
            yield state.span
        except BaseException as exc:
            state.error_type = type(exc).__qualname__
            raise
        finally:
            self._processing.reset(state_token)
            context_api.detach(token)
            self._process_duration(started, topic, group, state)

    def _process_duration(
        self, started: float, topic: str, group: str, state: _Processing | None
    ) -> None:
        if not self._metering:
            return
        duration: Attrs = {
            names.MESSAGING_SYSTEM: names.MESSAGING_SYSTEM_KAFKA,
            names.MESSAGING_OPERATION_NAME: names.MESSAGING_OPERATION_PROCESS,
            names.MESSAGING_OPERATION_TYPE: names.MESSAGING_OPERATION_PROCESS,
            names.MESSAGING_DESTINATION_NAME: topic,
            names.MESSAGING_CONSUMER_GROUP_NAME: group,
        }
        if state is not None and state.error_type is not None:
            duration[names.ERROR_TYPE] = state.error_type
        self.instruments.process_duration.record(time.perf_counter() - started, duration)

    def on_result(
        self, req: AssemblyRequest | None, result: FitResult, duration_s: float
    ) -> list[AlertMessage]:
        """Record the result on the processing span (or a `fit` span of its own outside
        `process()`), in metrics and in the log; return the alert messages to publish."""
        state = self._processing.get()
        if state is not None:
            if result.error is not None and state.error_type is None:
                state.error_type = result.error.code
            return self._record(state.span, req, result, duration_s)
        start_ns = time.time_ns() - int(duration_s * 1e9)
        with self._tracer.start_as_current_span(names.SPAN_FIT, start_time=start_ns) as span:
            return self._record(span, req, result, duration_s)

    def on_dead_letter(self, *, reason_code: str, topic: str) -> None:
        """Count a dead letter of `topic` (the topic the record was consumed from) and mark
        the processing span failed with `error.type` = reason_code."""
        state = self._processing.get()
        if state is not None:
            state.error_type = reason_code
            spans.enrich_dead_letter(state.span, reason_code=reason_code)
        else:
            spans.enrich_dead_letter(trace.get_current_span(), reason_code=reason_code)
        self.instruments.dead_letters.add(
            1,
            {names.ATTR_DEAD_LETTER_REASON: reason_code, names.MESSAGING_DESTINATION_NAME: topic},
        )

    def outgoing_headers(self) -> list[tuple[str, bytes]]:
        """traceparent/tracestate/baggage of the current context (the send span inside
        `send()`), by the configured propagators (OTEL_PROPAGATORS, W3C by default)."""
        carrier: list[tuple[str, bytes]] = []
        propagate.inject(carrier, setter=spans.KAFKA_SETTER)
        return carrier

    @contextmanager
    def send(self, *, topic: str) -> Iterator[SpanLike]:
        """A PRODUCER `send <topic>` span around one publish."""
        if not self._tracing:  # a no-op span would carry the current context unchanged
            yield trace.get_current_span()
            return
        with self._tracer.start_as_current_span(
            names.send_span_name(topic),
            kind=SpanKind.PRODUCER,
            attributes=spans.send_attributes(topic=topic),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                record_failure(span, exc=exc)
                raise

    def on_kafka_outage_start(self) -> None:
        self.instruments.kafka_outages.add(1)

    def on_kafka_outage_end(self, duration_s: float) -> None:
        self.instruments.kafka_outage_duration.record(duration_s)

    # -- beyond the protocol --------------------------------------------------------------

    @contextmanager
    def stage(self, name: names.Stage, **attributes: AttributeValue) -> Iterator[SpanLike]:
        """`stage()` with this telemetry's tracer."""
        token = _ACTIVE_TRACER.set(self._tracer)
        try:
            with stage(name, **attributes) as span:
                yield span
        finally:
            _ACTIVE_TRACER.reset(token)

    @contextmanager
    def run(self) -> Iterator[SpanLike]:
        """The root span of one `tokenheap fit` invocation; results become its children."""
        token = _ACTIVE_TRACER.set(self._tracer)
        try:
            with self._tracer.start_as_current_span(names.SPAN_RUN, context=Context()) as span:
                yield span
        finally:
            _ACTIVE_TRACER.reset(token)

    def watch_kafka(self, source: KafkaSource) -> None:
        self.instruments.kafka = source

    def on_rebalance(self, *, kind: str, partitions: int) -> None:
        self.instruments.rebalances.add(partitions, {names.ATTR_REBALANCE_KIND: kind})

    def on_commit(self, duration_s: float) -> None:
        self.instruments.commit_duration.record(duration_s)

    def observe_anthropic(self, source: AnthropicSource | None) -> None:
        """Report this Anthropic counter's calls and failures (or a function returning it
        once made, None until then); for when the engine is built after the telemetry."""
        self.instruments.anthropic = source

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.providers.force_flush(timeout_s) if self.providers else True

    def shutdown(self) -> None:
        if self.providers is not None:
            self.providers.shutdown()

    # -- recording --------------------------------------------------------------------------

    def _record(
        self, span: Span, req: AssemblyRequest | None, result: FitResult, duration_s: float
    ) -> list[AlertMessage]:
        spans.enrich_result(span, result=result)
        metering = self._metering
        dims = self._dims(result) if metering else {}
        if metering:
            self._record_metrics(result, dims, duration_s)
        out: list[AlertMessage] = []
        at = self._now()
        for alert in result.alerts:
            spans.add_alert_event(span, alert=alert)
            if metering:
                self.instruments.alerts.add(
                    1,
                    {
                        **dims,
                        names.ATTR_ALERT_KIND: "request",
                        names.ATTR_ALERT_TYPE: alert.type,
                        names.ATTR_ALERT_SEVERITY: alert.severity,
                    },
                )
            out.append(_request_alert(result, alert, at))
        for move in self._sustained(req, result):
            message = self._sustained_alert(move, result, at)
            spans.add_sustained_event(span, alert=message)
            if metering:
                self._record_sustained(move)
            _log.warning(
                "%s %s for %s: %d/%d requests at or over %.2f utilization",
                SUSTAINED_TYPE,
                move.state,
                "/".join(move.key),
                move.over_threshold,
                move.requests,
                move.utilization_threshold,
                extra={"alert": message.model_dump(mode="json", exclude_none=True)},
            )
            out.append(message)
        log_result(self._requests_log, result, duration_s)
        return out

    def _dims(self, result: FitResult) -> Attrs:
        """Bounded metric attributes of a result: provider, model, profile, tenant, pipeline."""
        dims: Attrs = {names.GEN_AI_REQUEST_MODEL: self._cap("model", result.model or "")}
        if result.provider is not None:
            dims[names.GEN_AI_PROVIDER_NAME] = result.provider
        for attr, value in (
            (names.ATTR_PROFILE, result.profile),
            (names.ATTR_TENANT, result.tenant),
            (names.ATTR_PIPELINE, result.pipeline),
        ):
            if value is not None:
                dims[attr] = self._cap(attr, value)
        return dims

    def _record_metrics(self, result: FitResult, dims: Attrs, duration_s: float) -> None:
        inst = self.instruments
        outcome: Attrs = {**dims, names.ATTR_STATUS: result.status}
        if result.error is not None:
            outcome[names.ERROR_TYPE] = result.error.code
        inst.fit_duration.record(duration_s, outcome)
        usage = result.usage
        if usage is not None:
            for slot in names.SLOTS:
                inst.slot_tokens.record(int(getattr(usage, slot)), {**dims, names.ATTR_SLOT: slot})
            inst.input_tokens.record(usage.total_tokens, dims)
            inst.utilization.record(usage.utilization, dims)
            if usage.cost is not None:
                for part, usd in (
                    ("input", usage.cost.input),
                    ("output_worst_case", usage.cost.output_worst_case),
                ):
                    inst.cost.add(usd, {**dims, names.ATTR_COST_PART: part})
        drops: dict[tuple[str, str], int] = {}
        for d in result.dropped:
            drops[(d.slot, d.reason)] = drops.get((d.slot, d.reason), 0) + 1
        for (slot, reason), n in drops.items():
            inst.dropped.add(n, {**dims, names.ATTR_SLOT: slot, names.ATTR_DROP_REASON: reason})
        for outcome_name, n in (("hit", result.cache.hits), ("miss", result.cache.misses)):
            if n:
                inst.cache_lookups.add(n, {**dims, names.ATTR_CACHE_OUTCOME: outcome_name})
        if result.count_audit is not None:
            drift = result.count_audit.drift
            direction = "over" if drift > 0 else ("under" if drift < 0 else "exact")
            inst.claude_drift.record(abs(drift), {**dims, names.ATTR_DRIFT_DIRECTION: direction})

    def _sustained(self, req: AssemblyRequest | None, result: FitResult) -> list[Transition]:
        moves: list[Transition] = []
        with self._detector_lock:
            if result.status == "ok" and result.usage is not None:
                threshold = self._threshold(req, result)
                key = (result.tenant or "", result.pipeline or "", result.model)
                over = result.usage.utilization >= threshold
                move = self.detector.observe(key, over=over, threshold=threshold)
                if move is not None:
                    moves.append(move)
            moves.extend(self._sweep())
        return moves

    def _sweep(self) -> list[Transition]:
        """Age time windows now and then, so a key gone quiet clears (and is forgotten)."""
        seconds = self.detector.config.window_seconds
        now = self._clock()
        if seconds is None or now - self._last_sweep < min(seconds / 4, 30.0):
            return []
        self._last_sweep = now
        return self.detector.expire(now)

    def _threshold(self, req: AssemblyRequest | None, result: FitResult) -> float:
        """The utilization threshold this request was judged by (its alert says it best)."""
        for alert in result.alerts:
            if alert.type == "utilization_high" and alert.threshold is not None:
                return alert.threshold
        if req is not None and req.budget.alert_threshold is not None:
            return req.budget.alert_threshold
        return self._thresholds.get(result.profile or "", DEFAULT_ALERT_THRESHOLD)

    def _sustained_alert(self, move: Transition, result: FitResult, at: datetime) -> AlertMessage:
        cfg = self.detector.config
        tenant, pipeline, model = move.key
        raised = move.state == "raised"
        own = (result.tenant or "", result.pipeline or "", result.model) == move.key
        verb = "reached" if raised else "fell below"
        limit = cfg.share_limit if raised else cfg.clear_below
        return AlertMessage(
            kind="sustained",
            type=SUSTAINED_TYPE,
            state=move.state,
            severity="warning" if raised else "info",
            message=(
                f"{move.over_threshold}/{move.requests} recent requests at or over "
                f"{move.utilization_threshold:.0%} utilization: share {move.share:.0%} {verb} "
                f"{limit:.0%}"
            ),
            request_id=result.request_id if own else None,
            tenant=tenant or None,
            pipeline=pipeline or None,
            model=model,
            value=round(move.share, 4),
            threshold=limit,
            window=WindowStats(
                requests=move.requests,
                over_threshold=move.over_threshold,
                share=round(move.share, 4),
                share_limit=cfg.share_limit,
                clear_below=cfg.clear_below,
                utilization_threshold=move.utilization_threshold,
                window_seconds=cfg.window_seconds,
            ),
            at=at,
        )

    def _record_sustained(self, move: Transition) -> None:
        tenant, pipeline, model = move.key
        dims: Attrs = {names.GEN_AI_REQUEST_MODEL: self._cap("model", model)}
        if tenant:
            dims[names.ATTR_TENANT] = self._cap(names.ATTR_TENANT, tenant)
        if pipeline:
            dims[names.ATTR_PIPELINE] = self._cap(names.ATTR_PIPELINE, pipeline)
        self.instruments.alerts.add(
            1,
            {
                **dims,
                names.ATTR_ALERT_KIND: "sustained",
                names.ATTR_ALERT_TYPE: SUSTAINED_TYPE,
                names.ATTR_ALERT_STATE: move.state,
            },
        )
        self.instruments.sustained_active.add(1 if move.state == "raised" else -1, dims)


def _request_alert(result: FitResult, alert: Alert, at: datetime) -> AlertMessage:
    return AlertMessage(
        kind="request",
        type=alert.type,
        severity=alert.severity,
        message=alert.message,
        request_id=result.request_id,
        tenant=result.tenant,
        pipeline=result.pipeline,
        model=result.model,
        value=alert.value,
        threshold=alert.threshold,
        at=at,
    )


def build_telemetry(
    *,
    service_name: str = DEFAULT_SERVICE_NAME,
    catalog: Catalog | None = None,
    anthropic: AnthropicSource | None = None,
    sustained: SustainedConfig | None = None,
    max_attribute_values: int = 100,
    set_global: bool = True,
    providers: TelemetryProviders | None = None,
    process_index: int | None = None,
) -> OtelTelemetry:
    """The process's telemetry: providers from the OTEL_* environment (unless given).

    `catalog` gives profile alert thresholds; `anthropic` the count-call counters: the
    AnthropicCounter, or a function returning it once the engine has made it (both
    optional). Call `.shutdown()` once at exit: it flushes spans and a last metric export.
    `process_index`: this is that child of `TOKENHEAP_PROCESSES` (its own service instance).
    """
    if providers is None:
        providers = setup_telemetry(
            service_name=service_name, set_global=set_global, process_index=process_index
        )
    return OtelTelemetry(
        tracer_provider=providers.tracer_provider,
        meter_provider=providers.meter_provider,
        catalog=catalog,
        anthropic=anthropic,
        sustained=sustained,
        max_attribute_values=max_attribute_values,
        providers=providers,
    )
