"""Kuma 2.x inbound rules (``rules`` sections, ``from`` read as rules) compiled into bundles' inbound.

Each test writes a real policy repo in a temp dir, compiles it, and reads the service bundles:
the rules a caller gets (``peer``), on which instances (``when``), with what merged conf, and the
warning at each part a bundle cannot hold. The order and merging are Kuma v2.14.3's
(``core/rules/inbound``, and each plugin's reading of the rules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compiler.diagnostics import Diagnostic
from compiler.pipeline import CompileResult, compile_dir, compile_resolved
from compiler.source import read_policy_dir

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "good" / "targetref-inbound-rules"

CATALOG = """apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {mtls: {enabledBackend: ca, backends: [{name: ca, type: builtin}]}}
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
spec: {port: 81, subsets: [{version: v1}, {version: v2}]}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: backend}
spec: {port: 82}
"""

ALLOW_ALL = """---
apiVersion: kuma.io/v1alpha1
kind: MeshTrafficPermission
metadata: {name: allow-all, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: Mesh}
  rules: [{default: {allow: [{spiffeID: {type: Prefix, value: 'spiffe://default'}}]}}]
"""


API = "{kind: MeshService, name: api}"
API_V2 = "{kind: MeshSubset, tags: {kuma.io/service: api, version: v2}}"


def _policy(kind: str, name: str, top: str, body: str) -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: {kind}
metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {top}
{body}"""


def _spiffe(kind: str, service: str) -> str:
    return f"{{spiffeID: {{type: {kind}, value: 'spiffe://default/{service}'}}}}"


def _limit(num: int, interval: str, extra: str = "") -> str:
    return f"{{local: {{http: {{requestRate: {{num: {num}, interval: {interval}}}{extra}}}}}}}"


STATUS_499 = ", onRateLimit: {status: 499}"


def _compile(tmp_path: Path, *docs: str) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(parents=True, exist_ok=True)
    mtp = any("kind: MeshTrafficPermission" in x for x in docs)  # else every service is unreachable (W2002)
    (d / "policies.yaml").write_text(CATALOG + "".join(docs) + ("" if mtp else ALLOW_ALL), encoding="utf-8")
    return compile_dir(d)


def _inbound(r: CompileResult, service: str, field: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = json.loads(r.bundles[f"default/{service}"])["inbound"][field]
    return rules


def _codes(r: CompileResult) -> list[tuple[str, tuple[str | int, ...]]]:
    return [(d.code, d.loc.path) for d in r.diagnostics]


def _only(r: CompileResult, code: str) -> Diagnostic:
    (d,) = [d for d in r.diagnostics if d.code == code]
    return d


# --- MeshTrafficPermission ---------------------------------------------------------------------


def test_the_fixture_repo_allows_everyone_but_backend_into_api() -> None:
    r = compile_dir(FIXTURE)
    assert r.diagnostics == []
    perms = {s: _inbound(r, s, "permissions") for s in ("web", "api", "backend")}
    # A Prefix of the mesh's identities and no deny: one rule for every caller.
    assert perms["web"] == perms["backend"] == [{"conf": None, "peer": {}, "when": {}}]
    # api: the deny of backend (another policy) beats the mesh-wide allow: each other caller by name.
    assert [p["peer"] for p in perms["api"]] == [{"kuma.io/service": "api"}, {"kuma.io/service": "web"}]


def test_rules_replace_the_from_permissions_of_the_proxies_they_select(tmp_path: Path) -> None:
    from_mtp = _policy(
        "MeshTrafficPermission", "old-style", "{kind: MeshService, name: web}",
        "  from: [{targetRef: {kind: MeshService, name: backend}, default: {action: Allow}}]\n",
    )  # fmt: skip
    r = _compile(tmp_path, ALLOW_ALL, from_mtp)
    w = _only(r, "W3007")
    assert w.loc.path == ("spec", "from", 0)
    assert "'old-style' `from` has no effect where MeshTrafficPermission 'allow-all' has `rules`" in w.message
    (related,) = w.related
    assert related.message == "MeshTrafficPermission 'allow-all' is here" and related.line == 29  # allow[0]
    assert _inbound(r, "web", "permissions") == [{"conf": None, "peer": {}, "when": {}}]


def test_rules_on_some_instances_leave_from_elsewhere_and_say_what_still_applies(tmp_path: Path) -> None:
    v2_rules = _policy(
        "MeshTrafficPermission", "api-v2", API_V2,
        f"  rules: [{{default: {{allow: [{_spiffe('Exact', 'web')}]}}}}]\n",
    )  # fmt: skip
    from_mtp = _policy(
        "MeshTrafficPermission", "api-from", "{kind: MeshService, name: api}",
        "  from: [{targetRef: {kind: MeshService, name: backend}, default: {action: Allow}}]\n",
    )  # fmt: skip
    web_ok = _policy(
        "MeshTrafficPermission", "web-ok", "{kind: MeshService, name: web}",
        "  from: [{targetRef: {kind: Mesh}, default: {action: Allow}}]\n",
    )  # fmt: skip
    backend_ok = web_ok.replace("web-ok", "backend-ok").replace("name: web}", "name: backend}")
    r = _compile(tmp_path, v2_rules, from_mtp, web_ok, backend_ok)
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "from", 0)
    assert "'api-from' `from` still applies to the instances of api that MeshTrafficPermission 'api-v2'" in (
        w.message
    )
    perms = _inbound(r, "api", "permissions")
    assert {"conf": None, "peer": {"kuma.io/service": "web"}, "when": {"version": "v2"}} in perms
    assert {"conf": None, "peer": {"kuma.io/service": "backend"}, "when": {}} in perms


