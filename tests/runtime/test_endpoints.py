"""Per-service endpoint sets, scoped and pushed as deltas (``runtime.endpoints``, issue 11).

Pure checks of applying a push and of the control plane's plans first; then real processes (a
control plane on a temp policy dir, sidecars of each HTTP data plane, real apps): an instance
that joins re-sends its service's endpoints only to the data planes that reach it, a sidecar
that lacks a destination's endpoints fetches them on demand and the request succeeds, a bad
endpoint push is NACKed and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import Plane, Upstream, metric_value, wait_until
from secure_mesh import ControlPlaneProc
from test_pieces import DeltaMesh, _policies, _synced, outbound_name

from compiler.ca import PushSigner, TokenIssuer
from compiler.controlplane.endpoints import EndpointPlans, MeshEndpoints
from compiler.controlplane.registry import DataPlane, Registry
from runtime.endpoints import EndpointsRefused, apply, running_digest
from runtime.protocol import (
    HDR_GENERATION,
    HDR_SIGNATURE,
    Endpoint,
    EndpointSet,
    PushTarget,
    Registration,
    endpoints_digest,
)

DATAPLANE_CHOSEN_BY_TEST = True
DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
pytestmark = pytest.mark.timeout(600)


def _ep(address: str, **tags: str) -> Endpoint:
    return Endpoint(address=address, tags=tags)


# --- pure: the plans and applying them ----------------------------------------------------------


def _plans() -> tuple[EndpointPlans, DataPlane]:
    reg = Registration(service="caller", admin_address="127.0.0.1:7001", pieces=True, endpoint_deltas=True)
    return EndpointPlans(), Registry().register(reg)


def test_a_delta_carries_what_changed_and_applies_to_the_whole_set() -> None:
    plans, dp = _plans()
    scope = frozenset({"alpha", "beta"})
    one = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")], "gamma": [_ep("127.0.0.1:3")]})
    want = plans.desired(dp, one, scope)
    body, picked = plans.body(dp, one, scope, 5, None)
    first = EndpointSet.model_validate_json(body)
    assert first.base is None and first.scoped and set(first.services) == {"alpha", "beta"}
    assert first.services["beta"] == []  # in scope, no instance: held, and empty
    whole, digests = apply(None, None, first)
    assert running_digest(whole) == want == first.digest
    plans.acked(dp, picked, want)
    # beta gets an instance, gamma (out of scope) another: the delta carries beta only.
    two = MeshEndpoints(
        {"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:2")], "gamma": [_ep("127.0.0.1:4")]}, one
    )
    assert two.changed == {"beta", "gamma"}
    body2, picked2 = plans.body(dp, two, scope, 6, want)
    delta = EndpointSet.model_validate_json(body2)
    assert delta.base == want and set(delta.services) == {"beta"} and b"127.0.0.1:1" not in body2
    after, _ = apply(whole, digests, delta)
    assert after.services == {"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:2")]}
    assert running_digest(after) == plans.desired(dp, two, scope)
    # Out of scope: beta removed from it.
    plans.acked(dp, picked2, running_digest(after))
    body3, _ = plans.body(dp, two, frozenset({"alpha"}), 7, running_digest(after))
    third, _ = apply(after, None, EndpointSet.model_validate_json(body3))
    assert set(third.services) == {"alpha"} and json.loads(body3)["removed"] == ["beta"]


def test_apply_refuses_what_does_not_add_up() -> None:
    plans, dp = _plans()
    eps = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")]})
    body, _ = plans.body(dp, eps, frozenset({"alpha"}), 1, None)
    whole, digests = apply(None, None, EndpointSet.model_validate_json(body))
    doc = json.loads(body)
    forged = EndpointSet.model_validate({**doc, "services": {"alpha": [{"address": "127.0.0.1:666"}]}})
    with pytest.raises(EndpointsRefused, match="digest mismatch") as e:
        apply(whole, digests, forged)
    assert e.value.status == 400
    with pytest.raises(EndpointsRefused) as e:
        apply(whole, digests, EndpointSet.model_validate({**doc, "base": "0" * 64}))
    assert e.value.status == 422
    with pytest.raises(EndpointsRefused, match="without a base"):
        apply(whole, digests, EndpointSet.model_validate({**doc, "removed": ["alpha"]}))
    with pytest.raises(EndpointsRefused, match="must name its digest"):
        apply(whole, digests, EndpointSet(generation=2, services={}, scoped=True))
    # The older form is taken as it is, and reports the whole set's digest.
    old = EndpointSet(generation=3, services={"alpha": [_ep("127.0.0.1:1")]})
    assert running_digest(apply(whole, digests, old)[0]) == endpoints_digest(old.services)
    assert (
        old.model_dump_json()
        == '{"generation":3,"services":{"alpha":[{"address":"127.0.0.1:1","tags":{},"healthy":true}]}}'
    )


def test_data_planes_without_per_service_endpoints_get_the_whole_set_as_before() -> None:
    registry = Registry()
    old = registry.register(Registration(service="caller", admin_address="127.0.0.1:7002", pieces=True))
    eps = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:2")]})
    plans = EndpointPlans()
    body, picked = plans.body(old, eps, frozenset({"alpha"}), 9, None)
    assert picked is None
    assert body == EndpointSet(generation=9, services=eps.services).model_dump_json().encode()
    assert plans.desired(old, eps, frozenset({"alpha"})) == endpoints_digest(eps.services)


# --- real processes ----------------------------------------------------------------------------


def _route_gamma_to_beta(d: Path) -> None:
    """A mesh-wide route: any caller's requests to gamma go to beta (a split target that a
    sidecar which fetched gamma on demand does not hold the endpoints of)."""
    (d / "gamma-route.yaml").write_text(
        """\
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata: {name: any-to-gamma}
spec:
  sources: [{match: {kuma.io/service: "*"}}]
  destinations: [{match: {kuma.io/service: gamma}}]
  conf: {split: [{weight: 100, destination: {kuma.io/service: beta}}]}
