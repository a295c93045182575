"""Tracing through real data plane processes: ``traceparent`` across two sidecars, the trace id
in access logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime_harness import (
    Plane,
    ProxyClient,
    endpoint_set,
    mesh_bundle,
    service_bundle,
    simple_destination,
    wait_until,
)
from runtime_harness import write_bundle as write

from runtime.bundle import LoggingBackend, MeshBundle, Rule, TrafficLogConf
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
