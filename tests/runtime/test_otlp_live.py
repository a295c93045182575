"""MeshAccessLog and MeshTrace backends through real data plane processes: a policy repo compiled
by meshc, its bundles run by real sidecars, an in-test OTLP/HTTP collector (aiohttp) and a TCP log
collector on 127.0.0.1. Access log records (OpenTelemetry, Tcp, File in Json) and spans (OTLP) of
real requests over HTTP/1.1 and HTTP/2 arrive with the configured attributes; a dead collector
neither fails nor holds up a request, and what it loses is counted."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from runtime_harness import HANG_DEADLINE, Plane, ProxyClient, metric_value, wait_until
from test_h2 import _curl
from test_meshtrace_live import SERVICES, _chain, _mesh

from runtime.tracing import parse


def _attrs(kvs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """OTLP ``KeyValue`` list -> {key: plain value}."""
    out: dict[str, Any] = {}
    for kv in kvs or ():
        v = kv["value"]
        out[kv["key"]] = next(iter(v.values())) if v else None
    return out


class OtlpCollector:
    """An OTLP/HTTP JSON receiver (``POST /v1/logs``, ``POST /v1/traces``) on its own loop."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/logs", self._logs)
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.endpoint = f"127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _body(self, request: web.Request) -> Any:
        assert request.content_type == "application/json", request.content_type
        return json.loads(await request.read())

    async def _logs(self, request: web.Request) -> web.Response:
        doc = await self._body(request)
        with self.lock:
            for rl in doc["resourceLogs"]:
                resource = _attrs(rl["resource"]["attributes"])
                for sl in rl["scopeLogs"]:
                    self.logs.extend({**r, "_resource": resource} for r in sl["logRecords"])
        return web.json_response({})

    async def _traces(self, request: web.Request) -> web.Response:
        doc = await self._body(request)
        with self.lock:
            for rs in doc["resourceSpans"]:
                resource = _attrs(rs["resource"]["attributes"])
                for ss in rs["scopeSpans"]:
                    self.spans.extend({**s, "_resource": resource} for s in ss["spans"])
        return web.json_response({})

    def logs_of(self, service: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.logs if r["_resource"]["service.name"] == service]

    def spans_of(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["traceId"] == trace_id]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(HANG_DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG_DEADLINE)
        self.loop.close()


class TcpCollector:
    """Keeps the lines every connection sends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.data = b""
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                with self.lock:
                    self.data += chunk

    def lines(self) -> list[str]:
        with self.lock:
            return self.data.decode().splitlines()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def otlp() -> Iterator[OtlpCollector]:
    c = OtlpCollector()
    yield c
    c.close()


@pytest.fixture
def tcp() -> Iterator[TcpCollector]:
    c = TcpCollector()
    yield c
    c.close()


def _policies(otel: str, tcp: str, log: Path) -> str:
    """Every data plane: outbound logs to OTLP, Tcp (Plain) and a File (Json); benigno's inbound
    to OTLP; spans to OTLP with a literal and a header tag."""
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: MeshAccessLog
metadata: {{name: out, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {{kind: Mesh}}
  to:
    - targetRef: {{kind: Mesh}}
      default:
        backends:
          - type: OpenTelemetry
            openTelemetry:
              endpoint: '{otel}'
              body: {{kvlistValue: {{values: [{{key: mesh, value: {{stringValue: '%KUMA_MESH%'}}}},
                                             {{key: code, value: {{stringValue: '%RESPONSE_CODE%'}}}}]}}}}
              attributes:
                - {{key: src, value: '%KUMA_SOURCE_SERVICE%'}}
                - {{key: agent, value: '%REQ(USER-AGENT)%'}}
          - type: Tcp
            tcp:
              address: '{tcp}'
              format:
                type: Plain
                plain: '%KUMA_SOURCE_SERVICE%->%KUMA_DESTINATION_SERVICE% %RESPONSE_CODE%'
          - type: File
            file:
              path: '{log}'
              format:
                type: Json
                omitEmptyValues: true
                json:
                  - {{key: start, value: '%START_TIME%'}}
                  - {{key: code, value: '%RESPONSE_CODE%'}}
                  - {{key: src, value: '%KUMA_SOURCE_SERVICE%'}}
                  - {{key: dst, value: '%KUMA_DESTINATION_SERVICE%'}}
                  - {{key: method, value: '%REQ(:METHOD)%'}}
                  - {{key: mesh, value: '%KUMA_MESH%'}}
                  - {{key: proto, value: '%PROTOCOL%'}}
                  - {{key: trace, value: '%TRACE_ID%'}}
                  - {{key: tenant, value: '%REQ(X-TENANT)%'}}
                  - {{key: nothing, value: '%REQ(X-ABSENT)%'}}
---
apiVersion: kuma.io/v1alpha1
kind: MeshAccessLog
metadata: {{name: in, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {{kind: MeshService, name: benigno}}
  rules:
    - default:
        backends:
          - type: OpenTelemetry
            openTelemetry:
              endpoint: '{otel}'
              attributes: [{{key: direction, value: '%KUMA_TRAFFIC_DIRECTION%'}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshTrace
metadata: {{name: otel, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {{kind: Mesh}}
  default:
    backends: [{{type: OpenTelemetry, openTelemetry: {{endpoint: '{otel}'}}}}]
    tags:
      - {{name: team, literal: core}}
      - {{name: tenant, header: {{name: x-tenant, default: nobody}}}}
"""


