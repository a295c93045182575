"""TCP services (CONNECT split, inbound L4), gateway mode, control-plane registration, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import (
    REPO,
    FakeControlPlane,
    Plane,
    ProxyClient,
    connect_tunnel,
    endpoint_set,
    mesh_bundle,
    metric_value,
    read_line,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    CatalogService,
    CircuitBreakerConf,
    GatewayBackend,
    GatewayConf,
    GatewayFilter,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    HeaderChange,
    Inbound,
    Rule,
    Split,
    StringMatch,
    Thresholds,
    TimeoutConf,
)

DB = {"db": CatalogService(port=5432, protocol="tcp", subsets=({"version": "a"}, {"version": "b"}))}


def _tcp_mesh(split: list[tuple[int, dict[str, str]]]) -> Any:
    return mesh_bundle(services=DB, destinations={"db": simple_destination("db", split)})


def _outbound(plane: Callable[..., Plane], tmp_path: Path, mesh: Any, eps: dict[str, Any]) -> Plane:
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(endpoint_set(1, eps).model_dump_json())
    return plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", ep_file,
    )  # fmt: skip


def test_tcp_split_per_connection(plane: Callable[..., Plane], tcp_echo: Any, tmp_path: Path) -> None:
    a, b = tcp_echo("a"), tcp_echo("b")
    mesh = _tcp_mesh([(90, {"version": "a"}), (10, {"version": "b"})])
    sidecar = _outbound(
        plane, tmp_path, mesh, {"db": [(a.address, {"version": "a"}), (b.address, {"version": "b"})]}
    )
    n = 600
    names: Counter[str] = Counter()
    for i in range(n):
        sock, head = connect_tunnel(sidecar.outbound, "db:5432")  # type: ignore[arg-type]
        assert head.startswith(b"HTTP/1.1 200"), head
        line, rest = read_line(sock, head.partition(b"\r\n\r\n")[2])
        names[line.decode()] += 1
        sock.sendall(f"ping {i}\n".encode())
        echo, _ = read_line(sock, rest)
        assert echo == f"ping {i}".encode()
        sock.close()
    p = names["b"] / n
    assert abs(p - 0.1) <= 5.3 * math.sqrt(0.09 / n), names


def test_tcp_through_an_inbound_sidecar(plane: Callable[..., Plane], tcp_echo: Any, tmp_path: Path) -> None:
    app = tcp_echo("db-app")
    mesh = _tcp_mesh([(1, {})])
    inbound = plane(
        "--service", "db", "--app", app.address, "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh),
        "--bundle", write_bundle(tmp_path, service_bundle("db")),
    )  # fmt: skip
    addr = f"127.0.0.1:{inbound.inbound[1]}"  # type: ignore[index]
    sidecar = _outbound(plane, tmp_path, mesh, {"db": [(addr, {})]})
    sock, head = connect_tunnel(sidecar.outbound, "db.mesh:5432")  # type: ignore[arg-type]
    line, rest = read_line(sock, head.partition(b"\r\n\r\n")[2])
    assert line == b"db-app"
    sock.sendall(b"x" * 300_000 + b"\n")
    echo, _ = read_line(sock, rest)
    sock.close()
    assert len(echo) == 300_000


def test_a_tcp_inbound_connection_limit_and_idle_timeout(
    plane: Callable[..., Plane], tcp_echo: Any, tmp_path: Path
) -> None:
    """A TCP service's inbound: its circuit breaker's limit refuses a second connection to the
    app (closed at once, counted as an overflow), and its idle timeout closes a silent one."""
    import socket
    import time

    app = tcp_echo("db-app")
    cb = CircuitBreakerConf(thresholds=Thresholds(max_connections=1, max_pending_requests=0, max_requests=1))
    inbound_rules = Inbound(
        circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),),
        timeout=(Rule[TimeoutConf](conf=TimeoutConf(tcp_idle_timeout_ms=400)),),
    )
    inbound = plane(
        "--service", "db", "--app", app.address, "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, _tcp_mesh([(1, {})])),
        "--bundle", write_bundle(tmp_path, service_bundle("db", inbound_rules)),
    )  # fmt: skip
    addr = ("127.0.0.1", inbound.inbound[1])  # type: ignore[index]
    first = socket.create_connection(addr, timeout=30)
    assert read_line(first)[0] == b"db-app"
    second = socket.create_connection(addr, timeout=30)
    assert second.recv(100) == b""  # refused: closed before any byte of the app's
    second.close()
    assert app.connections == 1
    wait_until(
        lambda: (
            metric_value(inbound.metrics(), "meshc_upstream_overflow_total", destination_service="db") == 1
        ),
        "the overflow to be counted",
    )
    start = time.monotonic()
    assert first.recv(100) == b""  # nothing sent for 0.4 s: the sidecar closes it
    assert 0.2 <= time.monotonic() - start < 10.0
    first.close()
    # The slot is free again once the first connection is over.
    third = wait_until(lambda: _greeting(addr), "a new connection to reach the app")
    assert third == b"db-app"


def _greeting(addr: tuple[str, int]) -> bytes:
    import socket

    with socket.create_connection(addr, timeout=30) as s:
        return read_line(s)[0] if s.recv(1, socket.MSG_PEEK) else b""


def test_gateway_routes_rewrites_filters_and_redirects(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    magnanimo, v1, v2 = upstream("magnanimo"), upstream("v1"), upstream("v2")
    rules = (
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="exact", value="/old")),),
            filters=(GatewayFilter(type="redirect", redirect_path="/new", redirect_status=301),),
        ),
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/route1")),),
            filters=(
                GatewayFilter(type="rewrite", rewrite_prefix="/"),
                GatewayFilter(type="request_header", set=(HeaderChange(name="x-gw", value="edge"),)),
                GatewayFilter(type="response_header", add=(HeaderChange(name="x-from", value="gateway"),)),
            ),
            backends=(GatewayBackend(weight=1, service="magnanimo"),),
        ),
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="regex", value="/b/.*")),),
            backends=(
                GatewayBackend(weight=1, service="benigno", tags={"version": "v1"}),
                GatewayBackend(weight=1, service="benigno", tags={"version": "v2"}),
            ),
        ),
    )
    gw = GatewayConf(listeners=(GatewayListener(port=8080, protocol="HTTP", rules=rules),))
    bundle = service_bundle("edge", gateway=gw)
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(
        endpoint_set(
            1,
            {
                "magnanimo": [(magnanimo.address, {})],
                "benigno": [(v1.address, {"version": "v1"}), (v2.address, {"version": "v2"})],
            },
        ).model_dump_json()
    )
    gateway = plane(
        "--bundle", write_bundle(tmp_path, bundle), "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--endpoints", ep_file, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        module="runtime.gateway",
    )  # fmt: skip
    listen = gateway.listening["listener:8080"].rpartition(":")
    client = ProxyClient((listen[0], int(listen[2])))
    status, headers, body = client.get("/route1/hw2?x=1")
    assert status == 200 and json.loads(body)["path"] == "/hw2?x=1" and headers["x-from"] == "gateway"
    assert magnanimo.seen_headers[-1]["x-gw"] == "edge"
    assert client.get("/route1")[0] == 200 and json.loads(client.get("/route1")[2])["path"] == "/"
    status, headers, _ = client.get("/old?q=2", headers={"Host": "edge.example"})
    # No scheme in the filter: the request's own scheme, as Envoy and the Gateway API keep it.
    assert (status, headers["location"]) == (301, "http://edge.example/new?q=2")
    status, headers, _ = client.get("/old", headers={"Host": "edge.example", "X-Forwarded-Proto": "https"})
    assert (status, headers["location"]) == (301, "https://edge.example/new")
    assert client.get("/route10")[0] == 404
    names = Counter(client.name("/b/x") for _ in range(400))
    assert abs(names["v2"] / 400 - 0.5) <= 5.3 * math.sqrt(0.25 / 400), names


def test_gateway_starts_without_a_bundle_and_binds_pushed_listeners(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """``meshc gateway --control-plane URL`` with nothing on disk: no listener until the first
    gateway bundle arrives; a reload that adds a listener binds it too."""
    magnanimo, benigno = upstream("magnanimo"), upstream("benigno")
    cp = FakeControlPlane()
    try:
        gateway = plane(
            "--service", "edge", "--control-plane", cp.url, "--insecure-admin", "--admin", "127.0.0.1:0",
            "--state-dir", tmp_path / "s", "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
            module="runtime.gateway",
        )  # fmt: skip
        assert not [k for k in gateway.listening if k.startswith("listener:")]
        assert not gateway.ready()

        def rule(prefix: str, service: str) -> GatewayRule:
            return GatewayRule(
                matches=(GatewayMatch(path=StringMatch(kind="prefix", value=prefix)),),
                backends=(GatewayBackend(weight=1, service=service),),
            )

        first = GatewayListener(port=8080, protocol="HTTP", rules=(rule("/m", "magnanimo"),))
        second = GatewayListener(port=9090, protocol="HTTP", rules=(rule("/b", "benigno"),))
        eps: dict[str, list[tuple[str, dict[str, str]]]] = {
            "magnanimo": [(magnanimo.address, {})],
            "benigno": [(benigno.address, {})],
        }
        assert gateway.push_endpoints(endpoint_set(1, eps))[0] == 200
        assert gateway.push_bundle(mesh_bundle(), generation=1)[0] == 200
        bundle = service_bundle("edge", gateway=GatewayConf(listeners=(first,)))
        assert gateway.push_bundle(bundle, generation=1)[0] == 200
        listening = gateway.config()["listening"]
        assert set(listening) == {"admin", "listener:8080"}, listening
        host, _, port = listening["listener:8080"].rpartition(":")
        assert ProxyClient((host, int(port))).name("/m/x") == "magnanimo"

        bundle = service_bundle("edge", gateway=GatewayConf(listeners=(first, second)))
        assert gateway.push_bundle(bundle, generation=2)[0] == 200
        listening = gateway.config()["listening"]
        assert set(listening) == {"admin", "listener:8080", "listener:9090"}, listening
        host, _, port = listening["listener:9090"].rpartition(":")
        assert ProxyClient((host, int(port))).name("/b/y") == "benigno"
        assert ProxyClient((host, int(port))).get("/m/x")[0] == 404  # each port has its own rules
        assert gateway.terminate() == 0

        # Restarted from its state dir: both listeners are bound before anything answers.
        again = plane(
            "--service", "edge", "--control-plane", cp.url, "--insecure-admin", "--admin", "127.0.0.1:0",
            "--state-dir", tmp_path / "s", "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
            module="runtime.gateway",
        )  # fmt: skip
        assert {"listener:8080", "listener:9090"} <= set(again.listening)
    finally:
        cp.close()


def test_gateway_without_bundle_or_control_plane_refuses_to_start(
    plane: Callable[..., Plane], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.gateway", "--service", "edge", "--admin", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs a service bundle with a gateway section" in proc.stderr


def test_gateway_mirror_copies_requests_at_the_percentage_and_never_changes_the_answer(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    main, shadow = upstream("main"), upstream("shadow")
    shadow.status = 500  # the mirror's answer must not reach the client

    def rule(prefix: str, percentage: float) -> GatewayRule:
        mirror = Split(weight=1, service="shadow")
        return GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value=prefix)),),
            filters=(GatewayFilter(type="mirror", mirror=mirror, mirror_percentage=percentage),),
            backends=(GatewayBackend(weight=1, service="main"),),
        )

    gw = GatewayConf(
        listeners=(GatewayListener(port=8080, protocol="HTTP", rules=(rule("/all", 100), rule("/half", 50))),)
    )
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(
        endpoint_set(1, {"main": [(main.address, {})], "shadow": [(shadow.address, {})]}).model_dump_json()
    )
    gateway = plane(
        "--bundle", write_bundle(tmp_path, service_bundle("edge", gateway=gw)),
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()), "--endpoints", ep_file,
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", module="runtime.gateway",
    )  # fmt: skip
    host, _, port = gateway.listening["listener:8080"].rpartition(":")
    client = ProxyClient((host, int(port)))
    for i in range(20):
        status, _, body = client.get(f"/all/{i}")
        assert status == 200 and json.loads(body)["name"] == "main"
    wait_until(lambda: shadow.total() >= 20, "20 mirrored requests")
    assert shadow.seen_headers[-1]["host"].endswith("-shadow")
    n = 1000
    for i in range(n):
        assert client.get(f"/half/{i}")[0] == 200
    # The decision is counted before the copy is sent: every counted copy arrives.
    mirrored = metric_value(gateway.metrics(), "meshc_gateway_mirrors_total", destination_service="shadow")
    wait_until(lambda: shadow.total() >= mirrored, f"{mirrored} mirrored requests")
    half = mirrored - 20
    assert abs(half / n - 0.5) <= 5.3 * math.sqrt(0.25 / n), half
    assert main.total() == 20 + n


def test_registers_heartbeats_and_deregisters(plane: Callable[..., Plane], tmp_path: Path) -> None:
    cp = FakeControlPlane()
    try:
        sidecar = plane(
            "--service", "magnanimo", "--tag", "version=v1", "--outbound", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--control-plane", cp.url, "--state-dir", tmp_path / "s",
            "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
            "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        )  # fmt: skip
        wait_until(lambda: cp.paths().count("/api/v1/heartbeat") >= 2, "heartbeats")
        path, reg = cp.calls[0]
        assert path == "/api/v1/register"
        assert reg["service"] == "magnanimo" and reg["tags"] == {"version": "v1"}
        assert reg["admin_address"] == sidecar.listening["admin"]
        beat = next(b for p, b in cp.calls if p == "/api/v1/heartbeat")
        assert beat["instance"] == "magnanimo-1" and set(beat["running"]) == {"mesh", "service"}
        assert sidecar.terminate() == 0
        assert cp.calls[-1] == ("/api/v1/deregister", {"instance": "magnanimo-1"})
    finally:
        cp.close()


def test_serves_while_control_plane_is_down(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app = upstream("v1")
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(endpoint_set(1, {"benigno": [(app.address, {"version": "v1"})]}).model_dump_json())
    sidecar = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--control-plane", "http://127.0.0.1:9", "--endpoints", ep_file,
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
    )  # fmt: skip
    assert sidecar.ready()
    assert ProxyClient(sidecar.outbound).name("http://benigno/x") == "v1"  # type: ignore[arg-type]
    wait_until(lambda: "retrying" in sidecar.stderr(), "a logged registration retry")
    assert sidecar.terminate() == 0


def test_cli_usage_errors_exit_2_and_imports_stay_lean() -> None:
    code = (
        "import sys\n"
        "from runtime.cli import sidecar_main, gateway_main\n"
        "assert sidecar_main(['--tag', 'oops']) == 2\n"
        "assert sidecar_main(['--service', 's', '--tag', 'novalue']) == 2\n"
        "assert sidecar_main(['--service', 's', '--inbound', '127.0.0.1:1']) == 2\n"
        "assert gateway_main(['--listen', 'nonsense']) == 2\n"
        "import runtime.server\n"
        "assert not [m for m in sys.modules if m == 'compiler' or m.startswith('compiler.')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dataplane", ["fast"], indirect=True)  # issue 7's budget is the fast path's
def test_idle_sidecar_rss_stays_under_60_mb(plane: Callable[..., Plane], tmp_path: Path) -> None:
    sidecar = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
    )  # fmt: skip
    status = Path(f"/proc/{sidecar.pid()}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    assert rss_kb < 60 * 1024, f"idle RSS {rss_kb} kB"


@pytest.mark.parametrize("dataplane", ["fast"], indirect=True)  # about the fast path's imports
def test_idle_registered_sidecar_rss_stays_under_60_mb_without_aiohttp(
    plane: Callable[..., Plane], tmp_path: Path
) -> None:
    """With a control plane (registered, heartbeating, pushed to over the admin API), the fast
    path's sidecar loads no aiohttp: the admin API and the control-plane client are plain asyncio."""
    cp = FakeControlPlane()
    try:
        sidecar = plane(
            "--service", "magnanimo", "--app", "127.0.0.1:9", "--inbound", "127.0.0.1:0",
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--control-plane", cp.url,
            "--insecure-admin", "--state-dir", tmp_path / "s",
            "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
            "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        )  # fmt: skip
        wait_until(lambda: cp.paths().count("/api/v1/heartbeat") >= 2, "heartbeats")
        assert sidecar.push_endpoints(endpoint_set(2, {"benigno": [("127.0.0.1:9", {})]}))[0] == 200
        assert sidecar.ready() and "meshc_" in sidecar.metrics()
        maps = Path(f"/proc/{sidecar.pid()}/maps").read_text()
        assert "aiohttp" not in maps and "multidict" not in maps, "aiohttp was loaded"
        status = Path(f"/proc/{sidecar.pid()}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        assert rss_kb < 60 * 1024, f"idle RSS {rss_kb} kB"
        assert sidecar.terminate() == 0
        assert cp.calls[-1] == ("/api/v1/deregister", {"instance": "magnanimo-1"})
    finally:
        cp.close()
