"""Which proxies a top-level targetRef selects beyond services and tags: a Dataplane by name,
namespace and ``sectionName``, and ``proxyTypes`` (Kuma v2.14.3 ``matchers/dataplane.go``).

A meshc sidecar is Kuma's Dataplane resource: its labels are its own (``--label``, bundle
conditions ``label:NAME``), apart from its tags; its name and namespace the
``kuma.io/display-name`` and ``k8s.kuma.io/namespace`` labels (those Kuma gives every Dataplane);
its one inbound's section name is its Service's port. A Dataplane targetRef and
``proxyTypes: [Sidecar]`` never select a gateway; ``proxyTypes: [Gateway]`` selects gateways only.
``tests/runtime/test_route_policies.py`` runs a label-conditioned rule on a sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compiler.pipeline import CompileResult, compile_dir

CATALOG = """apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: web}
spec: {port: 80}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: api}
spec: {port: 8081}
---
apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: edge}
spec:
  selectors: [{match: {kuma.io/service: edge}}]
  conf: {listeners: [{port: 8080, protocol: HTTP}]}
"""


def _policy(name: str, top: str, body: str, kind: str = "MeshTimeout") -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: {kind}
metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {top}
{body}"""


TO_API = "  to: [{targetRef: {kind: MeshService, name: api}, default: {connectionTimeout: 2s}}]\n"
EVERYONE = "  to: [{targetRef: {kind: MeshService, name: api}, default: {idleTimeout: 9s}}]\n"


def _compile(tmp_path: Path, *docs: str) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(parents=True, exist_ok=True)
    (d / "policies.yaml").write_text(CATALOG + "".join(docs), encoding="utf-8")
    return compile_dir(d)


def _timeouts(r: CompileResult, key: str, dst: str = "api") -> list[tuple[dict[str, str], int, int]]:
    doc = json.loads(r.bundles[key])
    dests: dict[str, Any] = doc["destinations"] if doc["type"] == "mesh" else doc["outbound"]
    if dst not in dests:
        return []
    return [
        (x["when"], x["conf"]["connect_timeout_ms"], x["conf"]["tcp_idle_timeout_ms"])
        for x in dests[dst]["timeout"]
    ]


def test_proxy_types_gateway_configures_the_gateways_only(tmp_path: Path) -> None:
    r = _compile(tmp_path, _policy("gw", "{kind: Mesh, proxyTypes: [Gateway]}", TO_API))
    assert r.diagnostics == []
    assert _timeouts(r, "default/edge") == [({}, 2000, 3600000)]
    assert _timeouts(r, "default") == [({}, 5000, 3600000)]  # every sidecar: the default
    assert _timeouts(r, "default/web") == []


def test_proxy_types_sidecar_and_a_dataplane_leave_the_gateways_out(tmp_path: Path) -> None:
    for i, top in enumerate(("{kind: Mesh, proxyTypes: [Sidecar]}", "{kind: Dataplane}")):
        r = _compile(
            tmp_path / str(i),
            _policy("sidecars", top, TO_API),
            _policy("everyone", "{kind: Mesh}", EVERYONE),
        )
        assert r.diagnostics == [], top
        # The mesh bundle (every sidecar): both merged; the gateway's own entry: the Mesh-wide one.
        assert _timeouts(r, "default") == [({}, 2000, 9000)]
        assert _timeouts(r, "default/edge") == [({}, 5000, 9000)]


def test_a_sidecars_only_conf_nothing_else_sets_for_a_gateway_is_named(tmp_path: Path) -> None:
    r = _compile(tmp_path, _policy("sidecars", "{kind: Mesh, proxyTypes: [Sidecar]}", TO_API))
    ((w,),) = [[d for d in r.diagnostics if d.code == "W3006"]]
    assert w.loc.path == ("spec", "targetRef") and "for the gateway edge" in w.message
    assert _timeouts(r, "default") == [({}, 2000, 3600000)]


def test_no_gateway_in_the_mesh_keeps_the_bundles_of_a_mesh_wide_policy(tmp_path: Path) -> None:
    no_gateway = CATALOG[: CATALOG.index("---\napiVersion: kuma.io/v1alpha1\nkind: MeshGateway")]
    a, b = tmp_path / "a", tmp_path / "b"
    for d, top in ((a, "{kind: Mesh, proxyTypes: [Sidecar]}"), (b, "{kind: Mesh}")):
        d.mkdir()
        (d / "p.yaml").write_text(no_gateway + _policy("t", top, TO_API), encoding="utf-8")
    assert compile_dir(a).digests == compile_dir(b).digests


def test_dataplane_labels_are_labels_not_tags(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _policy("by-label", "{kind: Dataplane, labels: {version: v2}}", TO_API),
        _policy("by-tag", "{kind: MeshSubset, tags: {version: v2}}", EVERYONE),
    )
    assert r.diagnostics == []
    assert _timeouts(r, "default") == [
        ({"label:version": "v2", "version": "v2"}, 2000, 9000),
        ({"label:version": "v2"}, 2000, 3600000),
        ({"version": "v2"}, 5000, 9000),
        ({}, 5000, 3600000),
    ]


def test_a_dataplane_section_name_is_its_inbounds_port(tmp_path: Path) -> None:
    rules = "  rules: [{default: {http: {requestTimeout: 3s}}}]\n"
    r = _compile(
        tmp_path,
        _policy("by-port", "{kind: Dataplane, sectionName: '8081'}", rules),
        _policy("by-name", "{kind: Dataplane, labels: {kuma.io/service: web}, sectionName: http}", rules),
    )
    ((w,),) = [[d for d in r.diagnostics if d.code == "W3006"]]
    assert w.loc.path == ("spec", "targetRef", "sectionName") and "'http' that names no inbound" in w.message
    api = json.loads(r.bundles["default/api"])["inbound"]["timeout"]
    assert [x["conf"]["http_request_timeout_ms"] for x in api] == [3000]
    assert "timeout" not in json.loads(r.bundles["default/web"])["inbound"]  # port 80 is not 8081


def test_proxy_types_gateway_on_inbound_traffic_is_named(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _policy("gw-in", "{kind: Mesh, proxyTypes: [Gateway]}",
                "  rules: [{default: {http: {requestTimeout: 3s}}}]\n"),
    )  # fmt: skip
    ((w,),) = [[d for d in r.diagnostics if d.code == "W3006"]]
    assert w.loc.path == ("spec", "targetRef", "proxyTypes") and "a meshc gateway has no inbound" in w.message
