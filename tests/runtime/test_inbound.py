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
    write_bundle,
)

from runtime.bundle import (
    FaultAbort,
    FaultDelay,
    FaultInjectionConf,
    HeaderChange,
    Inbound,
    RateLimitConf,
    Rule,
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
