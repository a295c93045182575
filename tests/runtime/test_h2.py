"""HTTP/2 and gRPC through two sidecars in plaintext (h2c with prior knowledge), and through a
gateway with ``curl --http2-prior-knowledge``: real grpcio client and server, real processes.

The h2 byte layer is one for both data planes (a listener's first bytes pick it), so every test
here runs on both, and HTTP/1.1 keeps working on the same ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_apps import CHANNEL_OPTIONS, EchoServer, method
from runtime_harness import (
    HANG_DEADLINE,
    Plane,
    ProxyClient,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    CatalogService,
    CircuitBreakerConf,
    FaultBandwidth,
    FaultInjectionConf,
    GatewayBackend,
    GatewayConf,
    GatewayFilter,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    HttpRetry,
    Inbound,
    LoggingBackend,
    RateLimitConf,
    RetryConf,
    Rule,
    Split,
    StringMatch,
    Thresholds,
    TimeoutConf,
    TrafficLogConf,
)
from runtime.h2conn import PREFACE

SERVICES = {
    "benigno": CatalogService(port=5000, protocol="http", subsets=({"version": "v1"},)),
    "magnanimo": CatalogService(port=4000, protocol="http"),
}


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer("benigno")
    yield server
    server.close()


def _mesh(tmp_path: Path) -> Path:
    retry = RetryConf(grpc=HttpRetry(num_retries=3, retry_on=("unavailable",)))
    dest = simple_destination("benigno", retry=(Rule[RetryConf](conf=retry),))
    return write_bundle(tmp_path, mesh_bundle(SERVICES, {"benigno": dest}))


def _chain(
    plane: Callable[..., Plane],
    tmp_path: Path,
    app: str,
    mesh: Path | None = None,
    rules: Inbound | None = None,
) -> tuple[Plane, Plane]:
    """magnanimo's outbound sidecar -> benigno's inbound sidecar (``rules``) -> the gRPC app."""
    mesh = mesh or _mesh(tmp_path)
    bundle = write_bundle(tmp_path, service_bundle("benigno", rules))
    inbound = plane(
        "--service", "benigno", "--tag", "version=v1", "--app", app,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", mesh, "--bundle", bundle,
    )  # fmt: skip
    assert inbound.inbound is not None
    eps = tmp_path / "eps.json"
    eps.write_text(
        endpoint_set(
            1, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
        ).model_dump_json()
    )
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", mesh, "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", eps,
    )  # fmt: skip
    return outbound, inbound


def _channel(outbound: Plane, authority: str = "benigno:5000") -> grpc.Channel:
    assert outbound.outbound is not None
    host, port = outbound.outbound
    return grpc.insecure_channel(
        f"{host}:{port}", options=[*CHANNEL_OPTIONS, ("grpc.default_authority", authority)]
    )


def test_grpc_calls_through_two_sidecars(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    outbound, inbound = _chain(plane, tmp_path, echo.address)
    with _channel(outbound) as ch:
        assert method(ch, "Unary")(b"hello", timeout=HANG_DEADLINE) == b"benigno:hello"
        streamed = list(method(ch, "Stream", "unary_stream")(b"50", timeout=HANG_DEADLINE))
        assert [m.split(b":")[0] for m in streamed] == [b"%d" % i for i in range(50)]
        assert all(len(m) > 10_000 for m in streamed)  # 500 kB: more than one flow-control window
        chunks = iter([b"y" * 100_000] * 30)  # 3 MB up: the windows open as the app reads
        assert method(ch, "Collect", "stream_unary")(chunks, timeout=HANG_DEADLINE) == b"3000000"
    # The inbound sidecar named the caller for the app; both sides counted gRPC statuses.
    assert echo.metadata[-1]["x-meshc-source-service"] == "magnanimo"
    text = outbound.metrics()
    assert (
        metric_value(text, "istio_requests_total", destination_app="benigno", grpc_response_status="0") == 3
    )
    assert (
        metric_value(inbound.metrics(), "meshc_requests_total", direction="inbound", response_code="200") == 3
    )
    # HTTP/1.1 still works on the same listener.
    assert outbound.outbound is not None
    status, _, _ = ProxyClient(outbound.outbound).get("http://benigno:5000/")
    assert status in (400, 502, 503)  # the gRPC app speaks no HTTP/1.1; the request was routed


def test_grpc_errors_deadline_and_retry(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    outbound, _ = _chain(plane, tmp_path, echo.address)
    with _channel(outbound) as ch:
        # A trailers-only error from the app comes back as it is.
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Missing")(b"", timeout=HANG_DEADLINE)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such thing")
        # grpc-timeout is the call's deadline: the sidecar gives up and says DEADLINE_EXCEEDED.
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Slow")(b"", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # UNAVAILABLE is retried (Retry's grpc.retryOn): the caller sees the second answer.
        assert method(ch, "Flaky")(b"k1", timeout=HANG_DEADLINE) == b"ok:k1"
        assert echo.calls["Flaky:k1"] == 2
    text = outbound.metrics()
    assert metric_value(text, "meshc_retries_total", destination_service="benigno") >= 1
    assert metric_value(text, "istio_requests_total", grpc_response_status="5") == 1


def test_an_inbound_request_timeout_is_a_grpc_status_and_logged(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    """A gRPC call (no deadline of its own) to an app slower than benigno's inbound request
    timeout: the inbound sidecar answers a trailers-only DEADLINE_EXCEEDED (HTTP 504's gRPC
    status) with the reason, and its inbound access log line carries the gRPC status; a call its
    rate limit refuses is logged too (no upstream)."""
    log = tmp_path / "inbound.log"
    rules = Inbound(
        timeout=(Rule[TimeoutConf](conf=TimeoutConf(http_request_timeout_ms=300)),),
        rate_limit=(Rule[RateLimitConf](conf=RateLimitConf(requests=1, interval_ms=600_000)),),
        traffic_log=(
            Rule[TrafficLogConf](
                conf=TrafficLogConf(backend=LoggingBackend(name="f", type="file", path=str(log)))
            ),
        ),
    )
    outbound, inbound = _chain(plane, tmp_path, echo.address, rules=rules)
    with _channel(outbound) as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Slow")(b"")
        elapsed = time.monotonic() - start
        with pytest.raises(grpc.RpcError) as limited:  # the one token is spent: refused, logged
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "app timeout")
    assert 0.3 <= elapsed < 10.0  # the inbound's 300 ms, not the app's 30 s
    assert echo.calls["Slow"] == 1
    line = wait_until(lambda: log.exists() and log.read_text().splitlines(), "an inbound log line")
    entry = json.loads(line[0])

    assert (entry["direction"], entry["source_service"], entry["protocol"], entry["grpc_status"]) == (
        "inbound",
        "magnanimo",
        "HTTP/2",
        4,
    )
    # A trailers-only gRPC answer is an HTTP 200; the status is gRPC's, counted as such.
    assert entry["response_code"] == 200 and entry["path"].endswith("/Slow")
    assert limited.value.details() == "local_rate_limited" and echo.calls["Unary"] == 0
    lines = wait_until(lambda: len(log.read_text().splitlines()) >= 2 and log.read_text(), "2 lines")
    refused = [json.loads(x) for x in lines.splitlines()[1:]]
    assert {(x["path"].rsplit("/", 1)[1], x["upstream"], x["grpc_status"]) for x in refused} == {
        ("Unary", "", 14)
    }
    wait_until(
        lambda: metric_value(inbound.metrics(), "istio_requests_total", grpc_response_status="4") == 1,
        "the inbound sidecar to count the DEADLINE_EXCEEDED",
    )


def test_an_inbound_connection_limit_refuses_a_grpc_call_with_unavailable(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    """One call in flight to the app fills benigno's inbound limit of one: another call is
    refused at once (UNAVAILABLE, Envoy's overflow, counted), and goes through once it is over."""
    import threading

    cb = CircuitBreakerConf(thresholds=Thresholds(max_connections=1, max_pending_requests=0, max_requests=1))
    rules = Inbound(circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),))
    outbound, inbound = _chain(plane, tmp_path, echo.address, rules=rules)
    with _channel(outbound) as ch:
        slow: list[bytes] = []
        first = threading.Thread(target=lambda: slow.append(method(ch, "Slow")(b"", timeout=HANG_DEADLINE)))
        first.start()
        wait_until(lambda: echo.calls["Slow"] == 1, "the first call to reach the app")
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "upstream connection limit reached",
        )
        assert echo.calls["Unary"] == 0
        echo.release.set()
        first.join(60)
        assert slow == [b"late"]
        assert method(ch, "Unary")(b"y", timeout=HANG_DEADLINE) == b"benigno:y"
    overflow = metric_value(inbound.metrics(), "meshc_upstream_overflow_total", destination_service="benigno")
    assert overflow >= 1  # the outbound retries UNAVAILABLE: each attempt overflows


