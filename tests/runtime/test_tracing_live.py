"""Tracing through real data plane processes: ``traceparent`` across two sidecars, the trace id
in access logs."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import (
    Plane,
    ProxyClient,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
)
from runtime_harness import write_bundle as write

from runtime.bundle import LoggingBackend, MeshBundle, Rule, TracingBackend, TrafficLogConf
from runtime.tracing import parse

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def _chain(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, mesh: MeshBundle | None = None
) -> tuple[Any, Plane, Path]:
    """magnanimo's sidecar (outbound, access log) -> benigno's sidecar (inbound) -> the app."""
    app = upstream("benigno-v1")
    log = tmp_path / "access.log"
    conf = TrafficLogConf(backend=LoggingBackend(name="file", type="file", path=str(log)))
    base = mesh_bundle(
        destinations={
            "benigno": simple_destination("benigno", traffic_log=(Rule[TrafficLogConf](conf=conf),))
        }
    )
    mesh = mesh or base
    mesh = mesh.model_copy(update={"destinations": base.destinations})
    inbound = plane(
        "--service", "benigno", "--tag", "version=v1", "--app", app.address,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", tmp_path / "benigno-state",
        "--mesh-bundle", write(tmp_path, mesh), "--bundle", write(tmp_path, service_bundle("benigno")),
    )  # fmt: skip
    eps = tmp_path / "eps.json"
    assert inbound.inbound is not None
    eps.write_text(
        endpoint_set(
            1, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
        ).model_dump_json()
    )
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write(tmp_path, mesh), "--bundle", write(tmp_path, service_bundle("magnanimo")),
        "--endpoints", eps,
    )  # fmt: skip
    return app, outbound, log


def test_a_request_without_traceparent_gets_one_the_app_sees(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app, outbound, log = _chain(plane, upstream, tmp_path)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    assert client.get("http://benigno:5000/a")[0] == 200
    assert client.get("http://benigno:5000/b", {"traceparent": "00-not-valid-01"})[0] == 200
    seen = [parse(h.get("traceparent")) for h in app.seen_headers]
    assert None not in seen, app.seen_headers
    (t1, _, s1), (t2, _, s2) = seen  # type: ignore[misc]
    assert t1 != t2 and not s1 and not s2  # new traces; no tracing backend: not sampled
    lines = wait_until(
        lambda: log.exists() and len(log.read_text().splitlines()) >= 2 and log.read_text(), "2 lines"
    )
    assert [json.loads(x)["trace_id"] for x in lines.splitlines()] == [t1, t2]


def test_a_request_keeps_its_own_trace_id_across_two_sidecars(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app, outbound, log = _chain(plane, upstream, tmp_path)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    status, _, _ = client.get(
        "http://benigno:5000/a", {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=1"}
    )
    assert status == 200
    headers = app.seen_headers[-1]
    got = parse(headers.get("traceparent"))
    assert got is not None and got[0] == TRACE and got[2]
    assert got[1] != SPAN  # each sidecar's hop is a span of its own
    assert headers["tracestate"] == "vendor=1"
    line = wait_until(lambda: log.exists() and log.read_text().strip(), "an access log line")
    assert json.loads(line.splitlines()[0])["trace_id"] == TRACE


class Collector:
    """A Zipkin collector: keeps the spans of every ``POST /api/v2/spans``."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.path == "/api/v2/spans" and self.headers.get("Content-Type") == "application/json"
                if ok:
                    with collector.lock:
                        collector.spans.extend(json.loads(data))
                self.send_response(202 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/spans"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["traceId"] == trace_id]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()
    c.server.server_close()


def test_spans_of_both_sidecars_reach_the_zipkin_collector(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, collector: Collector
) -> None:
    mesh = mesh_bundle().model_copy(update={"tracing": TracingBackend(name="zipkin", url=collector.url)})
    app, outbound, _ = _chain(plane, upstream, tmp_path, mesh)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    assert client.get("http://benigno:5000/traced")[0] == 200
    got = parse(app.seen_headers[-1].get("traceparent"))
    assert got is not None and got[2]  # sampling 100%: sampled
    trace_id, app_parent, _ = got
    spans = wait_until(lambda: len(collector.of(trace_id)) >= 2 and collector.of(trace_id), "two spans")
    by_kind = {s["kind"]: s for s in spans}
    client_span, server_span = by_kind["CLIENT"], by_kind["SERVER"]
    assert client_span["localEndpoint"]["serviceName"] == "magnanimo" and "parentId" not in client_span
    assert server_span["localEndpoint"]["serviceName"] == "benigno"
    assert server_span["parentId"] == client_span["id"]  # the inbound hop is the outbound's child
    assert server_span["id"] == app_parent  # and the app's caller
    assert server_span["tags"]["http.status_code"] == "200" and server_span["tags"]["http.path"] == "/traced"
    assert server_span["duration"] >= 1 and server_span["timestamp"] > 0


def test_a_dead_collector_loses_no_request(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api/v2/spans"
    mesh = mesh_bundle().model_copy(update={"tracing": TracingBackend(name="zipkin", url=dead)})
    _app, outbound, _ = _chain(plane, upstream, tmp_path, mesh)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    assert [client.get(f"http://benigno:5000/{i}")[0] for i in range(30)] == [200] * 30
    wait_until(
        lambda: metric_value(outbound.metrics(), "meshc_tracing_spans_failed_total") >= 1, "a failed send"
    )
