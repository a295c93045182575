"""The gRPC health check: its hand-made protobuf against the real one, and the checker against a
real grpcio server with the standard health service (SERVING passes; every other answer, an
unknown service, a refused connection and a silent peer fail), one HTTP/2 connection reused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_apps import CHANNEL_OPTIONS, SERVICE, EchoServer, method
from grpc_health.v1 import health_pb2
from hypothesis import given
from hypothesis import strategies as st
from runtime_harness import (
    HANG_DEADLINE,
    Plane,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime._hosts import HostRegistry
from runtime.bundle import GrpcHealthCheck, HealthCheckConf, Rule
from runtime.grpchealth import decode_response, encode_request
from runtime.healthcheck import HealthChecker
from runtime.metrics import Metrics


@given(st.text(max_size=300))
def test_request_encodes_as_protobuf_does(service: str) -> None:
    msg = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert encode_request(service) == b"\x00" + len(msg).to_bytes(4, "big") + msg


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_response_decodes_as_protobuf_encodes(status: int) -> None:
    msg = health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]
    assert decode_response(msg) == status
    # Fields this reader does not know (a newer message) are skipped, before and after.
    extra = b"\x12\x03abc" + b"\x1d\x00\x00\x00\x00" + b"\x19" + b"\x00" * 8 + b"\x20\x96\x01"
    assert decode_response(extra + msg + extra) == status


def test_truncated_response_is_an_error() -> None:
    with pytest.raises(ValueError):
        decode_response(b"\x08")
    with pytest.raises(ValueError):
        decode_response(b"\x12\x05ab")


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer("benigno")
    yield server
    server.close()


def _conf(service_name: str = SERVICE, timeout_ms: int = 5000, reuse: bool = True) -> HealthCheckConf:
    return HealthCheckConf(
        interval_ms=100,
        timeout_ms=timeout_ms,
        unhealthy_threshold=1,
        healthy_threshold=1,
        reuse_connection=reuse,
        grpc=GrpcHealthCheck(service_name=service_name),
    )


def _checks(address: str, confs: list[HealthCheckConf]) -> list[bool]:
    async def run() -> list[bool]:
        checker = HealthChecker(Metrics())
        host = HostRegistry().get(address)
        try:
            return [await checker.check(host, c, "benigno") for c in confs]
        finally:
            await checker.close()

    return asyncio.run(run())


def test_only_serving_passes(echo: EchoServer) -> None:
    assert _checks(echo.address, [_conf(), _conf("")]) == [True, True]
    for status in ("NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"):
        echo.set_health(status)
        assert _checks(echo.address, [_conf(), _conf("")]) == [False, True], status
    echo.set_health("SERVING")
    # An unknown service is NOT_FOUND (a non-zero grpc-status, trailers-only).
    assert _checks(echo.address, [_conf("no.Such"), _conf()]) == [False, True]


def test_one_connection_carries_the_checks(echo: EchoServer) -> None:
    """``reuse_connection``: the checks share one HTTP/2 connection."""
    seen: list[object] = []

    async def run() -> list[bool]:
        checker = HealthChecker(Metrics())
        host = HostRegistry().get(echo.address)
        try:
            out = []
            for status in ("SERVING", "NOT_SERVING", "SERVING"):
                echo.set_health(status)
                out.append(await checker.check(host, _conf(), "benigno"))
                (kept,) = checker._h2.values()
                seen.append(kept.writer.get_extra_info("sockname"))
            return out
        finally:
            await checker.close()

    assert asyncio.run(run()) == [True, False, True]
    assert len(set(seen)) == 1


def test_a_kept_connection_the_server_closed_is_not_a_failure() -> None:
    """The server ends the idle connection (GOAWAY, close: here its max connection age): the next
    check opens a new one and passes, instead of counting the closed connection against the host."""
    server = EchoServer(
        options=[("grpc.max_connection_age_ms", 1000), ("grpc.max_connection_age_grace_ms", 50)]
    )

    async def run() -> tuple[bool, bool, object, object]:
        checker = HealthChecker(Metrics())
        host = HostRegistry().get(server.address)
        try:
            first = await checker.check(host, _conf(), "benigno")
            (kept,) = checker._h2.values()
            end = asyncio.get_running_loop().time() + HANG_DEADLINE
            while not kept.reader._eof and asyncio.get_running_loop().time() < end:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            assert kept.reader._eof, "the server did not close the connection"  # type: ignore[attr-defined]
            second = await checker.check(host, _conf(), "benigno")
            (fresh,) = checker._h2.values()
            return (
                first,
                second,
                kept.writer.get_extra_info("sockname"),
                fresh.writer.get_extra_info("sockname"),
            )
        finally:
            await checker.close()

    try:
        first, second, old, new = asyncio.run(run())
    finally:
        server.close()
    assert (first, second) == (True, True)
    assert old != new


def test_refused_and_silent_peers_fail() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert _checks(refused, [_conf()]) == [False]
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"  # accepts (backlog), never answers
        assert _checks(address, [_conf(timeout_ms=200), _conf(timeout_ms=200, reuse=False)]) == [False, False]


# --- through sidecars: real processes --------------------------------------------------------------


def _grpc_mesh(tmp_path: Path) -> Path:
    hc = HealthCheckConf(
        interval_ms=100,
        timeout_ms=2000,
        unhealthy_threshold=2,
        healthy_threshold=1,
        grpc=GrpcHealthCheck(service_name=SERVICE),
    )
    dest = simple_destination("benigno", health_check=(Rule[HealthCheckConf](conf=hc),))
    return write_bundle(tmp_path, mesh_bundle(destinations={"benigno": dest}))


def test_grpc_health_check_ejects_a_not_serving_instance_and_takes_it_back(
    plane: Callable[..., Plane], tmp_path: Path
) -> None:
    """magnanimo's outbound sidecar checks benigno's two inbound sidecars (h2c), each in front of a
    grpcio app with the standard health service: NOT_SERVING takes v1 out, SERVING brings it back."""
    apps = {v: EchoServer(v) for v in ("v1", "v2")}
    try:
        mesh = _grpc_mesh(tmp_path)
        inbound: dict[str, str] = {}
        for v, app in apps.items():
            p = plane(
                "--service", "benigno", "--tag", f"version={v}", "--app", app.address,
                "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--mesh-bundle", mesh, "--bundle", write_bundle(tmp_path, service_bundle("benigno")),
            )  # fmt: skip
            assert p.inbound is not None
            inbound[v] = f"127.0.0.1:{p.inbound[1]}"
        eps = tmp_path / "eps.json"
        eps.write_text(
            endpoint_set(
                1, {"benigno": [(inbound[v], {"version": v}) for v in ("v1", "v2")]}
            ).model_dump_json()
        )
        sidecar = plane(
            "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--mesh-bundle", mesh, "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
            "--endpoints", eps,
        )  # fmt: skip
        assert sidecar.outbound is not None

        def passed(v: str) -> float:
            return metric_value(
                sidecar.metrics(), "meshc_health_checks_total", host=inbound[v], result="success"
            )

        def failed(v: str) -> float:
            return metric_value(
                sidecar.metrics(), "meshc_health_checks_total", host=inbound[v], result="failure"
            )

        def healthy(v: str) -> bool:
            return bool(sidecar.config()["hosts"][inbound[v]]["healthy"])

        host, port = sidecar.outbound
        options = [*CHANNEL_OPTIONS, ("grpc.default_authority", "benigno:5000")]
        with grpc.insecure_channel(f"{host}:{port}", options=options) as ch:
            unary = method(ch, "Unary")

            def names(n: int = 20) -> list[bytes]:
                return [unary(b"x", timeout=HANG_DEADLINE).split(b":")[0] for _ in range(n)]

            # SERVING: both pass their checks (through the inbound sidecars) and both get traffic.
            wait_until(lambda: passed("v1") >= 2 and passed("v2") >= 2, "both instances to pass checks")
            assert failed("v1") == failed("v2") == 0
            assert set(names()) == {b"v1", b"v2"}
            # NOT_SERVING: v1 fails its checks, is taken out, and v2 gets every call.
            apps["v1"].set_health("NOT_SERVING")
            wait_until(lambda: not healthy("v1"), "v1 to be unhealthy")
            before = apps["v1"].calls["Unary"]
            assert names() == [b"v2"] * 20
            assert apps["v1"].calls["Unary"] == before
            assert failed("v1") >= 2 and healthy("v2")
            # SERVING again: one passing check (healthyThreshold 1) brings v1 back.
            apps["v1"].set_health("SERVING")
            wait_until(lambda: healthy("v1"), "v1 to be healthy again")
            wait_until(lambda: b"v1" in names(4), "calls to reach v1 again")
    finally:
        for app in apps.values():
            app.close()
