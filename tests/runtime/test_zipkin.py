"""The span reporter against a real HTTP collector: bounded, never blocking, drops counted."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from runtime_harness import HANG_DEADLINE, wait_until

from runtime.tracing import hop
from runtime.zipkin import SpanReporter


class StuckCollector:
    """Accepts every POST, but answers only once ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                docs = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                collector.entered.set()
                collector.release.wait(HANG_DEADLINE)
                collector.spans.extend(docs)
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/spans"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stuck() -> Iterator[StuckCollector]:
    c = StuckCollector()
    yield c
    c.release.set()
    c.server.shutdown()
    c.server.server_close()


def test_a_stuck_collector_fills_the_queue_and_spans_are_dropped_not_waited_for(
    stuck: StuckCollector,
) -> None:
    registry = CollectorRegistry()
    reporter = SpanReporter(registry, cap=2, timeout_s=HANG_DEADLINE)
    rng = random.Random(3)

    def record(path: str) -> None:
        reporter.record(
            stuck.url,
            hop(None, 100.0, rng),
            service="magnanimo",
            direction="outbound",
            start_s=1.0,
            duration_s=0.001,
            method="GET",
            path=path,
            status=200,
        )

    record("/first")
    wait_until(stuck.entered.is_set, "the first batch to reach the collector")
    for i in range(5):  # the sender is stuck: two wait in the queue, three are dropped at once
        record(f"/{i}")
    assert registry.get_sample_value("meshc_tracing_spans_dropped_total") == 3
    stuck.release.set()
    wait_until(lambda: registry.get_sample_value("meshc_tracing_spans_sent_total") == 3, "the rest sent")
    assert [s["tags"]["http.path"] for s in stuck.spans] == ["/first", "/0", "/1"]
    assert all(s["kind"] == "CLIENT" and len(s["traceId"]) == 32 for s in stuck.spans)


def test_unsampled_spans_and_a_mesh_without_backend_send_nothing() -> None:
    registry = CollectorRegistry()
    reporter = SpanReporter(registry, cap=1)
    rng = random.Random(4)
    kw: dict[str, Any] = {"service": "s", "direction": "inbound", "start_s": 1.0, "duration_s": 0.0}
    reporter.record("http://127.0.0.1:9/x", hop(None, 0.0, rng), method="GET", path="/", status=200, **kw)
    reporter.record(None, hop(None, 100.0, rng), method="GET", path="/", status=200, **kw)
    reporter.record("http://127.0.0.1:9/x", None, method="GET", path="/", status=200, **kw)
    assert reporter._thread is None  # nothing was queued, so no sender was started