def test_a_deny_under_a_broader_allow_of_other_instances_says_it_cannot_be_taken_back(tmp_path: Path) -> None:
    deny_v2 = _policy(
        "MeshTrafficPermission", "no-web-on-v2", API_V2,
        f"  rules: [{{default: {{deny: [{_spiffe('Exact', 'web')}]}}}}]\n",
    )  # fmt: skip
    r = _compile(tmp_path, ALLOW_ALL, deny_v2)
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 0, "default", "deny", 0)
    assert "a deny of web on the instances of api tagged {'version': 'v2'} under a broader rule" in w.message
    # v2's own rules list the callers it allows; web is not one of them.
    v2 = [p["peer"] for p in _inbound(r, "api", "permissions") if p["when"]]
    assert v2 == [{"kuma.io/service": "api"}, {"kuma.io/service": "backend"}]


# --- MeshRateLimit -------------------------------------------------------------------------------


def test_the_fixture_repo_merges_webs_limit_over_the_common_one() -> None:
    limits = _inbound(compile_dir(FIXTURE), "api", "rate_limit")
    assert limits == [
        {
            "conf": {"headers": [], "interval_ms": 10000, "requests": 5, "status": 423},
            "peer": {"kuma.io/service": "web"},
            "when": {},
        },
        {
            "conf": {"headers": [], "interval_ms": 1000, "requests": 100, "status": 423},
            "peer": {},
            "when": {},
        },
    ]


def test_from_items_of_every_policy_merge_into_one_common_limit(tmp_path: Path) -> None:
    """MeshRateLimit is from-as-rules in Kuma 2.14: a mesh-wide ``from`` and api's own are rules
    without a match, merged in policy order (api's, a MeshService, above the Mesh one)."""
    r = _compile(
        tmp_path,
        _policy("MeshRateLimit", "mesh", "{kind: Mesh, proxyTypes: [Sidecar]}",
                f"  from: [{{targetRef: {{kind: Mesh}}, default: {_limit(50, '1s', STATUS_499)}}}]\n"),
        _policy("MeshRateLimit", "api", "{kind: MeshService, name: api}",
                f"  from: [{{targetRef: {{kind: Mesh}}, default: {_limit(7, '2s')}}}]\n"),
    )  # fmt: skip
    assert r.diagnostics == []
    (api,) = _inbound(r, "api", "rate_limit")
    assert (api["peer"], api["conf"]["requests"], api["conf"]["interval_ms"], api["conf"]["status"]) == (
        {},
        7,
        2000,
        499,
    )
    assert [x["conf"]["requests"] for x in _inbound(r, "web", "rate_limit")] == [50]
    _, resolved, _ = compile_resolved(read_policy_dir(tmp_path / "policies"))
    (entry,) = resolved["default"].idx.by_dst["RateLimit"]["api"]
    assert [m.policy.name for m in entry.merged] == ["mesh", "api"]  # lowest precedence first


def test_a_caller_gets_its_rules_least_specific_first(tmp_path: Path) -> None:
    """web is covered by a Prefix and an Exact match: the Prefix's conf first, the Exact one over it
    (``compareMatchedRouteSpecificity``), both over the common limit."""
    rules = (
        "  rules:\n"
        f"    - matches: [{_spiffe('Exact', 'web')}]\n"
        f"      default: {_limit(3, '1s')}\n"
        f"    - matches: [{_spiffe('Prefix', 'we')}]\n"
        f"      default: {_limit(30, '1s', ', onRateLimit: {status: 420}')}\n"
        f"    - default: {_limit(300, '1s')}\n"
    )
    r = _compile(tmp_path, _policy("MeshRateLimit", "api", "{kind: MeshService, name: api}", rules))
    assert r.diagnostics == []
    got = [(x["peer"], x["conf"]["requests"], x["conf"]["status"]) for x in _inbound(r, "api", "rate_limit")]
    assert got == [({"kuma.io/service": "web"}, 3, 420), ({}, 300, 429)]


