"""targetRef policies resolved into bundles: Kuma's order, merged defaults, ties and overlaps."""

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
spec: {port: 80, subsets: [{zone: a}]}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: api}
spec: {port: 81}
"""


def _timeout(name: str, top: str, to: str, default: str) -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {top}
  to: [{{targetRef: {to}, default: {default}}}]
"""


MESH, WEB, API = "{kind: Mesh}", "{kind: MeshService, name: web}", "{kind: MeshService, name: api}"
WEB_ZONE_A = "{kind: MeshSubset, tags: {kuma.io/service: web, zone: a}}"


def _compile(tmp_path: Path, *docs: str) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "policies.yaml").write_text(CATALOG + "".join(docs), encoding="utf-8")
    return compile_dir(d)


def _timeouts(r: CompileResult, key: str, dst: str) -> list[dict[str, Any]]:
    bundle = json.loads(r.bundles[key])
    dests = bundle["destinations"] if bundle["type"] == "mesh" else bundle["outbound"]
    return [{"when": x["when"], **x["conf"]} for x in dests[dst]["timeout"]]


def test_defaults_merge_lowest_precedence_first(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _timeout("mesh-wide", MESH, MESH, "{connectionTimeout: 1s, http: {requestTimeout: 9s}}"),
        _timeout("web-to-api", WEB, API, "{http: {requestTimeout: 3s}}"),
        _timeout("web-zone-a", WEB_ZONE_A, API, "{idleTimeout: 5s}"),
    )  # fmt: skip
    assert not r.diagnostics, [(d.code, d.message) for d in r.diagnostics]
    # The mesh bundle: what any source gets, the mesh-wide policy alone.
    (anyone,) = _timeouts(r, "default", "api")
    assert (anyone["connect_timeout_ms"], anyone["http_request_timeout_ms"]) == (1000, 9000)
    # web -> api: zone a first (more specific), then web's own; both merged over the mesh-wide one.
    zone_a, web = _timeouts(r, "default/web", "api")
    assert zone_a["when"] == {"zone": "a"} and web["when"] == {}
    assert (web["connect_timeout_ms"], web["http_request_timeout_ms"], web["tcp_idle_timeout_ms"]) == (
        1000,
        3000,
        3600000,
    )
    assert (
        zone_a["connect_timeout_ms"],
        zone_a["http_request_timeout_ms"],
        zone_a["tcp_idle_timeout_ms"],
    ) == (
        1000,
        3000,
        5000,
    )
    prov = {p["name"] for p in r.release["provenance"]["default/web"]}
    assert {"mesh-wide", "web-to-api", "web-zone-a"} <= prov


def test_a_tie_decided_by_name_is_a_warning_naming_both(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _timeout("alpha", MESH, MESH, "{connectionTimeout: 1s}"),
        _timeout("beta", MESH, MESH, "{connectionTimeout: 2s}"),
    )
    ties = [d for d in r.diagnostics if d.code == "W3004"]
    assert ties and "'alpha' overrides MeshTimeout 'beta'" in ties[0].message
    (anyone,) = _timeouts(r, "default", "api")
    assert anyone["connect_timeout_ms"] == 1000  # the smaller name wins, as in Kuma 2.14


def test_targetref_wins_over_legacy_on_the_same_pair_with_a_warning(tmp_path: Path) -> None:
    legacy = """---
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {name: old}
spec:
  sources: [{match: {kuma.io/service: web}}]
  destinations: [{match: {kuma.io/service: api}}]
  conf: {connectTimeout: 7s}
"""
    new = _timeout(
        "new", "{kind: MeshService, name: web}", "{kind: MeshService, name: api}", "{connectionTimeout: 3s}"
    )
    r = _compile(tmp_path, legacy, new)
    assert [d.code for d in r.diagnostics] == ["W3005"]
    assert _timeouts(r, "default/web", "api")[0]["connect_timeout_ms"] == 3000


def test_what_is_not_resolved_says_so(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _timeout("ext", "{kind: Mesh}", "{kind: MeshExternalService, name: ext}", "{idleTimeout: 1s}"),
    )
    (w,) = r.diagnostics
    assert w.code == "W3006" and w.loc.path == ("spec", "to", 0, "targetRef", "kind")
    assert "a `to` targetRef of kind MeshExternalService" in w.message


