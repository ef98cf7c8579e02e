"""A local OTLP receiver for tests: spans and metrics decoded from real exporter traffic.

`OtlpHttpReceiver` is a stdlib `http.server` on 127.0.0.1:0 answering POST /v1/traces and
/v1/metrics (protobuf, optionally gzip) the way a collector does; `OtlpGrpcReceiver` serves
the same two services over gRPC. Both decode with opentelemetry-proto into plain records:

    with OtlpHttpReceiver() as rx:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ...
        rx.wait_for(lambda r: any(s.name == "process t" for s in r.spans))
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class SpanEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRecord:
    name: str
    kind: str
    trace_id: str
    """32 lowercase hex digits."""
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    events: list[SpanEvent]
    status: str
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class Point:
    attributes: dict[str, Any]
    value: float | None = None
    """Sum and gauge points."""
    count: int | None = None
    """Histogram points."""
    sum: float | None = None
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class MetricRecord:
    name: str
    unit: str
    kind: str
    """histogram, sum or gauge."""
    points: list[Point]
    resource: dict[str, Any]
    scope: str
    monotonic: bool | None = None


def any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode_spans(body: bytes) -> list[SpanRecord]:
    req = trace_pb.ExportTraceServiceRequest()
    req.ParseFromString(body)
    out: list[SpanRecord] = []
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanRecord(
                        name=s.name,
                        kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        attributes=attributes(s.attributes),
                        events=[SpanEvent(e.name, attributes(e.attributes)) for e in s.events],
                        status=STATUS_CODES.get(s.status.code, str(s.status.code)),
                        resource=resource,
                        scope=ss.scope.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    )
                )
    return out


def decode_metrics(body: bytes) -> list[MetricRecord]:
    req = metrics_pb.ExportMetricsServiceRequest()
    req.ParseFromString(body)
    out: list[MetricRecord] = []
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.append(_metric(m, resource, sm.scope.name))
    return out


def _metric(m: metrics_pb2.Metric, resource: dict[str, Any], scope: str) -> MetricRecord:
    which = m.WhichOneof("data")
    if which == "histogram":
        points = [
            Point(
                attributes(p.attributes),
                count=p.count,
                sum=p.sum,
                bucket_counts=list(p.bucket_counts),
                explicit_bounds=list(p.explicit_bounds),
            )
            for p in m.histogram.data_points
        ]
        return MetricRecord(m.name, m.unit, "histogram", points, resource, scope)
    if which in ("sum", "gauge"):
        data = m.sum if which == "sum" else m.gauge
        points = [
            Point(
                attributes(p.attributes),
                value=p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
            )
            for p in data.data_points
        ]
        monotonic = m.sum.is_monotonic if which == "sum" else None
        return MetricRecord(m.name, m.unit, which, points, resource, scope, monotonic)
    return MetricRecord(m.name, m.unit, str(which), [], resource, scope)


class _Store:
    """What arrived, behind a condition so tests can wait for it."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.metrics: list[MetricRecord] = []
        """Every metric export in arrival order (cumulative exports repeat points)."""
        self.requests: list[str] = []
        self._cond = threading.Condition()

    def add(self, path: str, body: bytes) -> None:
        with self._cond:
            self.requests.append(path)
            if path == "/v1/traces":
                self.spans.extend(decode_spans(body))
            elif path == "/v1/metrics":
                self.metrics.extend(decode_metrics(body))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Any], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: condition not met in {timeout_s}s "
                        f"({len(self.spans)} spans, {len(self.metrics)} metric records)"
                    )
                self._cond.wait(min(left, 0.2))

    def latest(self, name: str) -> MetricRecord | None:
        """The last export of metric `name` (cumulative: it holds the totals)."""
        with self._cond:
            found = [m for m in self.metrics if m.name == name]
        return found[-1] if found else None

    def spans_named(self, name: str) -> list[SpanRecord]:
        with self._cond:
            return [s for s in self.spans if s.name == name]


class OtlpHttpReceiver(_Store):
    """OTLP/HTTP protobuf on 127.0.0.1:<free port>; `endpoint` is the base URL."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path not in ("/v1/traces", "/v1/metrics", "/v1/logs"):
                    self.send_error(404)
                    return
                store.add(self.path, body)
                reply = (
                    trace_pb.ExportTraceServiceResponse()
                    if self.path == "/v1/traces"
                    else metrics_pb.ExportMetricsServiceResponse()
                ).SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class OtlpGrpcReceiver(_Store):
    """OTLP/gRPC TraceService and MetricsService on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        super().__init__()
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        store = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                store.add("/v1/traces", request.SerializeToString())
                return trace_pb.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                store.add("/v1/metrics", request.SerializeToString())
                return metrics_pb.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self._port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)