def test_a_limit_lifted_for_one_caller_under_a_common_one_is_named(tmp_path: Path) -> None:
    rules = (
        "  rules:\n"
        f"    - default: {_limit(10, '1s')}\n"
        f"    - matches: [{_spiffe('Exact', 'web')}]\n"
        "      default: {local: {http: {disabled: true}}}\n"
    )
    r = _compile(tmp_path, _policy("MeshRateLimit", "api", "{kind: MeshService, name: api}", rules))
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 1, "matches", 0)
    assert "no limit for web on api under a broader rule" in w.message
    assert [x["peer"] for x in _inbound(r, "api", "rate_limit")] == [{}]


def test_an_sni_match_is_named_and_left_out(tmp_path: Path) -> None:
    rules = (
        "  rules:\n"
        "    - matches: [{sni: {type: Exact, value: api.mesh}}]\n"
        f"      default: {_limit(10, '1s')}\n"
    )
    r = _compile(tmp_path, _policy("MeshRateLimit", "api", "{kind: MeshService, name: api}", rules))
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 0, "matches", 0) and "an `sni` match" in w.message
    assert _inbound(r, "api", "rate_limit") == []


# --- MeshFaultInjection --------------------------------------------------------------------------


def test_the_fixture_repo_faults_web_more_on_v2_selected_by_dataplane_labels() -> None:
    faults = _inbound(compile_dir(FIXTURE), "api", "fault_injection")
    abort = {"http_status": 503, "percentage": 10.0}
    assert faults == [
        {
            "conf": {
                "abort": abort,
                "delay": {"percentage": 50.0, "value_ms": 2000},
                "response_bandwidth": None,
            },
            "peer": {"kuma.io/service": "web"},
            "when": {"version": "v2"},
        },
        {
            "conf": {"abort": abort, "delay": None, "response_bandwidth": None},
            "peer": {},
            "when": {"version": "v2"},
        },
    ]


def test_two_aborts_for_one_caller_cannot_be_held_and_say_so(tmp_path: Path) -> None:
    rules = (
        "  rules:\n"
        "    - default: {http: [{abort: {httpStatus: 503, percentage: 10}}]}\n"
        f"    - matches: [{_spiffe('Exact', 'web')}]\n"
        "      default: {http: [{abort: {httpStatus: 500, percentage: 5}}]}\n"
    )
    r = _compile(tmp_path, _policy("MeshFaultInjection", "api", "{kind: MeshService, name: api}", rules))
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 1, "matches", 0) and "two faults of one kind" in w.message
    assert [x["peer"] for x in _inbound(r, "api", "fault_injection")] == [{}]


# --- what a bundle has no place for ------------------------------------------------------------


def test_inbound_timeouts_merge_in_kumas_order_and_per_caller(tmp_path: Path) -> None:
    """MeshTimeout `from` (read as rules): the Mesh-wide item, then the MeshService one over it;
    a spiffeID rule gives its caller its own request timeout on top of the common timeouts."""
    mesh_wide = _policy(
        "MeshTimeout", "all-in", "{kind: Mesh}",
        "  from: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 4s, http: {requestTimeout: 9s}}}]\n",
    )  # fmt: skip
    api_rules = _policy(
        "MeshTimeout", "api-in", API,
        "  rules:\n"
        "    - default: {http: {requestTimeout: 3s, streamIdleTimeout: 10s}}\n"
        f"    - matches: [{_spiffe('Exact', 'web')}]\n"
        "      default: {http: {requestTimeout: 1s}}\n",
    )  # fmt: skip
    r = _compile(tmp_path, mesh_wide, api_rules)
    assert _codes(r) == []  # streamIdleTimeout is applied inbound
    got = [(t["peer"], t["conf"]["connect_timeout_ms"], t["conf"]["http_request_timeout_ms"],
            t["conf"]["http_stream_idle_timeout_ms"])
           for t in _inbound(r, "api", "timeout")]  # fmt: skip
    # Kuma 2.14 reads `rules` and `from` as one list of inbound rules: api-in (MeshService) over
    # all-in (Mesh); web's rule is merged on top of the common ones.
    assert got == [({"kuma.io/service": "web"}, 4000, 1000, 10000), ({}, 4000, 3000, 10000)]
    assert [(t["peer"], t["conf"]["http_request_timeout_ms"]) for t in _inbound(r, "web", "timeout")] == [
        ({}, 9000)
    ]