def test_sidecar_errors_are_grpc_statuses(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    outbound, _ = _chain(plane, tmp_path, echo.address)
    with _channel(outbound) as ch:
        echo.close()  # nothing listens at the app's address any more
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A host the mesh does not know, with passthrough off, is PERMISSION_DENIED (HTTP 200).
    no_pass = write_bundle(tmp_path, mesh_bundle(SERVICES, passthrough=False))
    closed = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", no_pass, "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
    )  # fmt: skip
    with _channel(closed, "elsewhere:80") as ch:
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "passthrough disabled" in (err.value.details() or "")
    assert metric_value(closed.metrics(), "istio_requests_total", grpc_response_status="7") == 1


def test_resets_and_a_drain_reach_the_other_side(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    outbound, _ = _chain(plane, tmp_path, echo.address)
    with _channel(outbound) as ch:
        # The client cancels (RST_STREAM): both sidecars reset their streams, the app sees it.
        call = method(ch, "Watch", "unary_stream")(b"", timeout=HANG_DEADLINE)
        assert next(call) == b"first"
        call.cancel()
        wait_until(echo.cancelled.is_set, "the app to see the cancellation")
        # SIGTERM while a call is in flight: GOAWAY to the client, the call still completes.
        pending = method(ch, "Slow").future(b"", timeout=HANG_DEADLINE)
        wait_until(lambda: echo.calls["Slow"] == 1, "the call to reach the app")
        os.kill(outbound.pid(), signal.SIGTERM)
        wait_until(lambda: outbound.event("draining"), "the sidecar to drain")
        echo.release.set()
        assert pending.result(timeout=HANG_DEADLINE) == b"late"
    assert outbound.proc.wait(HANG_DEADLINE) == 0


def test_h2_connections_count_against_max_connections(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    mesh = _mesh(tmp_path)
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", mesh, "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--max-connections", "1",
    )  # fmt: skip
    assert outbound.outbound is not None
    with _channel(outbound) as ch:
        with pytest.raises(grpc.RpcError):  # no endpoints: answered (UNAVAILABLE), connection kept
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
        with socket.create_connection(outbound.outbound, timeout=HANG_DEADLINE) as extra:
            extra.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface, empty SETTINGS
            got = b""
            while chunk := extra.recv(65536):
                got += chunk
        assert b"the listener has reached --max-connections" in got  # in a GOAWAY, then closed
    assert metric_value(outbound.metrics(), "meshc_listener_refusals_total", reason="max_connections") == 1


def test_bytes_that_cannot_tell_h2_from_http11_are_bounded_by_the_header_timeout(
    plane: Callable[..., Plane], tmp_path: Path
) -> None:
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", _mesh(tmp_path), "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--header-timeout", "0.5",
    )  # fmt: skip
    assert outbound.outbound is not None
    with socket.create_connection(outbound.outbound, timeout=HANG_DEADLINE) as loris:
        loris.sendall(b"PRI * HT")  # the preface, or a request line starting so: nobody can tell yet
        got = b""
        while chunk := loris.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 408 ")
    assert metric_value(outbound.metrics(), "meshc_listener_refusals_total", reason="header_timeout") == 1


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (scripts/ensure-system-deps.sh)"
)