def test_a_dataplane_by_name_selects_the_instances_its_display_name_label_names(tmp_path: Path) -> None:
    """A meshc sidecar is Kuma's Dataplane; its name and namespace are the labels Kuma gives every
    Dataplane for them, ``kuma.io/display-name`` and ``k8s.kuma.io/namespace`` (``--label``)."""
    r = _compile(
        tmp_path,
        _timeout(
            "dp", "{kind: Dataplane, name: web-1, namespace: shop}", "{kind: Mesh}", "{idleTimeout: 1s}"
        ),
    )
    assert r.diagnostics == []
    got = [(x["when"], x["tcp_idle_timeout_ms"]) for x in _timeouts(r, "default", "api")]
    assert got[0] == ({"label:k8s.kuma.io/namespace": "shop", "label:kuma.io/display-name": "web-1"}, 1000)
    assert all(w != {} or idle != 1000 for w, idle in got)  # other instances: not this one


def test_permissions_from_mesh_traffic_permissions(tmp_path: Path) -> None:
    mtls = CATALOG.replace(
        "spec: {}", "spec: {mtls: {enabledBackend: ca, backends: [{name: ca, type: builtin}]}}", 1
    )
    mtp = """---
apiVersion: kuma.io/v1alpha1
kind: MeshTrafficPermission
metadata: {name: web-to-api, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: api}
  from:
    - {targetRef: {kind: MeshService, name: web}, default: {action: Allow}}
    - {targetRef: {kind: MeshSubset, tags: {kuma.io/service: web, zone: b}}, default: {action: Deny}}
"""
    d = tmp_path / "policies"
    d.mkdir()
    (d / "p.yaml").write_text(mtls + mtp, encoding="utf-8")
    r = compile_dir(d)
    # web is allowed into api; the Deny of a subset cannot be expressed (permissions only allow).
    assert sorted(x.code for x in r.diagnostics) == ["W2002", "W3006"]  # web itself has no caller
    perms = json.loads(r.bundles["default/api"])["inbound"]["permissions"]
    assert perms == [{"conf": None, "peer": {"kuma.io/service": "web"}, "when": {}}]


def _from_policy(kind: str, name: str, top: str, src: str, default: str) -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: {kind}
metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {top}
  from: [{{targetRef: {src}, default: {default}}}]
"""


def test_fault_injection_and_rate_limit_merge_per_caller_into_inbound_rules(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _from_policy(
            "MeshFaultInjection", "mesh-faults", "{kind: Mesh, proxyTypes: [Sidecar]}", MESH,
            "{http: [{abort: {httpStatus: 503, percentage: 10}}, {delay: {value: 1s, percentage: '2.5'}}]}",
        ),
        # web's callers from web itself: the more specific policy replaces the list (a merge patch).
        _from_policy(
            "MeshFaultInjection", "api-faults", API, WEB,
            "{http: [{abort: {httpStatus: 500, percentage: 50}}]}",
        ),
        _from_policy(
            "MeshRateLimit", "api-limit", API, MESH,
            "{local: {http: {requestRate: {num: 5, interval: 10s}, onRateLimit: {status: 423, "
            "headers: {set: [{name: x-limited, value: 'yes'}]}}}}}",
        ),
        _from_policy("MeshRateLimit", "off", WEB, MESH, "{local: {http: {disabled: true}}}"),
    )  # fmt: skip
    assert [d.code for d in r.diagnostics] == []
    api = json.loads(r.bundles["default/api"])["inbound"]
    faults = {json.dumps(x["peer"]): x["conf"] for x in api["fault_injection"]}
    assert faults['{"kuma.io/service": "web"}']["abort"] == {"percentage": 50.0, "http_status": 500}
    assert faults['{"kuma.io/service": "web"}']["delay"] is None
    mesh_wide = faults["{}"]
    assert mesh_wide["abort"] == {"percentage": 10.0, "http_status": 503}
    assert mesh_wide["delay"] == {"percentage": 2.5, "value_ms": 1000}
    [limit] = api["rate_limit"]
    assert limit["conf"] == {
        "requests": 5,
        "interval_ms": 10000,
        "status": 423,
        "headers": [{"name": "x-limited", "value": "yes", "append": False}],
    }
    assert json.loads(r.bundles["default/web"])["inbound"]["rate_limit"] == []  # disabled: no rule


def test_two_faults_of_one_kind_cannot_be_expressed_and_say_so(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _from_policy(
            "MeshFaultInjection", "twice", API, MESH,
            "{http: [{abort: {httpStatus: 503, percentage: 10}}, {abort: {httpStatus: 500, percentage: 1}}]}",
        ),
    )  # fmt: skip
    assert [(d.code, d.loc.path, d.span and d.span.line) for d in r.diagnostics] == [
        ("W3006", ("spec", "from", 0), 23)
    ]
    assert json.loads(r.bundles["default/api"])["inbound"]["fault_injection"] == []


def test_a_targetref_policy_on_a_narrower_pair_still_warns_of_the_legacy_one_it_shadows(
    tmp_path: Path,
) -> None:
    """The legacy Timeout is for every caller of api; the MeshTimeout only for web's calls: in
    web's bundle the targetRef rule comes first and ends the list, so the legacy one is lost
    there (and only there)."""
    legacy = """---
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {name: old}
spec:
  sources: [{match: {kuma.io/service: '*'}}]
  destinations: [{match: {kuma.io/service: api}}]
  conf: {connectTimeout: 7s}