def test_inbound_connection_limits_and_what_is_not_applied(tmp_path: Path) -> None:
    cb = _policy(
        "MeshCircuitBreaker", "api-cb", API,
        "  from: [{targetRef: {kind: Mesh}, default: {connectionLimits: {maxConnections: 2, maxRequests: 5},"
        " outlierDetection: {detectors: {totalFailures: {consecutive: 3}}}}}]\n",
    )  # fmt: skip
    # A MeshServiceSubset goes over a MeshService (a MeshSubset would not: Kuma orders by kind).
    v2 = _policy(
        "MeshCircuitBreaker", "api-v2", "{kind: MeshServiceSubset, name: api, tags: {version: v2}}",
        "  rules: [{default: {connectionLimits: {maxConnections: 7}}}]\n",
    )  # fmt: skip
    r = _compile(tmp_path, cb, v2)
    assert r.diagnostics == []  # the consecutive detectors eject the local app
    got = [(c["when"], c["conf"]["thresholds"]) for c in _inbound(r, "api", "circuit_breaker")]
    limits = {"max_connections": 2, "max_pending_requests": 1024, "max_requests": 5, "max_retries": 3}
    assert got == [({"version": "v2"}, {**limits, "max_connections": 7}), ({}, limits)]
    detectors = [c["conf"]["detectors"]["total_errors"] for c in _inbound(r, "api", "circuit_breaker")]
    assert detectors == [{"consecutive": 3}, {"consecutive": 3}]
    assert "circuit_breaker" not in json.loads(r.bundles["default/web"])["inbound"]


def test_inbound_stream_timeouts_panic_threshold_and_what_stays_not_applied(tmp_path: Path) -> None:
    """The inbound stream timeouts and requestHeadersTimeout compile into the bundle (the last two
    JSON fields only where set); maxConnectionDuration, an outbound requestHeadersTimeout and the
    successRate detector inbound are W3006 each; healthyPanicThreshold reaches the bundle."""
    timeouts = _policy(
        "MeshTimeout", "api-in", API,
        "  from: [{targetRef: {kind: Mesh}, default: {http: {streamIdleTimeout: 2s, maxStreamDuration: 9s,"
        " requestHeadersTimeout: 1s, maxConnectionDuration: 1h}}}]\n"
        "  to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 5s,"
        " requestHeadersTimeout: 1s}}}]\n",
    )  # fmt: skip
    cb = _policy(
        "MeshCircuitBreaker", "api-cb", API,
        "  from: [{targetRef: {kind: Mesh}, default: {outlierDetection: {healthyPanicThreshold: 0,"
        " detectors: {gatewayFailures: {consecutive: 2}, successRate: {minimumHosts: 1}}}}}]\n",
    )  # fmt: skip
    r = _compile(tmp_path, timeouts, cb)
    assert sorted(_codes(r), key=str) == sorted(
        [
            ("W3006", ("spec", "from", 0, "default", "http", "maxConnectionDuration")),
            ("W3006", ("spec", "to", 0, "default", "http", "requestHeadersTimeout")),
            ("W3006", ("spec", "from", 0, "default", "outlierDetection", "detectors", "successRate")),
        ],
        key=str,
    )
    (t,) = _inbound(r, "api", "timeout")
    conf = t["conf"]
    assert (conf["http_stream_idle_timeout_ms"], conf["http_max_stream_duration_ms"]) == (2000, 9000)
    assert conf["http_request_headers_timeout_ms"] == 1000
    (c,) = _inbound(r, "api", "circuit_breaker")
    assert (c["conf"]["healthy_panic_threshold"], c["conf"]["detectors"]["gateway_errors"]) == (
        0.0,
        {"consecutive": 2},
    )
    web = json.loads(r.bundles["default/web"])
    assert "http_request_headers_timeout_ms" not in json.dumps(web)  # unset: left out, digests kept


def test_inbound_access_logs_add_up_per_rule_and_caller(tmp_path: Path) -> None:
    every = _policy(
        "MeshAccessLog", "every", "{kind: Mesh}",
        "  from: [{targetRef: {kind: Mesh}, default: {backends: [{type: File, file: {path: /tmp/all.log}},"
        " {type: Tcp, tcp: {address: '127.0.0.1:5170'}}]}}]\n",
    )  # fmt: skip
    from_web = _policy(
        "MeshAccessLog", "from-web", API,
        f"  rules: [{{matches: [{_spiffe('Exact', 'web')}],"
        " default: {backends: [{type: File, file: {path: /tmp/web.log, format: {type: Json,"
        " json: [{key: k, value: '%START_TIME%'}]}}}]}}]\n",
    )  # fmt: skip
    r = _compile(tmp_path, every, from_web)
    assert r.diagnostics == []  # a Json format applies (``runtime.accesslog``)
    got = sorted((x["peer"].get("kuma.io/service", "*"), x["conf"]["backend"]["name"])
                 for x in _inbound(r, "api", "traffic_log"))  # fmt: skip
    assert got == [("*", "file:/tmp/all.log"), ("*", "tcp:127.0.0.1:5170"), ("web", "file:/tmp/web.log")]
    (web,) = [x for x in _inbound(r, "api", "traffic_log") if x["peer"]]
    assert web["conf"]["backend"]["json_format"] == [["k", "%START_TIME%"]]
    assert len(_inbound(r, "backend", "traffic_log")) == 2


