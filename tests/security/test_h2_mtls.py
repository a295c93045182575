"""gRPC (HTTP/2) between sidecars over the mesh's mutual TLS, with a real control plane, real
sidecar processes and a real grpcio client and server.

    grpc client --h2c--> magnanimo v1 sidecar --h2 over mTLS (ALPN)--> benigno sidecar --h2c--> app
    grpc client --h2c--> magnanimo v2 sidecar --> benigno: no TrafficPermission: PERMISSION_DENIED
    magnanimo v1 sidecar --grpc.health.v1.Health/Check, h2 over mTLS--> benigno sidecar --> app

The inbound listener offers ``h2`` and ``http/1.1`` by ALPN: a caller offering only HTTP/1.1 is
served HTTP/1.1 on the same port.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_apps import CHANNEL_OPTIONS, EchoServer, method  # tests/runtime, put on the path by secure_mesh
from secure_mesh import (
    HANG_DEADLINE,
    ControlPlaneProc,
    Plane,
    metric_value,
    ready_with_certificate,
    start_sidecar,
    wait_until,
    write_policies,
)

from compiler.ca import MeshCA, TokenIssuer
from runtime.identity import Identity, client_context, make_csr, new_private_key

DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))

RETRY = """\
apiVersion: kuma.io/v1alpha1
kind: Retry
mesh: default
metadata: {name: benigno-grpc-retry}
spec:
  sources: [{match: {kuma.io/service: magnanimo}}]
  destinations: [{match: {kuma.io/service: benigno}}]
  conf:
    grpc: {numRetries: 3, retryOn: [unavailable]}
"""

GRPC_HEALTH_CHECK = """\
apiVersion: kuma.io/v1alpha1
kind: MeshHealthCheck
metadata: {name: benigno-grpc-health, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshSubset, tags: {kuma.io/service: magnanimo, version: v1}}
  to:
    - targetRef: {kind: MeshService, name: benigno}
      default:
        interval: 200ms
        timeout: 5s
        unhealthyThreshold: 1
        healthyThreshold: 1
        grpc: {serviceName: test.Echo}
