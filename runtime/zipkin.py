"""Sampled spans sent to the Mesh's Zipkin backend (v2 JSON, ``POST /api/v2/spans``).

Every request a data plane handles gets its span, whether it was forwarded or answered by the
data plane itself (403, 429, 503, 504, a fault's abort: tagged ``error``). Forwarding never
waits for tracing: ``record`` puts a span in a bounded queue (full: the span
is dropped and counted in ``meshc_tracing_spans_dropped``) and returns; one daemon thread sends
batches, so a slow or dead collector costs it nothing but the spans it loses.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from runtime.tracing import Hop

__all__ = ["QUEUE_CAP", "SpanReporter"]

QUEUE_CAP = 10_000
BATCH = 500
FLUSH_S = 0.2
POST_TIMEOUT_S = 2.0


class SpanReporter:
    def __init__(
        self, registry: CollectorRegistry, cap: int = QUEUE_CAP, timeout_s: float = POST_TIMEOUT_S
    ) -> None:
        self._timeout_s = timeout_s
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(cap)
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
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(
        self,
        url: str | None,
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
        """Queue one finished hop's span for ``url`` (the tracing backend; None: no tracing), if
        it is sampled. An outbound hop is Zipkin's ``CLIENT``, inbound and gateway ones ``SERVER``.
        As Envoy does, a 5xx or a gRPC status other than OK is tagged ``error``; so is any
        answer the data plane made itself
        with an error status (a denial, a rate limit, a fault's abort: ``span.reason``, also
        tagged ``meshc.reason``), which Envoy tells apart only by its ``response_flags``."""
        if url is None or span is None or not span.sampled:
            return
        kind = "CLIENT" if direction == "outbound" else "SERVER"
        doc: dict[str, Any] = {
            "traceId": span.trace_id,
            "id": span.span_id,
            "name": f"{method.lower()} {path}"[:200],
            "kind": kind,
            "timestamp": int(start_s * 1e6),
            "duration": max(int(duration_s * 1e6), 1),
            "localEndpoint": {"serviceName": service},
            "tags": {"http.method": method, "http.path": path, "http.status_code": str(status)},
        }
        if span.parent_id:
            doc["parentId"] = span.parent_id
        if grpc_status is not None:
            doc["tags"]["grpc.status_code"] = str(grpc_status)
        if status >= 500 or grpc_status not in (None, 0) or (span.reason and status >= 400):
            doc["tags"]["error"] = "true"
        if span.reason:
            doc["tags"]["meshc.reason"] = span.reason[:200]
        if span.debug:
            doc["debug"] = True
        try:
            self._queue.put_nowait((url, doc))
        except queue.Full:
            self.dropped.inc()
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="zipkin", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            end = time.monotonic() + FLUSH_S
            while len(batch) < BATCH:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            by_url: dict[str, list[dict[str, Any]]] = {}
            for url, doc in batch:
                by_url.setdefault(url, []).append(doc)
            for url, docs in by_url.items():
                self._post(url, docs)

    def _post(self, url: str, docs: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            url, data=json.dumps(docs).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout_s) as resp:
                ok = 200 <= resp.status < 300
        except (OSError, ValueError):
            ok = False
        (self.sent if ok else self.failed).inc(len(docs))