def test_bundles_without_the_new_inbound_kinds_keep_their_bytes(tmp_path: Path) -> None:
    """No inbound MeshTimeout, MeshCircuitBreaker or MeshAccessLog: the inbound holds the three
    fields it always did, so digests stay those of bundles made before the new ones existed."""
    r = _compile(tmp_path, _policy("MeshTimeout", "out", "{kind: Mesh}",
                 "  to: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 2s}}]\n"))  # fmt: skip
    for s in ("web", "api", "backend"):
        assert sorted(json.loads(r.bundles[f"default/{s}"])["inbound"]) == [
            "fault_injection",
            "permissions",
            "rate_limit",
        ]


def test_dataplane_by_labels_selects_instances_and_by_name_or_section_is_named(tmp_path: Path) -> None:
    to_api = "  to: [{targetRef: {kind: MeshService, name: api}, default: {connectionTimeout: 2s}}]\n"
    r = _compile(
        tmp_path,
        _policy("MeshTimeout", "by-labels", "{kind: Dataplane, labels: {kuma.io/service: web, zone: a}}",
                to_api),
        _policy("MeshTimeout", "by-name", "{kind: Dataplane, name: web-1}", to_api),
        _policy("MeshRateLimit", "by-section", "{kind: Dataplane, labels: {app: x}, sectionName: http}",
                f"  rules: [{{default: {_limit(1, '1s')}}}]\n"),
    )  # fmt: skip
    # Dataplane labels are the instance's own labels (``label:`` conditions), not its tags; by
    # name: the instances whose kuma.io/display-name label is web-1.
    mesh_wide = json.loads(r.bundles["default"])["destinations"]["api"]["timeout"]
    timeouts = [(t["when"], t["conf"]["connect_timeout_ms"]) for t in mesh_wide]
    assert ({"label:kuma.io/service": "web", "label:zone": "a"}, 2000) in timeouts
    assert ({"label:kuma.io/display-name": "web-1"}, 2000) in timeouts
    # A bare Dataplane selects every sidecar (Kuma's ``allDataplanesSelected``).
    every = _compile(tmp_path / "every", _policy("MeshTimeout", "all-dp", "{kind: Dataplane}", to_api))
    assert every.diagnostics == []
    assert [
        t["conf"]["connect_timeout_ms"]
        for t in json.loads(every.bundles["default"])["destinations"]["api"]["timeout"]
    ] == [2000]
    # sectionName names an inbound by its port: no selected service's port is "http".
    msgs = {d.loc.path: d.message for d in r.diagnostics if d.code == "W3006"}
    assert list(msgs) == [("spec", "targetRef", "sectionName")]
    assert "sectionName 'http' that names no inbound" in msgs[("spec", "targetRef", "sectionName")]