def _request(outbound: Plane, h2: bool) -> None:
    headers = {"x-tenant": "acme", "user-agent": "probe/1"}
    if not h2:
        status = ProxyClient(outbound.outbound).get("http://benigno:5000/logged", headers)[0]  # type: ignore[arg-type]
        assert status == 200
        return
    assert outbound.outbound is not None
    got = _curl(
        "--http2-prior-knowledge", "-H", "host: benigno:5000", "-H", "x-tenant: acme", "-A", "probe/1",
        "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
        f"http://127.0.0.1:{outbound.outbound[1]}/logged",
    )  # fmt: skip
    assert got.stdout == "200 2"


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_access_logs_and_spans_of_real_requests_reach_their_collectors(
    plane: Callable[..., Plane],
    upstream: Any,
    tmp_path: Path,
    otlp: OtlpCollector,
    tcp: TcpCollector,
    h2: bool,
) -> None:
    if h2 and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    log = tmp_path / "access.json"
    repo = _mesh() + SERVICES + _policies(otlp.endpoint, tcp.address, log)
    app, outbound, _ = _chain(plane, upstream, tmp_path, repo)
    _request(outbound, h2)
    got = parse(app.seen_headers[-1].get("traceparent"))
    assert got is not None and got[2]  # an OTel backend: sampled, traceparent only (no B3)
    assert "b3" not in app.seen_headers[-1]
    trace_id = got[0]

    # The File backend: one JSON object per line, with the configured keys and types.
    line = wait_until(lambda: log.exists() and log.read_text().strip(), "the Json access log line")
    doc = json.loads(line.splitlines()[-1])
    assert set(doc) == {"start", "code", "src", "dst", "method", "mesh", "proto", "trace", "tenant"}
    assert (doc["code"], doc["src"], doc["dst"], doc["method"], doc["mesh"]) == (
        200, "magnanimo", "benigno", "GET", "default"
    )  # fmt: skip
    assert doc["proto"] == ("HTTP/2" if h2 else "HTTP/1.1") and doc["tenant"] == "acme"
    assert doc["trace"] == trace_id and doc["start"].endswith("Z")  # nothing: omitted (omitEmptyValues)

    # The Tcp backend: the Plain line.
    assert wait_until(tcp.lines, "the Tcp line") == ["magnanimo->benigno 200"]

    # OpenTelemetry: magnanimo's outbound record and benigno's inbound one.
    (out_rec,) = wait_until(lambda: otlp.logs_of("magnanimo"), "magnanimo's OTLP log record")
    assert out_rec["_resource"]["kuma.mesh"] == "default"
    assert _attrs(out_rec["attributes"]) == {"src": "magnanimo", "agent": "probe/1"}
    assert _attrs(out_rec["body"]["kvlistValue"]["values"]) == {"mesh": "default", "code": "200"}
    assert out_rec["traceId"] == trace_id and int(out_rec["timeUnixNano"]) > 0
    (in_rec,) = wait_until(lambda: otlp.logs_of("benigno"), "benigno's inbound OTLP log record")
    assert _attrs(in_rec["attributes"]) == {"direction": "INBOUND"}
    assert json.loads(in_rec["body"]["stringValue"])["direction"] == "inbound"  # default: meshc's line

    # OTLP spans: both hops, one trace, the tags as attributes.
    spans = wait_until(lambda: len(otlp.spans_of(trace_id)) >= 2 and otlp.spans_of(trace_id), "two spans")
    by_kind = {s["kind"]: s for s in spans}
    client, server = by_kind[3], by_kind[2]  # SPAN_KIND_CLIENT, SPAN_KIND_SERVER
    assert client["_resource"]["service.name"] == "magnanimo"
    assert server["_resource"]["service.name"] == "benigno"
    assert server["parentSpanId"] == client["spanId"] and server["spanId"] == got[1]
    for s in (client, server):
        a = _attrs(s["attributes"])
        assert (a["team"], a["tenant"], a["http.status_code"]) == ("core", "acme", "200")
        assert int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) > 0


def _dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_a_dead_collector_neither_fails_nor_holds_requests_and_the_loss_is_counted(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """Logs, lines and spans go to ports nothing listens on: every request still succeeds, the
    File backend still writes, and the sidecar counts what it lost."""
    log = tmp_path / "access.json"
    repo = _mesh() + SERVICES + _policies(f"127.0.0.1:{_dead_port()}", f"127.0.0.1:{_dead_port()}", log)
    _, outbound, _ = _chain(plane, upstream, tmp_path, repo)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    for i in range(20):
        assert client.get(f"http://benigno:5000/r{i}", {"x-tenant": "t"})[0] == 200
    wait_until(lambda: len(log.read_text().splitlines()) == 20, "20 File lines")

    def lost() -> bool:
        text = outbound.metrics()
        name = "meshc_accesslog_records_dropped_total"
        otel = metric_value(text, name, backend="otel", reason="collector_failed")
        tcp_lost = metric_value(text, name, backend="tcp", reason="collector_failed")
        return otel >= 1 and tcp_lost >= 1 and metric_value(text, "meshc_tracing_spans_failed_total") >= 1

    wait_until(lost, "the lost log records and spans counted")
    assert metric_value(outbound.metrics(), "meshc_accesslog_records_sent_total") == 0
