"""Tracer and meter providers from the standard `OTEL_*` environment; flush and shutdown.

Read here (the rest by the SDK and exporters themselves, as documented upstream):

    OTEL_SDK_DISABLED=true           no-op providers: nothing is recorded or exported
    OTEL_SERVICE_NAME                service.name (default `tokenheap`)
    OTEL_RESOURCE_ATTRIBUTES         k=v,k=v merged into the resource
    OTEL_TRACES_EXPORTER             otlp | console | none (comma list)
    OTEL_METRICS_EXPORTER            otlp | console | none (comma list)
    OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_PROTOCOL   grpc | http/protobuf (default)
    OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_ENDPOINT   collector address
    OTEL_TRACES_SAMPLER[_ARG]        e.g. parentbased_traceidratio, 0.1
    OTEL_METRIC_EXPORT_INTERVAL, OTEL_BSP_*         export pacing

One deliberate difference from the spec: with no exporter variable set, `otlp` is used only
when an OTLP endpoint is configured, so `tokenheap fit` on a laptop does not wait on a
collector that is not there. A signal with no exporter is not recorded at all (the API's
no-op provider), so a worker that exports nothing pays next to nothing for it. Console
output goes to stderr: stdout carries fit results.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    Resource,
)
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from worker.errors import ConfigError

Signal = Literal["traces", "metrics"]
DEFAULT_SERVICE_NAME = "tokenheap"
KNOWN_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
_EXPORTERS = frozenset({"otlp", "console", "none"})
_PROTOCOLS = frozenset({"grpc", "http/protobuf"})


@dataclass(slots=True)
class TelemetryProviders:
    """What `setup_telemetry` built: the providers to instrument with, and their lifecycle."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    enabled: bool
    """False when both providers are no-ops: OTEL_SDK_DISABLED=true, or no exporter (nor
    reader) for either signal. One signal alone can be a no-op when only the other has one."""
    exporters: tuple[str, ...] = ()
    """Human summary, e.g. ("traces:otlp/http/protobuf", "metrics:console")."""
    own_ids: bool = False
    """Traces are not recorded only because nothing would export them (not OTEL_SDK_DISABLED):
    each processed record still gets a span id of its own (and a trace, if it came without
    one) on its outgoing messages and log lines, as an SDK span would have given it."""
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is buffered now (spans, then a metric collection); True if all went."""
        if not self.enabled or self._closed:
            return True
        millis = int(timeout_s * 1000)
        ok = True
        if isinstance(self.tracer_provider, TracerProvider):
            ok = self.tracer_provider.force_flush(millis) and ok
        if isinstance(self.meter_provider, MeterProvider):
            ok = self.meter_provider.force_flush(millis) and ok
        return ok

    def shutdown(self) -> None:
        """Flush and stop exporters; safe to call more than once (and at exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()


def setup_telemetry(
    *,
    service_name: str = DEFAULT_SERVICE_NAME,
    set_global: bool = False,
    shutdown_on_exit: bool = True,
    span_exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
    process_index: int | None = None,
) -> TelemetryProviders:
    """Providers configured from the environment.

    `span_exporters` / `metric_readers` are added to whatever the environment selects (tests
    pass in-memory ones). `set_global` also installs them as the process-wide providers, for
    libraries that instrument themselves; do it once per process (the worker, the CLI).
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TelemetryProviders(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), False)
    _check_sampler(env)
    summary: list[str] = []
    processors = [*_span_processors(env, summary), *map(SimpleSpanProcessor, span_exporters)]
    readers = [*_metric_readers(env, summary), *metric_readers]
    # A signal nothing would receive gets the API's no-op provider, not an SDK one that
    # records into the void: spans and metric points with no exporter cost the worker
    # 1.4-1.7x its CPU per request (measured, kafka_bench's requests). Untraced records
    # still get span ids of their own (`own_ids`, OtelTelemetry's no-op path).
    recorded = bool(processors or readers)
    resource = build_resource(service_name, process_index) if recorded else None
    tracer_provider: trace.TracerProvider = trace.NoOpTracerProvider()
    if processors:
        sdk_tracer = TracerProvider(resource=resource, shutdown_on_exit=False)
        for processor in processors:
            sdk_tracer.add_span_processor(processor)
        tracer_provider = sdk_tracer
    meter_provider: metrics.MeterProvider = metrics.NoOpMeterProvider()
    if readers:
        meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
    providers = TelemetryProviders(
        tracer_provider, meter_provider, recorded, tuple(summary), own_ids=not processors
    )
    if set_global:  # a no-op one is what the API already gives libraries
        if processors:
            trace.set_tracer_provider(tracer_provider)
        if readers:
            metrics.set_meter_provider(meter_provider)
    if shutdown_on_exit:
        atexit.register(providers.shutdown)
    return providers


def build_resource(
    service_name: str = DEFAULT_SERVICE_NAME, process_index: int | None = None
) -> Resource:
    """`service.name`/`service.version` defaults under what OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES say (those win).

    A child of `TOKENHEAP_PROCESSES` (`process_index`) is a service instance of its own:
    its siblings share the pod and so every attribute a collector would add, and N
    processes exporting cumulative counters under one identity would overwrite each
    other's series. An id given in OTEL_RESOURCE_ATTRIBUTES gets the child's number
    (`<id>-<index>`); none given, the SDK's own (a UUID per process) stands, or a UUID of
    ours from an SDK that makes none."""
    detected = Resource.create()
    attrs = dict(detected.attributes)
    if str(attrs.get(SERVICE_NAME, "")).startswith("unknown_service"):
        del attrs[SERVICE_NAME]
    if process_index is not None:
        given = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        if SERVICE_INSTANCE_ID in given and attrs.get(SERVICE_INSTANCE_ID):
            attrs[SERVICE_INSTANCE_ID] = f"{attrs[SERVICE_INSTANCE_ID]}-{process_index}"
        elif not attrs.get(SERVICE_INSTANCE_ID):
            attrs[SERVICE_INSTANCE_ID] = str(uuid.uuid4())
    defaults = Resource({SERVICE_NAME: service_name, SERVICE_VERSION: _version()})
    return defaults.merge(Resource(attrs, detected.schema_url))


def exporter_names(env: Mapping[str, str], signal: Signal) -> list[str]:
    """`OTEL_<SIGNAL>_EXPORTER` as a list; unset means otlp if an endpoint is set, else none."""
    raw = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip()
    if not raw:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        return ["otlp"] if any(env.get(v) for v in endpoints) else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_{signal.upper()}_EXPORTER={raw!r}: tokenheap ships otlp, console and none; "
            f"route {', '.join(unknown)} through an OpenTelemetry Collector instead"
        )
    return [n for n in names if n != "none"]


def otlp_protocol(env: Mapping[str, str], signal: Signal) -> str:
    """The signal's OTLP protocol: its own variable, else the general one, else http/protobuf."""
    raw = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if raw not in _PROTOCOLS:
        raise ConfigError(
            f"OTLP protocol {raw!r} for {signal} is not supported: use grpc or http/protobuf"
        )
    return raw


def _check_sampler(env: Mapping[str, str]) -> None:
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name and name not in KNOWN_SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER={name!r} is unknown: use one of "
            f"{', '.join(sorted(KNOWN_SAMPLERS))}"
        )


def _span_processors(env: Mapping[str, str], summary: list[str]) -> list[SpanProcessor]:
    out: list[SpanProcessor] = []
    for name in exporter_names(env, "traces"):
        if name == "console":
            out.append(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            summary.append("traces:console")
        else:
            protocol = otlp_protocol(env, "traces")
            out.append(BatchSpanProcessor(_otlp_span_exporter(protocol)))
            summary.append(f"traces:otlp/{protocol}")
    return out


def _metric_readers(env: Mapping[str, str], summary: list[str]) -> list[MetricReader]:
    out: list[MetricReader] = []
    for name in exporter_names(env, "metrics"):
        exporter: MetricExporter
        if name == "console":
            exporter = ConsoleMetricExporter(out=sys.stderr)
            summary.append("metrics:console")
        else:
            protocol = otlp_protocol(env, "metrics")
            exporter = _otlp_metric_exporter(protocol)
            summary.append(f"metrics:otlp/{protocol}")
        out.append(PeriodicExportingMetricReader(exporter))
    return out


def _otlp_span_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _otlp_metric_exporter(protocol: str) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def _version() -> str:
    try:
        return version("tokenheap")
    except PackageNotFoundError:
        return "0+unknown"