def _outbound(r: CompileResult, src: str, dst: str, field: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = json.loads(r.bundles[f"default/{src}"])["outbound"][dst][field]
    return rules


def test_a_policy_on_a_missing_mesh_http_route_names_it_and_one_on_a_route_applies_to_its_rules(
    tmp_path: Path,
) -> None:
    r = _compile(
        tmp_path,
        _policy("MeshTimeout", "route-timeout", "{kind: MeshHTTPRoute, name: api-route}",
                "  to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 1s}}}]\n"),
        _policy("MeshRetry", "route-retry", "{kind: MeshHTTPRoute, name: api-route}",
                "  to: [{targetRef: {kind: Mesh}, default: {http: {numRetries: 2}}}]\n"),
    )  # fmt: skip
    msgs = sorted((d.message, d.loc.path) for d in r.diagnostics if d.code == "W3006")
    assert len(msgs) == 2, [(d.code, d.message) for d in r.diagnostics]
    assert all("a MeshHTTPRoute 'api-route' that the mesh does not have" in m for m, _ in msgs)
    assert all(p == ("spec", "targetRef") for _, p in msgs)
    route = _policy(
        "MeshHTTPRoute", "api-route", "{kind: MeshService, name: web}",
        "  to: [{targetRef: {kind: MeshService, name: api},"
        " rules: [{matches: [{path: {type: PathPrefix, value: /v2}}],"
        " default: {backendRefs: [{kind: MeshService, name: api}]}}]}]\n",
    )  # fmt: skip
    with_route = _compile(tmp_path / "with-route", route, _policy(
        "MeshTimeout", "route-timeout", "{kind: MeshHTTPRoute, name: api-route}",
        "  to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 1s}}}]\n",
    ))  # fmt: skip
    assert [d for d in with_route.diagnostics if d.code == "W3006"] == []
    # The route's rule carries the timeout; web's timeout to api stays meshc's default.
    assert [x["conf"]["http_request_timeout_ms"] for x in _outbound(with_route, "web", "api", "timeout")] == [
        15000
    ]
    (rule,) = _outbound(with_route, "web", "api", "route")[0]["conf"]["http"]
    assert rule["match"]["path"]["value"] == "/v2"
    assert rule["timeout"]["http_request_timeout_ms"] == 1000 and "retry" not in rule


def test_two_common_limits_ordered_only_by_name_warn(tmp_path: Path) -> None:
    r = _compile(
        tmp_path,
        _policy("MeshRateLimit", "b-limit", API, f"  rules: [{{default: {_limit(1, '1s')}}}]\n"),
        _policy("MeshRateLimit", "a-limit", API, f"  rules: [{{default: {_limit(2, '1s')}}}]\n"),
    )  # fmt: skip
    w = _only(r, "W3004")
    assert (
        "'a-limit' overrides MeshRateLimit 'b-limit' for * -> api only because its name sorts first"
        in w.message
    )
    assert [x["conf"]["requests"] for x in _inbound(r, "api", "rate_limit")] == [2]  # the smaller name wins


# --- meshc explain -------------------------------------------------------------------------------


def test_explain_names_the_rules_each_inbound_rule_came_from() -> None:
    from compiler.explain import explain, line_finder

    result, resolved, parsed = compile_resolved(read_policy_dir(FIXTURE))
    x = explain(result, resolved, "default", "api", line_finder(parsed))
    fields = {s["field"]: s for s in x["inbound"]}
    limit = fields["rate_limit"]
    web, common = limit["policies"][:2]
    assert (web["name"], web["item"], web["rule"]) == (
        "api-from-web", "rules[0] spiffeID Exact spiffe://default/web", 0
    )  # fmt: skip
    assert (common["name"], common["item"], common["rule"]) == ("api-common", "from[0] all callers", 0)
    assert {o["field"] for o in common["overridden"]} == {
        "local.http.requestRate.num",
        "local.http.requestRate.interval",
    }
    assert all("goes over the rules for all callers" in o["reason"] for o in common["overridden"])
    assert limit["rules"] == json.loads(result.bundles["default/api"])["inbound"]["rate_limit"]
    perms = fields["permissions"]["policies"]
    deny = [p for p in perms if p["name"] == "api-not-from-backend"]
    assert deny and deny[0]["item"] == "rules[0] deny spiffeID Exact spiffe://default/backend"
    assert deny[0]["line"] == 32  # the deny match, in permissions.yaml
    faults = fields["fault_injection"]
    assert faults["shadowed"] == [] and {p["item"] for p in faults["policies"]} == {
        "rules[0] all callers", "rules[1] spiffeID Exact spiffe://default/web"
    }  # fmt: skip


def test_a_spiffe_id_of_another_trust_domain_matches_no_caller_and_says_so(tmp_path: Path) -> None:
    rules = (
        "  rules:\n"
        "    - matches: [{spiffeID: {type: Exact, value: 'spiffe://prod.example/ns/shop/sa/web'}}]\n"
        f"      default: {_limit(1, '1s')}\n"
        f"    - default: {_limit(10, '1s')}\n"
    )
    r = _compile(tmp_path, _policy("MeshRateLimit", "api", API, rules))
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 0, "matches", 0)
    assert "covers no service of the mesh: meshc's identities are spiffe://default/<service>" in w.message
    assert [(x["peer"], x["conf"]["requests"]) for x in _inbound(r, "api", "rate_limit")] == [({}, 10)]


# --- the compiled rules on the data path ----------------------------------------------------------


def test_the_sidecar_decides_the_fixtures_rules_per_caller_identity() -> None:
    """The fixture's bundles, loaded as a sidecar of api (version v2) loads them, decide inbound
    calls by the caller's certificate identity: backend is denied, web is limited at 5 per 10 s
    with the common 423, and v2 delays web (50 %) and aborts some of everyone's (10 %)."""
    import random

    from runtime.bundle import MeshBundle, ServiceBundle, load_bundle
    from runtime.decide import Reply, decide_inbound
    from runtime.engine import Engine
    from runtime.identity import PeerIdentity
    from runtime.protocol import EndpointSet

    r = compile_dir(FIXTURE)
    mesh, svc = load_bundle(r.bundles["default"]), load_bundle(r.bundles["default/api"])
    assert isinstance(mesh, MeshBundle) and isinstance(svc, ServiceBundle)
    now = [1000.0]
    engine = Engine("api", {"version": "v2"}, rng=random.Random(3), clock=lambda: now[0])
    snap = engine.build(mesh, svc, EndpointSet(generation=1, services={}))
    engine.install(snap)

    def call(service: str) -> Any:
        peer = PeerIdentity("default", service, {"kuma.io/service": service})
        return decide_inbound(engine, snap, True, peer, "")

    denied = call("backend")
    assert isinstance(denied, Reply) and denied.status == 403
    burst = [call("web") for _ in range(40)]  # no time passes: the bucket holds 5
    limited = [v for v in burst if isinstance(v, Reply) and v.reason == "local_rate_limited"]
    assert len(limited) == 35 and {v.status for v in limited} == {423} and burst[5] in limited
    spaced = []
    for _ in range(200):  # 2 s apart: a token each time (5 per 10 s), so faults alone decide
        now[0] += 2.0
        spaced.append(call("web"))
    assert not any(isinstance(v, Reply) and v.reason == "local_rate_limited" for v in spaced)
    delays = sum(1 for v in spaced if getattr(v, "delay_s", 0) == 2.0)
    aborts = sum(1 for v in spaced if isinstance(v, Reply) and v.status == 503)
    assert 70 <= delays <= 130 and 5 <= aborts <= 40, (delays, aborts)  # 50 % and 10 %
    # api calling itself: the common limit (100 per s) and only the common faults (abort 10 %).
    own = [call("api") for _ in range(101)]
    assert [isinstance(v, Reply) and v.reason == "local_rate_limited" for v in own].count(True) == 1
    aborted = sum(1 for v in own if isinstance(v, Reply) and v.status == 503)
    assert 2 <= aborted <= 25 and not any(getattr(v, "delay_s", 0) for v in own)


