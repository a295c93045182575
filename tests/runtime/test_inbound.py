"""Inbound sidecar: rate limit, fault injection, and the two-sidecar chain."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime_harness import (
    Plane,
    ProxyClient,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    CircuitBreakerConf,
    FaultAbort,
    FaultDelay,
    FaultInjectionConf,
    HeaderChange,
    Inbound,
    LoggingBackend,
    RateLimitConf,
    Rule,
    Thresholds,
    TimeoutConf,
    TrafficLogConf,
)

MAGNANIMO = {"kuma.io/service": "magnanimo"}


def _inbound_sidecar(plane: Callable[..., Plane], tmp_path: Path, app: str, inbound: Inbound) -> Plane:
    return plane(
        "--service", "benigno", "--tag", "version=v1", "--app", app,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", tmp_path / "benigno-state",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("benigno", inbound)),
    )  # fmt: skip


def test_rate_limit_answers_429_with_configured_headers(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app = upstream("benigno-v1")
    limit = RateLimitConf(
        requests=3, interval_ms=600_000, status=429, headers=(HeaderChange(name="x-limited", value="yes"),)
    )
    sidecar = _inbound_sidecar(
        plane, tmp_path, app.address, Inbound(rate_limit=(Rule[RateLimitConf](peer=MAGNANIMO, conf=limit),))
    )
    client = ProxyClient(sidecar.inbound)  # type: ignore[arg-type]
    caller = {"x-meshc-source-service": "magnanimo"}
    statuses = [client.get("/hw2", caller)[0] for _ in range(3)]
    status, headers, body = client.get("/hw2", caller)
    assert statuses == [200, 200, 200]
    assert (status, headers["x-limited"], body) == (429, "yes", b"local_rate_limited")
    # Another caller is not covered by this rule.
    assert client.get("/hw2", {"x-meshc-source-service": "other"})[0] == 200
    text = sidecar.metrics()
    assert (
        metric_value(
            text, "meshc_requests_total", direction="inbound", source_service="magnanimo", response_code="429"
        )
        == 1
    )


def test_injected_delay_and_abort(plane: Callable[..., Plane], upstream: Any, tmp_path: Path) -> None:
    app = upstream("benigno-v1")
    faults = (
        Rule[FaultInjectionConf](
            peer={"kuma.io/service": "aborted"},
            conf=FaultInjectionConf(abort=FaultAbort(percentage=100, http_status=418)),
        ),
        Rule[FaultInjectionConf](
            peer=MAGNANIMO, conf=FaultInjectionConf(delay=FaultDelay(percentage=100, value_ms=400))
        ),
    )
    sidecar = _inbound_sidecar(plane, tmp_path, app.address, Inbound(fault_injection=faults))
    client = ProxyClient(sidecar.inbound)  # type: ignore[arg-type]
    start = time.monotonic()
    status, _, body = client.get("/hw2", {"x-meshc-source-service": "magnanimo"})
    elapsed = time.monotonic() - start
    assert status == 200 and json.loads(body)["name"] == "benigno-v1"
    assert elapsed >= 0.4  # a lower bound only: the delay cannot be skipped
    before = app.total()
    status, _headers, body = client.get("/hw2", {"x-meshc-source-service": "aborted"})
    assert (status, body, app.total()) == (418, b"fault filter abort", before)


def test_two_sidecars_chain_names_the_caller(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app = upstream("benigno-v1")
    inbound = _inbound_sidecar(plane, tmp_path, app.address, Inbound())
    eps = tmp_path / "eps.json"
    eps.write_text(
        endpoint_set(
            1, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
        ).model_dump_json()  # type: ignore[index]
    )
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", eps,
    )  # fmt: skip
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    body = b"x" * 200_000
    status, _, data = client.request("POST", "http://benigno:5000/hw2", body=body)
    assert status == 200 and json.loads(data)["body_len"] == len(body)
    assert app.seen_headers[-1]["x-meshc-source-service"] == "magnanimo"
    assert (
        metric_value(
            inbound.metrics(), "meshc_requests_total", direction="inbound", source_service="magnanimo"
        )
        == 1
    )


# -- inbound timeout, connection limits and access log (Kuma's inbound MeshTimeout,
#    MeshCircuitBreaker, MeshAccessLog) ----------------------------------------------------------


def test_inbound_request_timeout_answers_504_within_it(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """A local app slower than the caller's inbound request timeout: 504 soon after the timeout,
    while a caller with no rule waits for the app's answer."""
    app = upstream("benigno-v1")
    rules = (Rule[TimeoutConf](peer=MAGNANIMO, conf=TimeoutConf(http_request_timeout_ms=300)),)
    sidecar = _inbound_sidecar(plane, tmp_path, app.address, Inbound(timeout=rules))
    client = ProxyClient(sidecar.inbound)  # type: ignore[arg-type]
    start = time.monotonic()
    status, headers, _ = client.get("/hang", {"x-meshc-source-service": "magnanimo"})
    elapsed = time.monotonic() - start
    assert (status, headers["x-meshc-reason"]) == (504, "app timeout")
    assert 0.3 <= elapsed < 10.0  # the timeout, not the app's 60 s hang
    app.release.set()  # the app answers at once from now on
    status, _, body = client.get("/hw2", {"x-meshc-source-service": "other"})
    assert status == 200 and json.loads(body)["name"] == "benigno-v1"
    text = sidecar.metrics()
    labels = {"direction": "inbound", "source_service": "magnanimo", "response_code": "504"}
    assert metric_value(text, "meshc_requests_total", **labels) == 1