"""
    r = _compile(tmp_path, legacy, _timeout("new", WEB, API, "{connectionTimeout: 3s}"))
    (w,) = [d for d in r.diagnostics if d.code == "W3005"]
    assert "'new' and the legacy Timeout 'old' both configure web -> api" in w.message
    assert [x["connect_timeout_ms"] for x in _timeouts(r, "default/web", "api")] == [3000]
    assert [x["connect_timeout_ms"] for x in _timeouts(r, "default", "api")] == [7000]  # other callers


def _health(name: str, to: str, default: str) -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: MeshHealthCheck
metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}
spec:
  to: [{{targetRef: {to}, default: {default}}}]
"""


def _health_checks(r: CompileResult, dst: str) -> list[dict[str, Any]]:
    bundle = json.loads(r.bundles["default"])
    return [x["conf"] for x in bundle["destinations"][dst]["health_check"]]


def test_a_grpc_health_check_reaches_the_bundle_and_disabled_drops_it(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _health("grpc-api", API, "{interval: 2s, grpc: {serviceName: api.v1.Api, authority: 'api:81'}}"),
        _health("off-web", WEB, "{grpc: {disabled: true, serviceName: x}, tcp: {}}"),
    )
    assert not r.diagnostics, [(d.code, d.message) for d in r.diagnostics]
    (api,) = _health_checks(r, "api")
    assert api["grpc"] == {"service_name": "api.v1.Api", "authority": "api:81"}
    assert (api["interval_ms"], api["timeout_ms"], api["http"], api["tcp"]) == (2000, 15000, None, None)
    (web,) = _health_checks(r, "web")
    assert web["grpc"] is None and web["tcp"] == {"send": None, "receive": []}
    # An empty section: the whole server is asked about, under the destination's name (None here).
    r = _compile(tmp_path, _health("grpc-api", API, "{grpc: {}}"))
    assert _health_checks(r, "api")[0]["grpc"] == {"service_name": "", "authority": None}


def test_a_grpc_health_check_authority_that_is_not_host_port_is_e1005(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _health("bad", API, "{grpc: {authority: 'api /health'}}"),
        _health("good", WEB, "{grpc: {authority: '[::1]:81'}}"),
    )
    (d,) = r.diagnostics
    assert (d.code, d.message) == ("E1005", "must be a valid authority (host or host:port)")
    assert d.loc.path == ("spec", "to", 0, "default", "grpc", "authority")
    lines = (tmp_path / "policies" / "policies.yaml").read_text().splitlines()
    (line,) = [i for i, text in enumerate(lines, 1) if "'api /health'" in text]
    assert d.span is not None and d.file == "policies.yaml"
    assert (d.span.line, d.span.column) == (line, lines[line - 1].index("'api /health'") + 1)
    assert "default" not in r.bundles  # an error: no bundles


def test_a_grpc_health_check_beside_an_http_one_is_w3006(tmp_path: Path) -> None:
    """meshc's `http` protocol covers gRPC services, so the HTTP check runs and `grpc` says so."""
    r = _compile(tmp_path, _health("both", API, "{http: {path: /health}, grpc: {serviceName: x}}"))
    (d,) = r.diagnostics
    assert d.code == "W3006" and d.loc.path == ("spec", "to", 0, "default", "grpc")
    assert "a `grpc` check beside an `http` one (meshc runs `http`)" in d.message
    (api,) = _health_checks(r, "api")
    assert api["http"]["path"] == "/health"
    # With the HTTP one disabled there is nothing to say: the gRPC check runs.
    r = _compile(tmp_path, _health("both", API, "{http: {disabled: true}, grpc: {serviceName: x}}"))
    assert not r.diagnostics and _health_checks(r, "api")[0]["http"] is None