def test_without_mtls_a_spiffe_match_matches_no_caller_as_in_kuma(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    rules = (
        "  rules:\n"
        f"    - matches: [{_spiffe('Exact', 'web')}]\n"
        f"      default: {_limit(1, '1s')}\n"
        f"    - default: {_limit(10, '1s')}\n"
    )
    catalog = CATALOG.replace(
        "spec: {mtls: {enabledBackend: ca, backends: [{name: ca, type: builtin}]}}", "spec: {}"
    )
    (d / "p.yaml").write_text(catalog + _policy("MeshRateLimit", "api", API, rules), encoding="utf-8")
    r = compile_dir(d)
    w = _only(r, "W3006")
    assert w.loc.path == ("spec", "rules", 0, "matches", 0) and "a mesh without mTLS" in w.message
    got = [
        (x["peer"], x["conf"]["requests"])
        for x in json.loads(r.bundles["default/api"])["inbound"]["rate_limit"]
    ]
    assert got == [({}, 10)]


def test_instances_selected_by_two_policies_get_both_merged_not_an_error(tmp_path: Path) -> None:
    """Kuma merges every policy that selects an instance: an instance labelled version v2 and
    zone a gets both limits merged (the union of the labels, listed first), outbound as inbound;
    the two conditions of one size are no E3002 conflict. (Dataplane ``labels`` are the
    instance's Dataplane labels, ``label:`` conditions, not its tags.)"""
    v2 = "{kind: Dataplane, labels: {app: api, version: v2}}"
    zone = "{kind: Dataplane, labels: {app: api, zone: a}}"
    r = _compile(
        tmp_path,
        _policy("MeshRateLimit", "v2", v2, f"  rules: [{{default: {_limit(5, '1s')}}}]\n"),
        _policy("MeshRateLimit", "zone", zone, f"  rules: [{{default: {_limit(7, '2s', STATUS_499)}}}]\n"),
        _policy("MeshTimeout", "t-v2", v2,
                "  to: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 1s}}]\n"),
        _policy("MeshTimeout", "t-zone", zone,
                "  to: [{targetRef: {kind: Mesh}, default: {http: {requestTimeout: 2s}}}]\n"),
    )  # fmt: skip
    assert [d.code for d in r.diagnostics if d.severity == "error"] == []
    limits = [
        (x["when"], x["conf"]["requests"], x["conf"]["status"]) for x in _inbound(r, "api", "rate_limit")
    ]
    app, v2_, zone_ = ("label:app", "api"), ("label:version", "v2"), ("label:zone", "a")
    assert limits == [
        (dict([app, v2_, zone_]), 5, 499),  # v2's rate (its name sorts first: W3004), zone's status
        (dict([app, v2_]), 5, 429),
        (dict([app, zone_]), 7, 499),
    ]
    assert {d.code for d in r.diagnostics} == {"W3004"}  # per service: labels name none
    timeouts = [
        (x["when"], x["conf"]["connect_timeout_ms"], x["conf"]["http_request_timeout_ms"])
        for x in json.loads(r.bundles["default"])["destinations"]["web"]["timeout"]
    ]
    assert timeouts[:3] == [(dict([app, v2_, zone_]), 1000, 2000), (dict([app, v2_]), 1000, 15000),
                            (dict([app, zone_]), 5000, 2000)]  # fmt: skip


def test_fault_rules_replace_the_from_faults_of_the_service_they_select(tmp_path: Path) -> None:
    """MeshFaultInjection is not from-as-rules: its plugin reads the inbound rules alone where a
    policy has some for the proxy, else the ``from`` items. A mesh-wide ``from`` stays for web."""
    r = _compile(
        tmp_path,
        _policy("MeshFaultInjection", "mesh-from", "{kind: Mesh, proxyTypes: [Sidecar]}",
                "  from: [{targetRef: {kind: Mesh},"
                " default: {http: [{abort: {httpStatus: 500, percentage: 1}}]}}]\n"),
        _policy("MeshFaultInjection", "api-rules", API,
                "  rules: [{default: {http: [{delay: {value: 1s, percentage: 5}}]}}]\n"),
    )  # fmt: skip
    w = _only(r, "W3007")
    assert w.loc.path == ("spec", "from", 0) and "MeshFaultInjection 'api-rules' has `rules`" in w.message
    (api,) = _inbound(r, "api", "fault_injection")
    assert (api["peer"], api["conf"]["abort"], api["conf"]["delay"]) == (
        {},
        None,
        {"percentage": 5.0, "value_ms": 1000},
    )
    (web,) = _inbound(r, "web", "fault_injection")
    assert (web["conf"]["abort"], web["conf"]["delay"]) == ({"http_status": 500, "percentage": 1.0}, None)


def test_the_sidecar_applies_compiled_inbound_timeouts_limits_and_logs(tmp_path: Path) -> None:
    """Compiled inbound MeshTimeout, MeshCircuitBreaker and MeshAccessLog, loaded as api's
    sidecar loads them (the bytes round-trip through the bundle model): web gets its own request
    timeout, others the common one; the limit refuses the third request in flight; both callers
    are logged, web twice (its own rule too)."""
    from runtime.bundle import MeshBundle, ServiceBundle, bundle_bytes, load_bundle
    from runtime.decide import Forward, Reply, admit_app, decide_inbound
    from runtime.engine import Engine
    from runtime.identity import PeerIdentity
    from runtime.protocol import EndpointSet

    r = _compile(
        tmp_path,
        _policy("MeshTimeout", "api-in", API,
                "  rules:\n    - default: {connectionTimeout: 2s, http: {requestTimeout: 3s}}\n"
                f"    - matches: [{_spiffe('Exact', 'web')}]\n"
                "      default: {http: {requestTimeout: 1s}}\n"),
        _policy("MeshCircuitBreaker", "api-cb", API,
                "  from: [{targetRef: {kind: Mesh}, default: {connectionLimits: {maxConnections: 1,"
                " maxPendingRequests: 1}}}]\n"),
        _policy("MeshAccessLog", "all", "{kind: Mesh}",
                "  from: [{targetRef: {kind: Mesh},"
                " default: {backends: [{type: File, file: {path: /tmp/a.log}}]}}]\n"),
        _policy("MeshAccessLog", "web", API,
                f"  rules: [{{matches: [{_spiffe('Prefix', 'w')}],"
                " default: {backends: [{type: File, file: {path: /tmp/w.log}}]}}]\n"),
    )  # fmt: skip
    assert r.diagnostics == [], _codes(r)
    data = r.bundles["default/api"]
    mesh, svc = load_bundle(r.bundles["default"]), load_bundle(data)
    assert isinstance(mesh, MeshBundle) and isinstance(svc, ServiceBundle)
    assert bundle_bytes(svc) == data  # the compiler writes what the model serializes
    engine = Engine("api", {"version": "v1"})
    snap = engine.build(mesh, svc, EndpointSet(generation=1, services={}))

    def call(service: str) -> Forward:
        peer = PeerIdentity("default", service, {"kuma.io/service": service})
        verdict = decide_inbound(engine, snap, True, peer, "")
        assert isinstance(verdict, Forward)
        return verdict

    web, backend = call("web"), call("backend")
    assert (web.app.request_timeout_s, web.app.connect_s) == (1.0, 2.0)
    assert (backend.app.request_timeout_s, backend.app.connect_s) == (3.0, 2.0)
    assert sorted(x.backend.path or "" for x in web.app.logs) == ["/tmp/a.log", "/tmp/w.log"]
    assert [x.backend.path for x in backend.app.logs] == ["/tmp/a.log"]
    assert admit_app(web, 0.0) is None and admit_app(backend, 0.0) is None  # 1 connection + 1 pending
    over = admit_app(call("api"), 0.0)
    assert isinstance(over, Reply) and (over.status, over.overflow) == (503, True)


def test_an_inbound_idle_timeout_applies_to_tcp_services_and_is_named_on_http_ones(tmp_path: Path) -> None:
    db = "---\napiVersion: meshc/v1alpha1\nkind: Service\nmesh: default\nmetadata: {name: db}\n"
    db += "spec: {port: 5432, protocol: tcp}\n"
    idle = "  from: [{targetRef: {kind: Mesh}, default: {idleTimeout: 30s}}]\n"
    r = _compile(
        tmp_path,
        db,
        _policy("MeshTimeout", "db-idle", "{kind: MeshService, name: db}", idle),
        _policy("MeshTimeout", "web-idle", "{kind: MeshService, name: web}", idle),
    )
    (w,) = r.diagnostics
    assert (w.code, w.loc.path) == ("W3006", ("spec", "from", 0, "default", "idleTimeout"))
    assert "the inbound idleTimeout of the HTTP service web" in w.message and "'web-idle'" not in w.message
    assert w.loc.doc == 6  # web-idle: the catalog's 4 documents, db, db-idle, then web-idle
    assert [t["conf"]["tcp_idle_timeout_ms"] for t in _inbound(r, "db", "timeout")] == [30000]