"""
"""From magnanimo v1 only: v2 may not call benigno, so its checks would all be refused."""


@dataclass
class GrpcMesh:
    cp: ControlPlaneProc
    app: EchoServer
    planes: dict[str, Plane]

    def channel(self, name: str) -> grpc.Channel:
        out = self.planes[name].outbound
        assert out is not None
        return grpc.insecure_channel(
            f"{out[0]}:{out[1]}", options=[*CHANNEL_OPTIONS, ("grpc.default_authority", "benigno:5000")]
        )

    def identity(self, service: str, tags: dict[str, str]) -> Identity:
        ca = MeshCA.builtin(self.cp.secrets, "default")
        key = new_private_key()
        cert = ca.issue(make_csr(key, "default", service, tags), service, tags, dt.timedelta(minutes=10))
        return Identity(key, cert, ca.cert_pem)


@pytest.fixture(scope="module", params=DATAPLANES)
def grpc_mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcMesh]:
    dataplane: str = request.param
    work = tmp_path_factory.mktemp(f"grpc-mesh-{dataplane}")
    policies = work / "policies"
    write_policies(policies)
    (policies / "health-check.yaml").write_text(GRPC_HEALTH_CHECK)  # not the HTTP/1.1 check
    (policies / "retry.yaml").write_text(RETRY)
    cp = ControlPlaneProc(policies, work)
    app = EchoServer("benigno")
    planes: dict[str, Plane] = {}
    try:
        (work / "cp-state").mkdir()
        tokens = TokenIssuer(cp.secrets)
        cp.start()
        for name, service, tags in (
            ("benigno", "benigno", {"version": "v1"}),
            ("magnanimo-v1", "magnanimo", {"version": "v1"}),
            ("magnanimo-v2", "magnanimo", {"version": "v2"}),
        ):
            token = tokens.mint("default", service)
            planes[name] = start_sidecar(work, cp, name, service, tags, dataplane, app.address, token)
        for plane in planes.values():
            wait_until(
                lambda p=plane: ready_with_certificate(p, 1), "sidecars with certificates and endpoints"
            )
        yield GrpcMesh(cp, app, planes)
    finally:
        for p in planes.values():
            p.close()
        cp.stop()
        app.close()


def test_grpc_over_mtls_unary_and_streams(grpc_mesh: GrpcMesh) -> None:
    with grpc_mesh.channel("magnanimo-v1") as ch:
        assert method(ch, "Unary")(b"hi", timeout=HANG_DEADLINE) == b"benigno:hi"
        streamed = list(method(ch, "Stream", "unary_stream")(b"20", timeout=HANG_DEADLINE))
        assert len(streamed) == 20 and streamed[-1].startswith(b"19:")
        chunks = iter([b"z" * 50_000] * 40)
        assert method(ch, "Collect", "stream_unary")(chunks, timeout=HANG_DEADLINE) == b"2000000"
    # The caller's name comes from its certificate, and the hop was mutual TLS.
    assert grpc_mesh.app.metadata[-1]["x-meshc-source-service"] == "magnanimo"
    benigno = grpc_mesh.planes["benigno"].metrics()
    assert metric_value(benigno, "meshc_inbound_connections_total", tls="mtls", result="accepted") >= 1
    assert (
        metric_value(benigno, "istio_requests_total", grpc_response_status="0", reporter="destination") >= 3
    )


def test_grpc_over_mtls_errors_deadline_retry_and_permission(grpc_mesh: GrpcMesh) -> None:
    with grpc_mesh.channel("magnanimo-v1") as ch:
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Missing")(b"", timeout=HANG_DEADLINE)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # trailers-only, relayed as it is
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Slow")(b"", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert method(ch, "Flaky")(b"mtls", timeout=HANG_DEADLINE) == b"ok:mtls"
        assert grpc_mesh.app.calls["Flaky:mtls"] == 2  # UNAVAILABLE once, retried by the mesh
    before = grpc_mesh.app.calls["Unary"]
    with grpc_mesh.channel("magnanimo-v2") as ch:
        with pytest.raises(grpc.RpcError) as err:
            method(ch, "Unary")(b"x", timeout=HANG_DEADLINE)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no TrafficPermission allows magnanimo" in (err.value.details() or "")
    assert grpc_mesh.app.calls["Unary"] == before


def test_inbound_alpn_offers_h2_and_falls_back_to_http11(grpc_mesh: GrpcMesh) -> None:
    inbound = grpc_mesh.planes["benigno"].inbound
    assert inbound is not None
    caller = grpc_mesh.identity("magnanimo", {"version": "v1"})

    def negotiate(offer: list[str]) -> tuple[str | None, bytes]:
        ctx = client_context(caller)
        ctx.set_alpn_protocols(offer)
        with (
            socket.create_connection(inbound, timeout=HANG_DEADLINE) as raw,
            ctx.wrap_socket(raw, server_hostname="benigno") as tls,
        ):
            chosen = tls.selected_alpn_protocol()
            if chosen == "http/1.1":
                tls.sendall(b"GET /hello HTTP/1.1\r\nhost: benigno\r\nconnection: close\r\n\r\n")
                return chosen, tls.recv(12)
            return chosen, b""

    assert negotiate(["h2", "http/1.1"])[0] == "h2"
    chosen, first = negotiate(["http/1.1"])
    assert chosen == "http/1.1" and first.startswith(b"HTTP/1.1 ")  # answered in HTTP/1.1


def test_grpc_health_checks_over_mtls(grpc_mesh: GrpcMesh) -> None:
    """The checks go over the mesh's mTLS with ALPN h2 (STRICT refuses anything else) and the
    inbound sidecar relays them to the app's health service: NOT_SERVING marks benigno unhealthy
    in magnanimo v1's sidecar, SERVING makes it healthy again."""
    v1 = grpc_mesh.planes["magnanimo-v1"]

    inbound = grpc_mesh.planes["benigno"].inbound
    assert inbound is not None
    address = f"{inbound[0]}:{inbound[1]}"

    def count(result: str) -> float:
        return metric_value(v1.metrics(), "meshc_health_checks_total", host=address, result=result)

    def healthy() -> bool:
        return bool(v1.config()["hosts"][address]["healthy"])

    wait_until(lambda: count("success") >= 2, "gRPC health checks passing over mTLS")
    assert count("failure") == 0 and healthy()
    benigno = grpc_mesh.planes["benigno"].metrics()
    assert metric_value(benigno, "meshc_inbound_connections_total", tls="plaintext", result="accepted") == 0
    try:
        grpc_mesh.app.set_health("NOT_SERVING")
        wait_until(lambda: not healthy(), "benigno to be unhealthy")
        assert count("failure") >= 1
    finally:
        grpc_mesh.app.set_health("SERVING")
    wait_until(healthy, "benigno to be healthy again")
