"""MeshTimeout and MeshRetry that target a MeshHTTPRoute (top-level, or a ``to`` item), compiled
onto the route's rules: merged over the destination's own conf as Kuma merges a route-level conf
over its MeshService's, on the proxies each policy selects, with W3006 at what stays unapplied.

The fixture's bundles are held to a checked-in golden (``fixtures/targetref-route-policies.golden.json``:
web's route, timeout and retry to api, and every bundle's digest); regenerate it with
``MESHC_UPDATE_GOLDEN=1`` and review the diff. ``tests/runtime/test_route_policies.py`` runs the
same shape of bundle on real processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compiler.pipeline import CompileResult, compile_dir, compile_resolved
from compiler.source import read_policy_dir

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "good" / "targetref-route-policies"
GOLDEN = HERE / "fixtures" / "targetref-route-policies.golden.json"
UPDATE = os.environ.get("MESHC_UPDATE_GOLDEN") == "1"

CATALOG = (FIXTURE / "mesh.yaml").read_text()
ROUTE = (FIXTURE / "route.yaml").read_text()


def _compile(tmp_path: Path, *docs: str) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(parents=True, exist_ok=True)
    (d / "policies.yaml").write_text("\n---\n".join([CATALOG, *docs]), encoding="utf-8")
    return compile_dir(d)


def _out(r: CompileResult, field: str, src: str = "web", dst: str = "api") -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = json.loads(r.bundles[f"default/{src}"])["outbound"][dst][field]
    return rules


def _w3006(r: CompileResult) -> list[tuple[tuple[Any, ...], str]]:
    return sorted((d.loc.path, d.message) for d in r.diagnostics if d.code == "W3006")


def test_the_fixture_matches_its_golden() -> None:
    r = compile_dir(FIXTURE)
    assert r.diagnostics == []
    got = {
        "web_to_api": {f: _out(r, f) for f in ("route", "timeout", "retry")},
        "digests": dict(sorted(r.digests.items())),
    }
    if UPDATE:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())


def test_route_level_confs_merge_over_the_destination_and_follow_the_policies_selection() -> None:
    r = compile_dir(FIXTURE)
    v2, every = _out(r, "route")
    assert (v2["when"], every["when"]) == ({"version": "v2"}, {})
    for rule in (v2, every):
        http = rule["conf"]["http"]
        # /slow, /v2, the x-canary header match (one rule, two matches), then the catch-all, which
        # carries the rule's confs as the last entry (its split stays the default too).
        paths = [h["match"]["path"]["value"] if h["match"]["path"] else None for h in http]
        assert paths == ["/slow", "/v2", None, "/"]
        # MeshTimeout route-timeout's 1s over api-timeout's 9s; its streamIdleTimeout and
        # connectionTimeout are api-timeout's (merged under it).
        assert {h["timeout"]["http_request_timeout_ms"] for h in http} == {1000}
        assert {h["timeout"]["http_stream_idle_timeout_ms"] for h in http} == {60000}
        assert {h["timeout"]["connect_timeout_ms"] for h in http} == {2000}
    # MeshRetry route-retry selects web's v2 instances only; its retryOn replaces api-retry's
    # list (a merge patch replaces lists) and its numRetries goes over.
    assert {(h["retry"]["http"]["num_retries"], tuple(h["retry"]["http"]["retriable_status_codes"])) for h in
            v2["conf"]["http"]} == {(4, (503,))}  # fmt: skip
    assert all("retry" not in h for h in every["conf"]["http"])
    # The destination keeps its own confs for what no rule matches.
    assert [x["conf"]["http_request_timeout_ms"] for x in _out(r, "timeout")] == [9000]
    assert [x["conf"]["http"]["num_retries"] for x in _out(r, "retry")] == [2]


def test_a_repo_without_route_level_policies_keeps_its_bytes(tmp_path: Path) -> None:
    """The rules' new fields stay out of the JSON when unset: the route compiles as before."""
    r = _compile(tmp_path, ROUTE)
    (rule,) = _out(r, "route")
    assert all("timeout" not in h and "retry" not in h for h in rule["conf"]["http"])
    paths = [h["match"]["path"]["value"] if h["match"]["path"] else None for h in rule["conf"]["http"]]
    assert paths == ["/slow", "/v2", None]  # the catch-all is the default split alone