def _gateway(plane: Callable[..., Plane], tmp_path: Path, inbound: Plane) -> str:
    """An edge gateway whose one route sends everything to benigno; its listener's address."""
    assert inbound.inbound is not None
    gw_bundle = service_bundle(
        "edge-gateway",
        gateway=GatewayConf(
            listeners=(
                GatewayListener(
                    port=8080,
                    protocol="HTTP",
                    rules=(
                        GatewayRule(
                            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/")),),
                            backends=(GatewayBackend(weight=1, service="benigno"),),
                        ),
                    ),
                ),
            )
        ),
    )
    eps = tmp_path / "gw-eps.json"
    eps.write_text(
        endpoint_set(
            2, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
        ).model_dump_json()
    )
    gw = plane(
        "--service", "edge-gateway", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", _mesh(tmp_path), "--bundle", write_bundle(tmp_path, gw_bundle),
        "--endpoints", eps, module="runtime.gateway",
    )  # fmt: skip
    address: str = wait_until(lambda: gw.listening.get("listener:8080"), "the gateway listener")
    return address


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", *args], capture_output=True, text=True, timeout=HANG_DEADLINE, check=True
    )


@needs_curl
def test_curl_http2_prior_knowledge_through_a_gateway(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    """curl speaks h2c to the gateway, the gateway h2c to benigno's sidecar, that to the app."""
    _, inbound = _chain(plane, tmp_path, echo.address)
    address = _gateway(plane, tmp_path, inbound)
    message = tmp_path / "msg.bin"
    message.write_bytes(struct.pack(">BI", 0, 4) + b"curl")  # one gRPC frame: uncompressed, 4 bytes
    out = _curl(
        "--http2-prior-knowledge", "-o", str(tmp_path / "out.bin"), "-D", "-",
        "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", f"@{message}",
        "-w", "%{http_version}\n", f"http://{address}/test.Echo/Unary",
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("HTTP/2 200") and lines[-1] == "2"
    body = (tmp_path / "out.bin").read_bytes()
    assert body[5:] == b"benigno:curl"
    assert any(line.lower().startswith("grpc-status: 0") for line in lines)  # the trailer
    # HTTP/1.1 on the same gateway port still answers.
    h1 = _curl("--http1.1", "-o", "/dev/null", "-w", "%{http_version}", f"http://{address}/x")
    assert h1.stdout == "1.1"


@needs_curl
def test_http2_callers_reach_an_http11_app(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """The app speaks only HTTP/1.1: benigno's sidecar sees its answer to the h2c preface and
    translates the streams (curl h2c -> outbound -> inbound -> app, and through a gateway)."""
    app = upstream("benigno-v1")
    outbound, inbound = _chain(plane, tmp_path, app.address)
    assert outbound.outbound is not None
    data = tmp_path / "body.bin"
    data.write_bytes(b"b" * 300_000)
    out = _curl(
        "--http2-prior-knowledge", "-H", "host: benigno:5000", "--data-binary", f"@{data}",
        "-w", "\n%{http_version}", f"http://127.0.0.1:{outbound.outbound[1]}/hw2?x=1",
    )  # fmt: skip
    doc, version = out.stdout.rsplit("\n", 1)
    assert version == "2"
    assert json.loads(doc) == {
        "name": "benigno-v1",
        "path": "/hw2?x=1",
        "method": "POST",
        "body_len": 300_000,
    }
    assert app.seen_headers[-1]["x-meshc-source-service"] == "magnanimo"
    # A large response streams back through both sidecars' windows.
    big = _curl(
        "--http2-prior-knowledge", "-H", "host: benigno:5000", "-o", "/dev/null",
        "-w", "%{http_code} %{size_download}", f"http://127.0.0.1:{outbound.outbound[1]}/big/3000000",
    )  # fmt: skip
    assert big.stdout == "200 3000000"
    address = _gateway(plane, tmp_path, inbound)
    got = _curl("--http2-prior-knowledge", "-w", "\n%{http_version}", f"http://{address}/route1/hw2")
    doc, version = got.stdout.rsplit("\n", 1)
    assert version == "2" and json.loads(doc)["path"] == "/route1/hw2"


@needs_curl
def test_mirrors_and_the_bandwidth_fault_apply_to_http2_streams(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    main, shadow = upstream("main"), upstream("shadow")
    shadow.status = 500  # the mirror's answer never reaches the client
    rule = GatewayRule(
        matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/")),),
        filters=(GatewayFilter(type="mirror", mirror=Split(weight=1, service="shadow")),),
        backends=(GatewayBackend(weight=1, service="main"),),
    )
    gw_bundle = service_bundle(
        "edge", gateway=GatewayConf(listeners=(GatewayListener(port=8080, protocol="HTTP", rules=(rule,)),))
    )
    eps = tmp_path / "eps.json"
    eps.write_text(
        endpoint_set(1, {"main": [(main.address, {})], "shadow": [(shadow.address, {})]}).model_dump_json()
    )
    gw = plane(
        "--bundle", write_bundle(tmp_path, gw_bundle), "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--endpoints", eps, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", module="runtime.gateway",
    )  # fmt: skip
    address = gw.listening["listener:8080"]
    for i in range(5):
        got = _curl("--http2-prior-knowledge", "-w", "\n%{http_version}", f"http://{address}/m/{i}")
        doc, version = got.stdout.rsplit("\n", 1)
        assert version == "2" and json.loads(doc)["name"] == "main"
    wait_until(lambda: shadow.total() >= 5, "5 mirrored requests")
    assert shadow.seen_headers[-1]["host"].endswith("-shadow")
    # The bandwidth fault on benigno's inbound side: 100 kB at 800 kbit/s takes at least 1 s.
    slow = FaultInjectionConf(response_bandwidth=FaultBandwidth(percentage=100, limit_bps=800_000))
    faults = Inbound(fault_injection=(Rule[FaultInjectionConf](conf=slow),))
    app = upstream("benigno-v1")
    inbound = plane(
        "--service", "benigno", "--tag", "version=v1", "--app", app.address,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", _mesh(tmp_path),
        "--bundle", write_bundle(tmp_path, service_bundle("benigno", faults)),
    )  # fmt: skip
    assert inbound.inbound is not None
    start = time.monotonic()
    big = _curl(
        "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{http_version}",
        f"http://127.0.0.1:{inbound.inbound[1]}/big/100000",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert big.stdout == "200 100000 2"
    assert elapsed >= 0.9  # a lower bound only: the limit cannot be skipped


def test_grpc_calls_carry_a_traceparent_through_two_sidecars(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    """The HTTP/2 layer applies the same hop decision: a caller's trace is kept, a new one made."""
    from runtime.tracing import parse

    outbound, _ = _chain(plane, tmp_path, echo.address)
    own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with _channel(outbound) as ch:
        unary = method(ch, "Unary")
        assert unary(b"a", timeout=HANG_DEADLINE, metadata=(("traceparent", own),)) == b"benigno:a"
        assert unary(b"b", timeout=HANG_DEADLINE) == b"benigno:b"
    kept, fresh = (parse(m.get("traceparent")) for m in echo.metadata[-2:])
    assert kept is not None and kept[0] == "4bf92f3577b34da6a3ce929d0e0e4736" and kept[2]
    assert kept[1] != "00f067aa0ba902b7"
    assert fresh is not None and fresh[0] != kept[0] and not fresh[2]


def test_grpc_calls_continue_b3_and_the_sidecars_own_answers_are_error_spans(
    plane: Callable[..., Plane], echo: EchoServer, tmp_path: Path
) -> None:
    """With a Zipkin backend the HTTP/2 layer reads B3 metadata and sends both forms on; a call
    the sidecar answers itself (PERMISSION_DENIED: passthrough off) is a span tagged error."""
    from test_tracing_live import Collector

    from runtime.bundle import TracingBackend

    zipkin = Collector()
    try:
        traced = mesh_bundle(SERVICES, {"benigno": simple_destination("benigno")}, passthrough=False)
        traced = traced.model_copy(update={"tracing": TracingBackend(name="z", url=zipkin.url)})
        outbound, _ = _chain(plane, tmp_path, echo.address, write_bundle(tmp_path, traced))
        trace_id, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        with _channel(outbound) as ch:
            got = method(ch, "Unary")(b"a", timeout=HANG_DEADLINE, metadata=(("b3", f"{trace_id}-{span}-1"),))
            assert got == b"benigno:a"
        seen = echo.metadata[-1]
        spans = wait_until(lambda: len(zipkin.of(trace_id)) >= 2 and zipkin.of(trace_id), "both spans")
        by_kind = {s["kind"]: s for s in spans}
        assert by_kind["CLIENT"]["parentId"] == span
        assert seen["x-b3-traceid"] == trace_id and seen["x-b3-spanid"] == by_kind["SERVER"]["id"]
        assert seen["b3"] == f"{trace_id}-{by_kind['SERVER']['id']}-1-{by_kind['CLIENT']['id']}"
        assert (
            by_kind["SERVER"]["tags"]["grpc.status_code"] == "0" and "error" not in by_kind["SERVER"]["tags"]
        )
        denied = "0af7651916cd43dd8448eb211c80319c"
        with _channel(outbound, "elsewhere:80") as ch:
            with pytest.raises(grpc.RpcError) as err:
                method(ch, "Unary")(
                    b"x", timeout=HANG_DEADLINE, metadata=(("traceparent", f"00-{denied}-{span}-01"),)
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        (refused,) = wait_until(lambda: zipkin.of(denied), "the refused call's span")
        tags = refused["tags"]
        assert tags["error"] == "true" and tags["grpc.status_code"] == "7", tags
        assert "passthrough disabled" in tags["meshc.reason"]
    finally:
        zipkin.server.shutdown()
        zipkin.server.server_close()
