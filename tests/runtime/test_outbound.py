"""Outbound sidecar over real sockets: split, balancing, resilience, passthrough, streaming."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime_harness import (
    Plane,
    ProxyClient,
    Upstream,
    connect_tunnel,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    BackOff,
    CircuitBreakerConf,
    Consecutive,
    Destination,
    Detectors,
    HeaderChange,
    HeaderOps,
    HealthCheckConf,
    HttpHealthCheck,
    HttpMatch,
    HttpModify,
    HttpRetry,
    HttpRoute,
    PathRewrite,
    RetryConf,
    RouteConf,
    Rule,
    Split,
    StringMatch,
    Thresholds,
    TimeoutConf,
)

V1 = {"version": "v1"}
V2 = {"version": "v2"}


def _start(
    plane: Callable[..., Plane],
    tmp_path: Path,
    eps: dict[str, list[tuple[str, dict[str, str]]]],
    destinations: dict[str, Destination] | None = None,
    passthrough: bool = True,
) -> Plane:
    mesh = mesh_bundle(destinations=destinations, passthrough=passthrough)
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(endpoint_set(1, eps).model_dump_json())
    return plane(
        "--service", "magnanimo", "--tag", "version=v1",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", tmp_path / "state",
        "--mesh-bundle", write_bundle(tmp_path, mesh),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", ep_file,
    )  # fmt: skip


def _two(upstream: Callable[[str], Upstream]) -> tuple[Upstream, Upstream, dict[str, Any]]:
    a, b = upstream("v1"), upstream("v2")
    return a, b, {"benigno": [(a.address, V1), (b.address, V2)]}


def test_split_90_10_within_binomial_bounds(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    _, _, eps = _two(upstream)
    dest = simple_destination("benigno", [(90, V1), (10, V2)])
    sidecar = _start(plane, tmp_path, eps, {"benigno": dest})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    n = 2000
    counts: Counter[str] = Counter()
    body_bytes = 0
    for _ in range(n):
        status, _, body = client.get("http://benigno:5000/hw2")
        assert status == 200, (status, body)
        counts[json.loads(body)["name"]] += 1
        body_bytes += len(body)
    p = counts["v2"] / n
    # |p - 0.1| > 5.3 sigma happens by chance less than once in 10^6 runs.
    assert abs(p - 0.1) <= 5.3 * math.sqrt(0.1 * 0.9 / n), counts
    text = sidecar.metrics()
    assert (
        metric_value(
            text,
            "meshc_requests_total",
            destination_service="benigno",
            destination_subset="version=v2",
            response_code="200",
        )
        == counts["v2"]
    )
    # the same requests in Istio's vocabulary, which Istio/Kiali dashboards read unchanged
    istio = {"reporter": "source", "destination_service_name": "benigno", "response_code": "200"}
    v2 = metric_value(text, "istio_requests_total", destination_version="v2", **istio)
    assert v2 == counts["v2"] and metric_value(text, "istio_requests_total", **istio) == n
    assert metric_value(text, "istio_response_bytes_count", **istio) == n
    assert metric_value(text, "istio_response_bytes_sum", **istio) == body_bytes
    assert metric_value(text, "istio_request_duration_milliseconds_count", **istio) == n


def test_round_robin_when_no_route_applies(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    _, _, eps = _two(upstream)
    sidecar = _start(plane, tmp_path, eps)
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    names = [client.name("http://benigno/hw2") for _ in range(20)]
    assert all(names[i] != names[i + 1] for i in range(19)), names
    # The Host header form reaches the same service.
    client2 = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    assert client2.name("/hw2", headers={"Host": "benigno:5000"}) in ("v1", "v2")


def test_http_route_match_rewrite_and_header_changes(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    _a, b, eps = _two(upstream)
    route = RouteConf(
        split=(Split(weight=1, service="benigno", tags=V1),),
        http=(
            HttpRoute(
                match=HttpMatch(path=StringMatch(kind="prefix", value="/canary/")),
                modify=HttpModify(
                    path=PathRewrite(prefix="/"),
                    request_headers=HeaderOps(add=(HeaderChange(name="x-route", value="canary"),)),
                    response_headers=HeaderOps(add=(HeaderChange(name="x-served-by", value="canary"),)),
                ),
                split=(Split(weight=1, service="benigno", tags=V2),),
            ),
        ),
    )
    dest = Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))
    sidecar = _start(plane, tmp_path, eps, {"benigno": dest})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    status, headers, body = client.get("http://benigno/canary/hw2?q=1")
    doc = json.loads(body)
    assert (status, doc["name"], doc["path"]) == (200, "v2", "/hw2?q=1")
    assert headers["x-served-by"] == "canary"
    assert b.seen_headers[-1]["x-route"] == "canary"
    assert b.seen_headers[-1]["x-meshc-source-service"] == "magnanimo"
    assert client.name("http://benigno/other") == "v1"


def test_ejection_after_consecutive_5xx_and_return(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, _b, eps = _two(upstream)
    cb = CircuitBreakerConf(
        base_ejection_time_ms=6000,
        max_ejection_percent=50,
        detectors=Detectors(total_errors=Consecutive(consecutive=3)),
    )
    dest = simple_destination("benigno", circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),))
    sidecar = _start(plane, tmp_path, eps, {"benigno": dest})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    a.status = 500

    def ejected() -> bool:
        client.get("http://benigno/x")
        return bool(sidecar.config()["hosts"][a.address]["ejected"])

    wait_until(ejected, "the failing host to be ejected")
    before = a.total()
    names = [client.name("http://benigno/x") for _ in range(10)]
    assert sidecar.config()["hosts"][a.address]["ejected"], (
        "ejection ended during the check; raise the base time"
    )
    assert names == ["v2"] * 10 and a.total() == before
    assert metric_value(sidecar.metrics(), "meshc_outlier_ejections_total", host=a.address) == 1
    a.status = 200
    wait_until(lambda: client.name("http://benigno/x") == "v1", "the ejected host to return")


def test_retry_succeeds_on_the_other_endpoint(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, _b, eps = _two(upstream)
    a.status = 503
    retry = RetryConf(
        http=HttpRetry(
            num_retries=1,
            back_off=BackOff(base_interval_ms=1, max_interval_ms=5),
            retry_on=("gateway_error",),
        )
    )
    dest = simple_destination("benigno", retry=(Rule[RetryConf](conf=retry),))
    sidecar = _start(plane, tmp_path, eps, {"benigno": dest})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    assert [client.name("http://benigno/x") for _ in range(10)] == ["v2"] * 10
    assert a.total() >= 1
    assert metric_value(sidecar.metrics(), "meshc_retries_total", destination_service="benigno") == a.total()
    # A small POST body is retried only when the policy names the method.
    status, _, _ = client.request("POST", "http://benigno/x", body=b"hello")
    assert status in (200, 503)


def test_timeout_answers_504_instead_of_hanging(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a = upstream("slow")
    dest = simple_destination("benigno", timeout=TimeoutConf(http_request_timeout_ms=300))
    sidecar = _start(plane, tmp_path, {"benigno": [(a.address, V1)]}, {"benigno": dest})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    status, headers, _body = client.get("http://benigno/hang")
    assert status == 504 and headers["x-meshc-reason"] == "upstream request timeout"
    a.release.set()
    assert client.name("http://benigno/fine") == "slow"


def test_no_traffic_to_a_host_failing_its_health_check(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, _b, eps = _two(upstream)
    a.health_status = 503
    hc = HealthCheckConf(
        interval_ms=100,
        timeout_ms=1000,
        unhealthy_threshold=2,
        healthy_threshold=1,
        http=HttpHealthCheck(path="/health"),
    )
    dest = simple_destination("benigno", health_check=(Rule[HealthCheckConf](conf=hc),))
    sidecar = _start(plane, tmp_path, eps, {"benigno": dest})
    wait_until(lambda: not sidecar.config()["hosts"][a.address]["healthy"], "the health check to fail")
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    before = a.total()
    assert [client.name("http://benigno/x") for _ in range(20)] == ["v2"] * 20
    assert a.total() == before
    assert metric_value(sidecar.metrics(), "meshc_health_checks_total", host=a.address, result="failure") >= 2
    a.health_status = 200
    wait_until(lambda: client.name("http://benigno/x") == "v1", "the host to pass its check again")


def test_split_target_without_endpoints_is_no_healthy_upstream(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a = upstream("v1")
    dest = simple_destination("benigno", [(1, {"version": "v3"})])
    sidecar = _start(plane, tmp_path, {"benigno": [(a.address, V1)]}, {"benigno": dest})
    status, _headers, body = ProxyClient(sidecar.outbound).get("http://benigno/x")  # type: ignore[arg-type]
    assert (status, body) == (503, b"no healthy upstream")


def test_connection_limit_overflow_is_503_at_once(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    import threading

    a = upstream("v1")
    a.hang.set()
    cb = CircuitBreakerConf(thresholds=Thresholds(max_connections=1, max_pending_requests=0, max_requests=1))
    dest = simple_destination("benigno", circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),))
    sidecar = _start(plane, tmp_path, {"benigno": [(a.address, V1)]}, {"benigno": dest})
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(ProxyClient(sidecar.outbound).get("http://benigno/x")[0])
    )  # type: ignore[arg-type]
    first.start()
    wait_until(lambda: a.total() == 1, "the first request to reach the app")
    status, headers, _ = ProxyClient(sidecar.outbound).get("http://benigno/y")  # type: ignore[arg-type]
    assert status == 503 and headers["x-meshc-reason"] == "upstream connection limit reached"
    a.hang.clear()
    a.release.set()
    first.join(60)
    assert results == [200]


def test_passthrough_http_and_connect(plane: Callable[..., Plane], upstream: Any, tmp_path: Path) -> None:
    outside = upstream("outside")
    sidecar = _start(plane, tmp_path, {})
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    assert client.name(f"http://{outside.address}/x") == "outside"
    sock, head = connect_tunnel(sidecar.outbound, outside.address)  # type: ignore[arg-type]
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(b"GET /tunnel HTTP/1.1\r\nHost: outside\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert b'"name": "outside"' in data


def test_before_any_configuration_outside_hosts_get_503_on_http_and_connect(
    plane: Callable[..., Plane], upstream: Any
) -> None:
    """One passthrough verdict for every protocol: with no Mesh yet nobody can tell a mesh host
    from an outside one, so HTTP and CONNECT both answer 503 (try again), never a 403."""
    outside = upstream("outside")
    sidecar = plane("--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    status, headers, _ = ProxyClient(sidecar.outbound).get(f"http://{outside.address}/x")  # type: ignore[arg-type]
    assert (status, headers["x-meshc-reason"]) == (503, "no configuration yet")
    sock, head = connect_tunnel(sidecar.outbound, outside.address)  # type: ignore[arg-type]
    sock.close()
    assert head.startswith(b"HTTP/1.1 503") and b"x-meshc-reason: no configuration yet" in head, head
    assert outside.total() == 0


def test_passthrough_refused_when_mesh_forbids(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    outside = upstream("outside")
    sidecar = _start(plane, tmp_path, {}, passthrough=False)
    status, headers, _ = ProxyClient(sidecar.outbound).get(f"http://{outside.address}/x")  # type: ignore[arg-type]
    assert status == 403 and "passthrough disabled" in headers["x-meshc-reason"]
    sock, head = connect_tunnel(sidecar.outbound, outside.address)  # type: ignore[arg-type]
    sock.close()
    assert head.startswith(b"HTTP/1.1 403") and b"x-meshc-reason: passthrough disabled" in head
    assert outside.total() == 0


def test_100mb_response_streams_with_bounded_memory(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    import http.client

    a = upstream("big")
    sidecar = _start(plane, tmp_path, {"benigno": [(a.address, V1)]})
    size = 100 * 1024 * 1024
    conn = http.client.HTTPConnection(*sidecar.outbound, timeout=120)  # type: ignore[misc]
    conn.request("GET", f"http://benigno/big/{size}")
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(1 << 20):
        got += len(chunk)
    conn.close()
    assert (resp.status, got) == (200, size)
    status = Path(f"/proc/{sidecar.pid()}/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    assert peak_kb < 150 * 1024, f"sidecar peaked at {peak_kb} kB while streaming 100 MB"


def test_traffic_log_writes_json_lines(plane: Callable[..., Plane], upstream: Any, tmp_path: Path) -> None:
    from runtime.bundle import LoggingBackend, TrafficLogConf

    a = upstream("v1")
    log = tmp_path / "access.log"
    conf = TrafficLogConf(backend=LoggingBackend(name="file", type="file", path=str(log)))
    dest = simple_destination("benigno", traffic_log=(Rule[TrafficLogConf](conf=conf),))
    sidecar = _start(plane, tmp_path, {"benigno": [(a.address, V1)]}, {"benigno": dest})
    assert ProxyClient(sidecar.outbound).get("http://benigno/logged")[0] == 200  # type: ignore[arg-type]
    line = wait_until(lambda: log.exists() and log.read_text().strip(), "an access log line")
    entry = json.loads(line.splitlines()[0])
    assert (entry["destination_service"], entry["path"], entry["response_code"]) == (
        "benigno",
        "/logged",
        200,
    )
    assert entry["upstream"] == a.address