"""
    )


@pytest.fixture(scope="module", params=DATAPLANES)
def eps_mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeltaMesh]:
    work = tmp_path_factory.mktemp(f"eps-{request.param}")
    policies = work / "policies"
    _policies(policies)
    _route_gamma_to_beta(policies)
    (work / "cp-state").mkdir()
    cp = ControlPlaneProc(policies, work)
    tokens = TokenIssuer(cp.secrets)
    mesh = DeltaMesh(work, policies, cp, tokens, request.param, Upstream("beta-app"), Upstream("outside"), {})
    try:
        cp.start()
        planes = [
            mesh.start("beta", "beta"),
            mesh.start("caller", "caller"),  # its policies name alpha
            mesh.start("other", "svc-000"),  # its policies name nothing
            mesh.start("legacy", "svc-001", "--full-mesh-bundle"),  # the whole set, as before
        ]
        wait_until(lambda: all(_synced(mesh, p) for p in planes), "four sidecars SYNCED")
        yield mesh
    finally:
        for p in mesh.planes.values():
            p.close()
        cp.stop()
        mesh.beta_app.close()
        mesh.outside.close()


def _endpoints(plane: Plane) -> dict[str, Any]:
    eps: dict[str, Any] = plane.config()["endpoints"] or {}
    return eps


def _pushes(plane: Plane) -> tuple[float, float]:
    m = plane.metrics()
    return (
        metric_value(m, "meshc_reloads_total", kind="endpoints", result="ack"),
        metric_value(m, "meshc_push_received_bytes_total", slot="endpoints"),
    )


def test_an_instance_joining_is_pushed_only_to_the_data_planes_that_reach_it(eps_mesh: DeltaMesh) -> None:
    caller, other, legacy = (eps_mesh.planes[n] for n in ("caller", "other", "legacy"))
    assert set(_endpoints(caller)["services"]) == {"alpha"} and _endpoints(caller)["scoped"]
    assert _endpoints(caller)["services"]["alpha"] == []
    assert _endpoints(other)["services"] == {} and _endpoints(other)["scoped"]
    assert "beta" in _endpoints(legacy)["services"] and not _endpoints(legacy).get("scoped")
    before = {n: _pushes(eps_mesh.planes[n]) for n in ("caller", "other", "legacy")}
    alpha = eps_mesh.start("alpha", "alpha")
    wait_until(lambda: _synced(eps_mesh, alpha), "alpha SYNCED")
    address = alpha.config()["listening"]["inbound"]
    wait_until(
        lambda: (
            [e["address"] for e in _endpoints(caller)["services"]["alpha"]] == [address]
            and _synced(eps_mesh, caller)
        ),
        "caller to hold alpha's new instance",
    )
    wait_until(lambda: "alpha" in _endpoints(legacy)["services"], "the legacy sidecar to hold it")
    acks, received = _pushes(caller)
    assert acks == before["caller"][0] + 1
    # One push to caller: a delta carrying alpha's list only (no other service on the wire).
    one = received - before["caller"][1]
    assert 0 < one < 700, one
    # The legacy sidecar got the whole mesh's set again; the one that does not reach alpha, nothing.
    whole = _pushes(legacy)[1] - before["legacy"][1]
    assert whole > one
    assert _pushes(other) == before["other"]
    assert "alpha" not in _endpoints(other)["services"]


def test_a_sidecar_fetches_a_destinations_endpoints_on_demand(eps_mesh: DeltaMesh) -> None:
    caller = eps_mesh.planes["caller"]
    assert "beta" not in _endpoints(caller)["services"]
    assert outbound_name(caller, "beta") == "beta-app"  # the piece and the endpoints, on demand
    assert "beta" in _endpoints(caller)["services"]
    wait_until(lambda: _synced(eps_mesh, caller), "caller SYNCED after the fetch")
    # gamma's piece routes to beta, which other does not hold either: both come, and it succeeds.
    other = eps_mesh.planes["other"]
    assert not {"beta", "gamma"} & set(_endpoints(other)["services"])
    assert outbound_name(other, "gamma") == "beta-app"
    assert {"beta", "gamma"} <= set(_endpoints(other)["services"])
    wait_until(lambda: _synced(eps_mesh, other), "other SYNCED after the fetch")


def _target(plane: Plane) -> PushTarget:
    cfg = plane.config()
    return PushTarget(cfg["mesh"], cfg["service"], cfg["instance"], cfg["boot_id"])


def test_a_bad_endpoint_push_is_nacked_and_nothing_changes(eps_mesh: DeltaMesh) -> None:
    caller = eps_mesh.planes["caller"]
    key = PushSigner(eps_mesh.cp.secrets)  # the control plane's own key: the signature is good
    before = _endpoints(caller)
    gen = int(before["generation"]) + 1_000_000
    nacks = metric_value(caller.metrics(), "meshc_reloads_total", kind="endpoints", result="nack")
    held = EndpointSet.model_validate(before)

    def put(doc: dict[str, Any], signer: PushSigner = key) -> tuple[int, str]:
        body = json.dumps(doc).encode()
        sig = signer.sign(_target(caller), "endpoints", hashlib.sha256(body).hexdigest(), gen)
        status, raw = caller.admin_request(
            "PUT", "/endpoints", body, {HDR_GENERATION: str(gen), HDR_SIGNATURE: sig}
        )
        return status, str(json.loads(raw)["nack"])

    forged = {"address": "127.0.0.1:9", "tags": {}, "healthy": True}
    # A delta whose services do not make the digest it names (altered on the way): 400.
    status, why = put(
        {
            "generation": gen,
            "scoped": True,
            "digest": held.digest,
            "base": held.digest,
            "services": {"beta": [forged]},
        }
    )
    assert status == 400 and "digest mismatch" in why
    # A delta over a set it does not run: 422 (the control plane sends the whole set).
    status, why = put(
        {"generation": gen, "scoped": True, "digest": held.digest, "base": "0" * 64, "services": {}}
    )
    assert status == 422 and "send it whole" in why
    # Not JSON of the schema: 400; signed by another key: 403.
    status, _ = put({"generation": gen, "services": {"beta": [{"address": "no-port"}]}, "bogus": 1})
    assert status == 400
    status, _ = put({"generation": gen, "services": {}}, PushSigner(eps_mesh.work / "thief"))
    assert status == 403
    after = _endpoints(caller)
    assert after == before
    assert metric_value(caller.metrics(), "meshc_reloads_total", kind="endpoints", result="nack") == nacks + 4
    assert outbound_name(caller, "beta") == "beta-app"