def test_inbound_connection_limit_answers_503_overflow(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """One request in flight to the app fills a limit of one: the next gets Envoy's overflow 503
    at once (counted in meshc_upstream_overflow), and once the first is done the app takes more."""
    import threading

    app = upstream("benigno-v1")
    app.hang.set()
    cb = CircuitBreakerConf(thresholds=Thresholds(max_connections=1, max_pending_requests=0, max_requests=1))
    sidecar = _inbound_sidecar(
        plane, tmp_path, app.address, Inbound(circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),))
    )
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(ProxyClient(sidecar.inbound).get("/slow")[0])  # type: ignore[arg-type]
    )
    first.start()
    wait_until(lambda: app.total() == 1, "the first request to reach the app")
    status, headers, _ = ProxyClient(sidecar.inbound).get("/next")  # type: ignore[arg-type]
    assert (status, headers["x-meshc-reason"]) == (503, "upstream connection limit reached")
    assert app.total() == 1
    app.hang.clear()
    app.release.set()
    first.join(60)
    assert results == [200]
    assert ProxyClient(sidecar.inbound).get("/after")[0] == 200  # type: ignore[arg-type]
    assert (
        metric_value(sidecar.metrics(), "meshc_upstream_overflow_total", destination_service="benigno") == 1
    )


def test_inbound_access_log_line_in_a_real_file(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """Every matching inbound log rule writes the request, direction inbound, caller as source;
    a request the sidecar answers itself (a rate limit's 429) is logged too, with no upstream."""
    app = upstream("benigno-v1")
    log, other = tmp_path / "inbound.log", tmp_path / "magnanimo.log"
    rules = (
        Rule[TrafficLogConf](
            peer=MAGNANIMO,
            conf=TrafficLogConf(backend=LoggingBackend(name="m", type="file", path=str(other))),
        ),
        Rule[TrafficLogConf](
            conf=TrafficLogConf(backend=LoggingBackend(name="f", type="file", path=str(log)))
        ),
    )
    limited = Rule[RateLimitConf](
        peer={"kuma.io/service": "limited"}, conf=RateLimitConf(requests=1, interval_ms=600_000)
    )
    inbound = Inbound(traffic_log=rules, rate_limit=(limited,))
    sidecar = _inbound_sidecar(plane, tmp_path, app.address, inbound)
    client = ProxyClient(sidecar.inbound)  # type: ignore[arg-type]
    assert client.get("/logged?x=1", {"x-meshc-source-service": "magnanimo"})[0] == 200
    assert client.get("/second", {"x-meshc-source-service": "someone"})[0] == 200
    assert client.get("/ok", {"x-meshc-source-service": "limited"})[0] == 200
    assert client.get("/refused", {"x-meshc-source-service": "limited"})[0] == 429
    text = wait_until(
        lambda: log.exists() and log.read_text().count("\n") == 4 and log.read_text(), "4 lines"
    )
    first, second, _ok, refused = (json.loads(line) for line in text.splitlines())
    assert (refused["path"], refused["response_code"], refused["upstream"]) == ("/refused", 429, "")
    assert (refused["source_service"], refused["direction"]) == ("limited", "inbound")
    assert (first["direction"], first["source_service"], first["destination_service"]) == (
        "inbound",
        "magnanimo",
        "benigno",
    )
    assert (first["method"], first["path"], first["response_code"], first["upstream"]) == (
        "GET",
        "/logged",
        200,
        app.address,
    )
    assert second["source_service"] == "someone" and second["path"] == "/second"
    mine = wait_until(lambda: other.exists() and other.read_text().strip(), "the magnanimo rule's line")
    assert [json.loads(x)["path"] for x in mine.splitlines()] == ["/logged"]
