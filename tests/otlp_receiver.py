"""A real OTLP/HTTP receiver on loopback, for tests: services export their spans and
metrics to it (``OTEL_EXPORTER_OTLP_ENDPOINT``) exactly as they would to a collector.

It decodes ``ExportTraceServiceRequest`` (``/v1/traces``) with opentelemetry-proto into
:class:`ReceivedSpan` records, keeps ``/v1/metrics`` requests' metric names, and keeps
every request body as received (decompressed), so a test can search all exported bytes
for a secret. Runs in a thread of the test process (``with OtlpReceiver() as receiver``).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

# Largest request body accepted (the SDK's batches are far below this).
REQUEST_BYTES_MAX = 64 * 1024 * 1024
# OTLP span kinds (opentelemetry.proto.trace.v1.Span.SpanKind).
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_ERROR = 2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    # (name, attributes) of each span event.
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # (trace id, span id) of each link.
    links: list[tuple[str, str]] = field(default_factory=list)
    error: bool = False
    status_message: str = ""


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    found: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in span.events],
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        error=span.status.code == STATUS_ERROR,
                        status_message=span.status.message,
                    )
                )
    return found


def decode_metric_names(body: bytes) -> set[tuple[str, str]]:
    """(service, metric name) of every metric in an export request."""
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    names: set[tuple[str, str]] = set()
    for resource_metrics in request.resource_metrics:
        service = str(_attributes(resource_metrics.resource.attributes).get("service.name", ""))
        for scope_metrics in resource_metrics.scope_metrics:
            names.update((service, metric.name) for metric in scope_metrics.metrics)
    return names


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) receiver on 127.0.0.1; ``endpoint`` is its base URL."""

    def __init__(self, port: int = 0, *, keep: bool = True) -> None:
        # keep=False: count spans only (a long-running sink must not grow).
        self._keep = keep
        self.span_count = 0
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._metric_names: set[tuple[str, str]] = set()
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                if not 0 <= length <= REQUEST_BYTES_MAX:
                    self.send_error(413)
                    return
                body = _decompressed(self.rfile.read(length), self.headers.get("content-encoding"))
                if self.path == "/v1/traces":
                    receiver._received_spans(body)
                    answer = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._received_metrics(body)
                    answer = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received_spans(self, body: bytes) -> None:
        spans = decode_spans(body)
        with self._lock:
            self.span_count += len(spans)
            if self._keep:
                self.bodies.append(body)
                self._spans.extend(spans)

    def _received_metrics(self, body: bytes) -> None:
        names = decode_metric_names(body)
        with self._lock:
            if self._keep:
                self.bodies.append(body)
            self._metric_names.update(names)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metric_names(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._metric_names)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 20.0
    ) -> list[ReceivedSpan]:
        """The spans received once ``predicate`` holds for them; AssertionError on timeout."""
        give_up_at = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > give_up_at:
                names = sorted({(span.service, span.name) for span in spans})
                raise AssertionError(f"spans not received in {timeout_s} s; have {names}")
            time.sleep(0.05)


def _decompressed(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def trace_of(spans: list[ReceivedSpan], trace_id: str) -> Iterator[ReceivedSpan]:
    return (span for span in spans if span.trace_id == trace_id)


def main() -> None:
    """``python -m tests.otlp_receiver --port 4318``: a local OTLP sink (for a benchmark
    with tracing on, without a collector); prints how many spans it has every 5 s."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=4318)
    port = parser.parse_args().port
    with OtlpReceiver(port, keep=False) as receiver:
        print(f"OTLP/HTTP receiver on {receiver.endpoint}", flush=True)
        try:
            while True:
                time.sleep(5)
                print(f"{receiver.span_count} spans received", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
