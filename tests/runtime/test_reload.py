"""Pushes, NACKs, hitless reloads under load, restart from the state dir, SIGTERM drain."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import (
    Plane,
    ProxyClient,
    Upstream,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime.bundle import MAX_BUNDLE_BYTES, TimeoutConf, bundle_bytes, bundle_digest

V1 = {"version": "v1"}
V2 = {"version": "v2"}


def _mesh_to(subset: dict[str, str], timeout_ms: int = 15000) -> Any:
    return mesh_bundle(
        destinations={
            "benigno": simple_destination(
                "benigno", [(1, subset)], TimeoutConf(http_request_timeout_ms=timeout_ms)
            )
        }
    )


def _sidecar(plane: Callable[..., Plane], tmp_path: Path, a: Upstream, b: Upstream, *extra: Any) -> Plane:
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"benigno": [(a.address, V1), (b.address, V2)]}).model_dump_json())
    return plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", tmp_path / "state",
        "--mesh-bundle", write_bundle(tmp_path, _mesh_to(V1)),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", eps, *extra,
    )  # fmt: skip


def _bad_pushes() -> list[tuple[str, bytes, str | None, str | None, int, str]]:
    good = bundle_bytes(_mesh_to(V2))
    doc = json.loads(good)
    wrong_schema = json.dumps({**doc, "passthrough": "maybe"}).encode()
    unknown_format = json.dumps({**doc, "format": 2}).encode()
    other_service = bundle_bytes(service_bundle("someone-else"))
    big = b" " * (MAX_BUNDLE_BYTES + 1)
    return [
        ("bad JSON", b"{not json", None, "mesh", 400, "not JSON"),
        ("schema violation", wrong_schema, None, "mesh", 400, "schema"),
        ("unknown format", unknown_format, None, "mesh", 400, "unknown bundle format"),
        ("digest mismatch", good, "0" * 64, "mesh", 400, "digest mismatch"),
        ("oversize", big, None, "mesh", 413, "limit"),
        ("missing digest", good, "", "mesh", 400, "missing"),
        ("role mismatch", good, None, "service", 400, "mesh bundle"),
        ("another service's bundle", other_service, None, "service", 400, "this data plane is"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_pushes())), ids=[c[0] for c in _bad_pushes()])
def test_bad_push_is_nacked_and_old_bundle_keeps_serving(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, case: int
) -> None:
    a, b = upstream("v1"), upstream("v2")
    sidecar = _sidecar(plane, tmp_path, a, b)
    before = sidecar.config()["bundles"]["mesh"]["digest"]
    _, data, digest, role, status, reason = _bad_pushes()[case]
    got_status, reply = sidecar.push(
        data, digest=digest if digest is not None else bundle_digest(data), role=role
    )
    assert got_status == status and reason in reply["nack"], reply
    assert sidecar.config()["bundles"]["mesh"]["digest"] == before
    assert ProxyClient(sidecar.outbound).name("http://benigno/x") == "v1"  # type: ignore[arg-type]
    assert metric_value(sidecar.metrics(), "meshc_reloads_total", result="nack") == 1


def test_push_swaps_config_and_generations_only_grow(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, b = upstream("v1"), upstream("v2")
    sidecar = _sidecar(plane, tmp_path, a, b)
    client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
    assert client.name("http://benigno/x") == "v1"
    mesh_v2 = _mesh_to(V2)
    status, reply = sidecar.push_bundle(mesh_v2, generation=5)
    digest = bundle_digest(bundle_bytes(mesh_v2))
    assert (status, reply) == (200, {"ack": digest})
    assert client.name("http://benigno/x") == "v2"
    assert f'meshc_bundle_info{{digest="{digest}",role="mesh"}} 1.0' in sidecar.metrics()
    status, reply = sidecar.push_bundle(_mesh_to(V1), generation=4)
    assert status == 409 and "stale generation" in reply["nack"]
    assert client.name("http://benigno/x") == "v2"
    # Endpoints: a new set replaces the old; an older generation is refused.
    c = upstream("v2-bis")
    status, _ = sidecar.push_endpoints(endpoint_set(7, {"benigno": [(c.address, V2)]}))
    assert status == 200 and client.name("http://benigno/x") == "v2-bis"
    status, reply = sidecar.push_endpoints(endpoint_set(6, {"benigno": [(b.address, V2)]}))
    assert status == 409
    status, reply = sidecar.push_endpoints(endpoint_set(8, {"benigno": [("not-an-address", V2)]}))
    assert status == 400 and client.name("http://benigno/x") == "v2-bis"


def test_100_reloads_under_continuous_load_fail_no_request(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, b = upstream("v1"), upstream("v2")
    sidecar = _sidecar(plane, tmp_path, a, b)
    stop = threading.Event()
    failures: list[Any] = []
    done = [0, 0, 0]

    def load(i: int) -> None:
        client = ProxyClient(sidecar.outbound)  # type: ignore[arg-type]
        while not stop.is_set():
            try:
                status, _, body = client.get("http://benigno/x")
                if status != 200:
                    failures.append((status, body))
            except OSError as e:
                failures.append(repr(e))
            done[i] += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for gen in range(1, 101):
            # Alternate the route and the timeouts, so every push is a real change.
            bundle = _mesh_to(V2 if gen % 2 else V1, timeout_ms=10_000 + gen)
            status, reply = sidecar.push_bundle(bundle, generation=gen)
            assert status == 200, reply
            if gen % 10 == 0:
                eps = endpoint_set(gen, {"benigno": [(a.address, V1), (b.address, V2)]})
                assert sidecar.push_endpoints(eps)[0] == 200
            target = sum(done) + 3
            wait_until(lambda t=target: sum(done) >= t, "requests to flow between reloads")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert sum(done) > 300
    assert metric_value(sidecar.metrics(), "meshc_reloads_total", kind="mesh", result="ack") == 100


def test_restart_serves_from_state_dir_without_control_plane(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, b = upstream("v1"), upstream("v2")
    sidecar = _sidecar(plane, tmp_path, a, b)
    assert sidecar.push_bundle(_mesh_to(V2), generation=3)[0] == 200
    assert sidecar.terminate() == 0
    state = tmp_path / "state"
    assert (state / "state.json").exists()
    assert sorted(p.name for p in (state / "bundles").iterdir()) == sorted(
        f"{s['digest']}.json" for s in json.loads((state / "state.json").read_text())["slots"].values()
    )
    # No bundle flags, no control plane: the state dir alone.
    again = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", state,
    )  # fmt: skip
    assert ProxyClient(again.outbound).name("http://benigno/x") == "v2"  # type: ignore[arg-type]
    assert again.config()["bundles"]["mesh"]["generation"] == 3
    # A restart with the original files still prefers the newer pushed bundle.
    assert again.terminate() == 0
    third = _sidecar(plane, tmp_path, a, b)
    assert ProxyClient(third.outbound).name("http://benigno/x") == "v2"  # type: ignore[arg-type]


def test_sigterm_drains_in_flight_requests_and_exits_0(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    a, b = upstream("v1"), upstream("v2")
    sidecar = _sidecar(plane, tmp_path, a, b, "--drain-seconds", "30")
    a.hang.set()
    results: list[Any] = []
    t = threading.Thread(
        target=lambda: results.append(ProxyClient(sidecar.outbound).get("http://benigno/slow"))
    )  # type: ignore[arg-type]
    t.start()
    wait_until(lambda: a.total() == 1, "the request to reach the app")
    exit_code: list[int] = []
    killer = threading.Thread(target=lambda: exit_code.append(sidecar.terminate()))
    killer.start()
    wait_until(lambda: sidecar.event("draining"), "the sidecar to start draining")
    assert exit_code == []  # still waiting for the request in flight
    a.release.set()
    t.join(60)
    killer.join(60)
    assert results and results[0][0] == 200 and json.loads(results[0][2])["name"] == "v1"
    assert exit_code == [0]