def test_what_a_route_does_not_carry_is_named(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        ROUTE,
        """apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: to-route, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: web}
  to:
    - targetRef: {kind: MeshHTTPRoute, name: api-route}
      default: {connectionTimeout: 3s, idleTimeout: 1m, http: {requestTimeout: 2s, maxStreamDuration: 1h}}
""",
        """apiVersion: kuma.io/v1alpha1
kind: MeshRetry
metadata: {name: retry-tcp, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: web}
  to:
    - targetRef: {kind: MeshHTTPRoute, name: api-route}
      default: {tcp: {maxConnectAttempt: 3}}
""",
        """apiVersion: kuma.io/v1alpha1
kind: MeshRetry
metadata: {name: no-such-route, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: Mesh}
  to:
    - targetRef: {kind: MeshHTTPRoute, name: nowhere}
      default: {http: {numRetries: 1}}
""",
    )
    found = _w3006(r)
    paths = [p for p, _ in found]
    assert paths == [
        ("spec", "to", 0, "default", "connectionTimeout"),
        ("spec", "to", 0, "default", "http", "maxStreamDuration"),
        ("spec", "to", 0, "default", "idleTimeout"),
        ("spec", "to", 0, "default", "tcp", "maxConnectAttempt"),
        ("spec", "to", 0, "targetRef"),
    ], found
    by_path = dict(found)
    connection = by_path[("spec", "to", 0, "default", "connectionTimeout")]
    assert "connectionTimeout for a MeshHTTPRoute" in connection
    assert "MeshHTTPRoute 'nowhere' that the mesh does not have" in by_path[("spec", "to", 0, "targetRef")]
    # What applies does: the requestTimeout; a retry conf with nothing per-route adds nothing.
    (rule,) = _out(r, "route")
    assert {h["timeout"]["http_request_timeout_ms"] for h in rule["conf"]["http"]} == {2000}
    assert all("retry" not in h for h in rule["conf"]["http"])


def test_a_route_level_conf_where_the_route_routes_none_of_the_selected_proxies(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        ROUTE,
        """apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: api-side, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: api}
  to:
    - targetRef: {kind: MeshHTTPRoute, name: api-route}
      default: {http: {requestTimeout: 2s}}
""",
    )
    ((path, msg),) = _w3006(r)
    assert path == ("spec", "to", 0) and "routes none of the proxies this policy selects" in msg
    (rule,) = _out(r, "route")
    assert all("timeout" not in h for h in rule["conf"]["http"])


def test_a_route_on_a_gateway_keeps_w3006(tmp_path: Path) -> None:
    gateway = """apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: edge}
spec:
  selectors: [{match: {kuma.io/service: edge}}]
  conf: {listeners: [{port: 8080, protocol: HTTP}]}
---
apiVersion: kuma.io/v1alpha1
kind: MeshHTTPRoute
metadata: {name: edge-route, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshGateway, name: edge}
  to:
    - targetRef: {kind: Mesh}
      rules:
        - matches: [{path: {type: PathPrefix, value: /}}]
          default: {backendRefs: [{kind: MeshService, name: api}]}
"""
    policy = """apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: edge-timeout, namespace: kuma-system, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshHTTPRoute, name: edge-route}
  to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 2s}}}]
"""
    r = _compile(tmp_path, gateway, policy)
    ((path, msg),) = _w3006(r)
    assert path == ("spec", "targetRef") and "on a MeshGateway (a gateway rule has no timeout" in msg


def test_explain_lists_the_route_level_policies_on_the_route() -> None:
    from compiler.explain import explain, line_finder

    result, resolved, parsed = compile_resolved(read_policy_dir(FIXTURE))
    doc = explain(result, resolved, "default", "web", line_finder(parsed), only="api")
    (api,) = doc["outbound"]
    (route,) = [k for k in api["kinds"] if k["field"] == "route"]
    names = [(p["kind"], p["name"], p["rule"]) for p in route["policies"]]
    assert ("MeshRetry", "route-retry", 0) in names and ("MeshTimeout", "route-timeout", 0) in names
    assert ("MeshTimeout", "route-timeout", 1) in names  # the rule for every web instance too
    timeout = next(p for p in route["policies"] if p["name"] == "route-timeout")
    assert timeout["file"].endswith("resilience.yaml") and timeout["targetRef"] == "MeshHTTPRoute"
    assert any(s.endswith(".timeout.http.requestTimeout") for s in timeout["sets"])
