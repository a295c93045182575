"""Sampled spans sent to the tracing backend: Zipkin v2 JSON (``POST /api/v2/spans``) or OTLP/HTTP
JSON (``POST /v1/traces``, a MeshTrace's OpenTelemetry backend).

Every request a data plane handles gets its span, whether it was forwarded or answered by the
data plane itself (403, 429, 503, 504, a fault's abort: tagged ``error``). Forwarding never
waits for tracing: ``record`` puts a span in a bounded queue (full: the span
is dropped and counted in ``meshc_tracing_spans_dropped``) and returns; one daemon thread sends
batches (``runtime.otlp.Batcher``), so a slow or dead collector costs it nothing but the spans it
loses. A span carries the MeshTrace ``tags`` its hop resolved (``Hop.tags``) besides the HTTP ones.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from runtime import otlp
from runtime.bundle import TracingBackend
from runtime.otlp import POST_TIMEOUT_S, QUEUE_CAP
from runtime.tracing import Hop

__all__ = ["QUEUE_CAP", "SpanReporter"]

_Key = tuple[str, str, str]
"""(kind ``zipkin`` / ``otel``, url, service): the spans posted together."""


class SpanReporter:
    def __init__(
        self, registry: CollectorRegistry, cap: int = QUEUE_CAP, timeout_s: float = POST_TIMEOUT_S
    ) -> None:
        self._timeout_s = timeout_s
        self.dropped = Counter(
            "meshc_tracing_spans_dropped",
            "Spans dropped: the queue to the collector was full.",
            registry=registry,
        )
        self.sent = Counter("meshc_tracing_spans_sent", "Spans the collector accepted.", registry=registry)
        self.failed = Counter(
            "meshc_tracing_spans_failed",
            "Spans lost to a collector that failed or did not answer.",
            registry=registry,
        )
        self._batcher: otlp.Batcher[_Key] = otlp.Batcher(
            "spans", self._post, lambda _key: self.dropped.inc(), cap
        )

    @property
    def _thread(self) -> object | None:
        return True if self._batcher.started else None

    def record(
        self,
        backend: TracingBackend | str | None,
        span: Hop | None,
        *,
        service: str,
        direction: str,
        start_s: float,
        duration_s: float,
        method: str,
        path: str,
        status: int,
        grpc_status: int | None = None,
    ) -> None:
        """Queue one finished hop's span for ``backend`` (the tracing backend, or a Zipkin URL;
        None: no tracing), if it is sampled. An outbound hop is a ``CLIENT`` span, inbound and
        gateway ones ``SERVER``.
        As Envoy does, a 5xx or a gRPC status other than OK is tagged ``error``; so is any
        answer the data plane made itself
        with an error status (a denial, a rate limit, a fault's abort: ``span.reason``, also
        tagged ``meshc.reason``), which Envoy tells apart only by its ``response_flags``."""
        if backend is None or span is None or not span.sampled:
            return
        kind, url = ("zipkin", backend) if isinstance(backend, str) else (backend.type, backend.url)
        tags = {"http.method": method, "http.path": path, "http.status_code": str(status)}
        if grpc_status is not None:
            tags["grpc.status_code"] = str(grpc_status)
        error = status >= 500 or grpc_status not in (None, 0) or (span.reason and status >= 400)
        if error:
            tags["error"] = "true"
        if span.reason:
            tags["meshc.reason"] = span.reason[:200]
        tags.update(span.tags)
        name = f"{method.lower()} {path}"[:200]
        client = direction == "outbound"
        if kind == "otel":
            doc: dict[str, Any] = {
                "traceId": f"{span.trace_id:0>32}",
                "spanId": span.span_id,
                "name": name,
                "kind": 3 if client else 2,
                "startTimeUnixNano": str(int(start_s * 1e9)),
                "endTimeUnixNano": str(int((start_s + duration_s) * 1e9)),
                "attributes": otlp.attributes(tags.items()),
                "status": {"code": 2} if error else {},
            }
            if span.parent_id:
                doc["parentSpanId"] = span.parent_id
        else:
            doc = {
                "traceId": span.trace_id,
                "id": span.span_id,
                "name": name,
                "kind": "CLIENT" if client else "SERVER",
                "timestamp": int(start_s * 1e6),
                "duration": max(int(duration_s * 1e6), 1),
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            }
            if span.parent_id:
                doc["parentId"] = span.parent_id
            if span.debug:
                doc["debug"] = True
        self._batcher.put((kind, url, service), doc)

    def _post(self, key: _Key, docs: list[dict[str, Any]]) -> None:
        kind, url, service = key
        body = otlp.traces_body(service, "", docs) if kind == "otel" else docs
        ok = otlp.post_json(url, body, self._timeout_s)
        (self.sent if ok else self.failed).inc(len(docs))
