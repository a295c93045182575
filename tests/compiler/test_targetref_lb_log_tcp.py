"""MeshLoadBalancingStrategy, MeshAccessLog and MeshTCPRoute resolved into bundles.

Where a legacy policy says the same thing (TrafficRoute's ``loadBalancer`` and split to a TCP
service), both dialects must compile to byte-identical bundles; what a bundle cannot hold is a
W3006 at the setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_targetref_resolve import CATALOG as BASE_CATALOG

from compiler.cli import main
from compiler.pipeline import CompileResult, compile_dir

CATALOG = (
    BASE_CATALOG
    + """---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: db}
spec: {port: 5432, protocol: tcp, subsets: [{version: v1}, {version: v2}]}
"""
)


def _compile(tmp_path: Path, name: str, *docs: str) -> CompileResult:
    d = tmp_path / name
    d.mkdir()
    (d / "policies.yaml").write_text(CATALOG + "".join(f"---\n{x}" for x in docs), encoding="utf-8")
    return compile_dir(d)


def _targetref(kind: str, name: str, top: str, to: str, body: str) -> str:
    return (
        f"apiVersion: kuma.io/v1alpha1\nkind: {kind}\n"
        f"metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}\n"
        f"spec:\n  targetRef: {top}\n  to:\n    - targetRef: {to}\n{body}"
    )


def _lb(default: str, to: str = "{kind: MeshService, name: api}") -> str:
    return _targetref("MeshLoadBalancingStrategy", "lb", "{kind: Mesh}", to, f"      default: {default}\n")


def _legacy_route(conf: str, dst: str = "api") -> str:
    return (
        "apiVersion: kuma.io/v1alpha1\nkind: TrafficRoute\nmesh: default\nmetadata: {name: r}\nspec:\n"
        "  sources: [{match: {kuma.io/service: '*'}}]\n"
        f"  destinations: [{{match: {{kuma.io/service: {dst}}}}}]\n  conf: {conf}\n"
    )


def _route(r: CompileResult, key: str, dst: str) -> list[dict[str, Any]]:
    bundle = json.loads(r.bundles[key])
    dests = bundle["destinations"] if bundle["type"] == "mesh" else bundle["outbound"]
    rules: list[dict[str, Any]] = dests[dst]["route"]
    return rules


def _codes(r: CompileResult) -> list[tuple[str, str]]:
    return [(d.code, d.message) for d in r.diagnostics]


@pytest.mark.parametrize(
    ("targetref", "legacy", "expected"),
    [
        (
            "{loadBalancer: {type: LeastRequest, leastRequest: {choiceCount: 3}}}",
            "{leastRequest: {choiceCount: 3}}",
            {"type": "least_request", "choice_count": 3},
        ),
        (
            "{loadBalancer: {type: RingHash,"
            " ringHash: {hashFunction: MurmurHash2, minRingSize: 64, maxRingSize: 128}}}",
            "{ringHash: {hashFunction: MURMUR_HASH_2, minRingSize: 64, maxRingSize: 128}}",
            {
                "type": "ring_hash",
                "hash_function": "MURMUR_HASH_2",
                "min_ring_size": 64,
                "max_ring_size": 128,
            },
        ),
        ("{loadBalancer: {type: Random}}", "{random: {}}", {"type": "random"}),
        ("{loadBalancer: {type: Maglev}}", "{maglev: {}}", {"type": "maglev"}),
        ("{loadBalancer: {type: RoundRobin}}", "{roundRobin: {}}", {"type": "round_robin"}),
    ],
)
def test_a_load_balancing_strategy_compiles_as_the_legacy_load_balancer(
    tmp_path: Path, targetref: str, legacy: str, expected: dict[str, Any]
) -> None:
    new = _compile(tmp_path, "new", _lb(targetref))
    old = _compile(
        tmp_path, "old", _legacy_route(f"{{destination: {{kuma.io/service: api}}, loadBalancer: {legacy}}}")
    )
    assert not new.diagnostics, _codes(new)
    assert not old.errors, _codes(old)
    (rule,) = _route(new, "default", "api")
    assert expected.items() <= rule["conf"]["load_balancer"].items()
    assert rule["conf"]["split"] == [{"service": "api", "tags": {}, "weight": 100}]
    assert new.digests == old.digests


def test_what_the_load_balancer_cannot_hold_is_named(tmp_path: Path) -> None:
    default = (
        "{loadBalancer: {type: LeastRequest, leastRequest: {activeRequestBias: '1.5'}},"
        " localityAwareness: {localZone: {affinityTags: [{key: zone}]}},"
        " hashPolicies: [{type: Header, header: {name: x-user}}]}"
    )
    r = _compile(tmp_path, "p", _lb(default))
    w = [d for d in r.diagnostics if d.code == "W3006"]
    assert sorted(d.message.split(" of a ")[0] for d in w) == [
        "meshc does not resolve `activeRequestBias`",
        "meshc does not resolve `hashPolicies` (the sidecar hashes no request attribute)",
        "meshc does not resolve `localityAwareness` (zone-aware routing and failover)",
    ]
    assert len({(d.span.line, d.span.column) for d in w if d.span}) == 3  # each at its own key
    (rule,) = _route(r, "default", "api")
    assert rule["conf"]["load_balancer"]["type"] == "least_request"  # the rest still applies


def test_a_load_balancer_joins_the_http_route_of_its_destination(tmp_path: Path) -> None:
    route = _targetref(
        "MeshHTTPRoute",
        "canary",
        "{kind: MeshService, name: web}",
        "{kind: MeshService, name: db}",
        "      rules:\n        - matches: [{path: {type: PathPrefix, value: /}}]\n"
        "          default: {backendRefs: [{kind: MeshServiceSubset, name: db, tags: {version: v2}}]}\n",
    )
    lb = _lb("{loadBalancer: {type: Random}}", "{kind: MeshService, name: db}")
    r = _compile(tmp_path, "p", route, lb)
    assert not r.diagnostics, _codes(r)
    (rule,) = _route(r, "default/web", "db")
    assert rule["conf"]["split"] == [{"service": "db", "tags": {"version": "v2"}, "weight": 1}]
    assert rule["conf"]["load_balancer"]["type"] == "random"
    (anyone,) = _route(r, "default", "db")  # other callers: the balancer only
    assert anyone["conf"]["split"] == [{"service": "db", "tags": {}, "weight": 100}]


TCP_ROUTE = _targetref(
    "MeshTCPRoute",
    "db-split",
    "{kind: Mesh}",
    "{kind: MeshService, name: db}",
    "      rules:\n        - default:\n            backendRefs:\n"
    "              - {kind: MeshServiceSubset, name: db, tags: {version: v1}, weight: 70}\n"
    "              - {kind: MeshServiceSubset, name: db, tags: {version: v2}, weight: 30}\n",
)
LEGACY_TCP = _legacy_route(
    "{split: [{weight: 70, destination: {kuma.io/service: db, version: v1}},"
    " {weight: 30, destination: {kuma.io/service: db, version: v2}}]}",
    "db",
)


def test_a_tcp_route_compiles_as_the_legacy_split(tmp_path: Path) -> None:
    new = _compile(tmp_path, "new", TCP_ROUTE)
    old = _compile(tmp_path, "old", LEGACY_TCP)
    assert not new.diagnostics and not old.errors, (_codes(new), _codes(old))
    (rule,) = _route(new, "default", "db")
    assert [(s["tags"], s["weight"]) for s in rule["conf"]["split"]] == [
        ({"version": "v1"}, 70),
        ({"version": "v2"}, 30),
    ]
    assert new.digests == old.digests


def test_a_legacy_tcp_route_converts_to_byte_identical_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "policies.yaml").write_text(CATALOG + "---\n" + LEGACY_TCP)
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "-> MeshTCPRoute" in capsys.readouterr().out
    assert "kind: MeshTCPRoute" in (tmp_path / "out" / "policies.yaml").read_text()
    assert compile_dir(tmp_path / "out").digests == compile_dir(src).digests


@pytest.mark.parametrize(
    "lb",
    [
        "{leastRequest: {choiceCount: 4}}",
        "{ringHash: {hashFunction: MURMUR_HASH_2, minRingSize: 8}}",
        "{maglev: {}}",
        "{random: {}}",
    ],
)
def test_a_legacy_load_balancer_converts_to_byte_identical_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lb: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    route = _legacy_route(f"{{destination: {{kuma.io/service: api}}, loadBalancer: {lb}}}")
    (src / "policies.yaml").write_text(CATALOG + "---\n# keep me\n" + route.replace("'*'", "web"))
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "TrafficRoute 'r' -> MeshHTTPRoute + MeshLoadBalancingStrategy" in capsys.readouterr().out
    text = (tmp_path / "out" / "policies.yaml").read_text()
    assert "# keep me\napiVersion: kuma.io/v1alpha1\nkind: MeshHTTPRoute\n" in text
    assert "kind: MeshLoadBalancingStrategy" in text and "name: r-lb" in text
    out = compile_dir(tmp_path / "out")
    assert not out.diagnostics, _codes(out)
    assert out.digests == compile_dir(src).digests


def test_an_http_route_beats_a_tcp_route_to_the_same_destination(tmp_path: Path) -> None:
    http = _targetref(
        "MeshHTTPRoute",
        "db-http",
        "{kind: Mesh}",
        "{kind: MeshService, name: db}",
        "      rules:\n        - matches: [{path: {type: PathPrefix, value: /}}]\n"
        "          default: {backendRefs: [{kind: MeshServiceSubset, name: db, tags: {version: v2}}]}\n",
    )
    r = _compile(tmp_path, "p", TCP_ROUTE, http)
    (w,) = [d for d in r.diagnostics if d.code == "W3006"]
    assert "MeshTCPRoute where a MeshHTTPRoute routes the same destination" in w.message
    (rule,) = _route(r, "default", "db")
    assert rule["conf"]["split"] == [{"service": "db", "tags": {"version": "v2"}, "weight": 1}]


def _log(name: str, top: str, to: str, default: str) -> str:
    return _targetref("MeshAccessLog", name, top, to, f"      default: {default}\n")


def _logs(r: CompileResult, key: str, dst: str) -> list[dict[str, Any]]:
    bundle = json.loads(r.bundles[key])
    dests = bundle["destinations"] if bundle["type"] == "mesh" else bundle["outbound"]
    return [x["conf"]["backend"] for x in dests[dst]["traffic_log"]]


def test_an_access_log_compiles_to_the_traffic_log_backend(tmp_path: Path) -> None:
    file_log = _log(
        "all",
        "{kind: Mesh}",
        "{kind: Mesh}",
        "{backends: [{type: File,"
        " file: {path: /var/log/mesh.log, format: {type: Plain, plain: '%START_TIME%'}}}]}",
    )
    tcp_log = _log(
        "web-api", "{kind: MeshService, name: web}", "{kind: MeshService, name: api}",
        "{backends: [{type: Tcp, tcp: {address: '127.0.0.1:5170'}}]}",
    )  # fmt: skip
    r = _compile(tmp_path, "p", file_log, tcp_log)
    assert not r.diagnostics, _codes(r)
    assert _logs(r, "default", "api") == [
        {"name": "file:/var/log/mesh.log", "type": "file", "format": "%START_TIME%",
         "path": "/var/log/mesh.log", "address": None}
    ]  # fmt: skip
    # web -> api: the more specific policy's backends replace the list (a merge patch replaces lists).
    assert _logs(r, "default/web", "api") == [
        {"name": "tcp:127.0.0.1:5170", "type": "tcp", "format": None, "path": None,
         "address": "127.0.0.1:5170"}
    ]  # fmt: skip
    assert _logs(r, "default", "db")[0]["type"] == "file"  # web's bundle names api only: db is the mesh's


def test_every_backend_of_a_log_rule_compiles_with_its_format(tmp_path: Path) -> None:
    many = _log(
        "many",
        "{kind: Mesh}",
        "{kind: Mesh}",
        "{backends: [{type: OpenTelemetry, openTelemetry: {endpoint: 'otel:4318',"
        " body: {kvlistValue: {values: [{key: mesh, value: {stringValue: '%KUMA_MESH%'}}]}},"
        " attributes: [{key: src, value: '%KUMA_SOURCE_SERVICE%'}]}},"
        " {type: File,"
        " file: {path: /tmp/a.log, format: {type: Json, omitEmptyValues: true,"
        " json: [{key: k, value: '%START_TIME%'}]}}},"
        " {type: Tcp, tcp: {address: '127.0.0.1:5170', format: {type: Plain, plain: '%RESPONSE_CODE%'}}}]}",
    )
    inbound = (
        "apiVersion: kuma.io/v1alpha1\nkind: MeshAccessLog\n"
        "metadata: {name: in, labels: {kuma.io/mesh: default}}\n"
        "spec:\n  targetRef: {kind: MeshService, name: api}\n"
        "  from: [{targetRef: {kind: Mesh},"
        " default: {backends: [{type: File, file: {path: /tmp/in.log}}]}}]\n"
    )
    r = _compile(tmp_path, "p", many, inbound)
    assert [d for d in r.diagnostics if d.code == "W3006"] == []
    bundle = json.loads(r.bundles["default"])
    (rule,) = bundle["destinations"]["api"]["traffic_log"]
    otel, file_, tcp = rule["conf"]["backend"], *rule["conf"]["also"]
    assert (otel["type"], otel["address"], otel["attributes"]) == (
        "otel", "otel:4318", [["src", "%KUMA_SOURCE_SERVICE%"]]
    )  # fmt: skip
    assert json.loads(otel["body"]) == {
        "kvlistValue": {"values": [{"key": "mesh", "value": {"stringValue": "%KUMA_MESH%"}}]}
    }
    assert (file_["json_format"], file_["omit_empty_values"]) == ([["k", "%START_TIME%"]], True)
    assert (tcp["type"], tcp["address"], tcp["format"]) == ("tcp", "127.0.0.1:5170", "%RESPONSE_CODE%")
    assert "json_format" not in tcp and "body" not in tcp  # unused fields stay out of the bytes
    # The inbound `from` is api's inbound access log now (a bundle's inbound holds logs).
    inbound_logs = json.loads(r.bundles["default/api"])["inbound"]["traffic_log"]
    assert [x["conf"]["backend"]["path"] for x in inbound_logs] == ["/tmp/in.log"]
    assert "also" not in inbound_logs[0]["conf"]


def test_what_the_data_planes_cannot_fill_in_a_log_is_named(tmp_path: Path) -> None:
    odd = _log(
        "odd",
        "{kind: Mesh}",
        "{kind: Mesh}",
        "{backends: [{type: OpenTelemetry, openTelemetry:"
        " {backendRef: {kind: MeshOpenTelemetryBackend, labels: {a: b}}}},"
        " {type: File, file: {path: /tmp/a.log, format: {type: Plain,"
        " plain: '%BYTES_SENT% %START_TIME(%s)% %RESPONSE_CODE% %BYTES_SENT%'}}},"
        " {type: OpenTelemetry, openTelemetry: {endpoint: 'otel:4317'}}]}",
    )
    r = _compile(tmp_path, "p", odd)
    msgs = sorted(d.message.split(" of a ")[0].removeprefix("meshc does not resolve ")
                  for d in r.diagnostics if d.code == "W3006")  # fmt: skip
    assert msgs == [
        "an OpenTelemetry backendRef (meshc has no MeshOpenTelemetryBackend; set `endpoint`)",
        "an endpoint on port 4317, OTLP/gRPC's (the data planes export OTLP/HTTP JSON: point it at the"
        " collector's OTLP/HTTP receiver, 4318 by convention)",
        "the operator %BYTES_SENT% (the data planes write it as '-')",
        "the operator %START_TIME(%s)% (the data planes write it as '-')",
    ]
    assert [x["path"] for x in _logs(r, "default", "api")] == ["/tmp/a.log"]


def test_turning_a_broader_log_off_is_named(tmp_path: Path) -> None:
    on = _log("on", "{kind: Mesh}", "{kind: Mesh}", "{backends: [{type: File, file: {path: /tmp/a.log}}]}")
    off = _log("off", "{kind: MeshService, name: web}", "{kind: MeshService, name: api}", "{backends: []}")
    r = _compile(tmp_path, "p", on, off)
    (w,) = [d for d in r.diagnostics if d.code == "W3006"]
    assert "`backends: []` under a broader MeshAccessLog" in w.message
    alone = _compile(tmp_path, "alone", off)
    assert not alone.diagnostics, _codes(alone)
    assert _logs(alone, "default", "api") == []


def test_the_incremental_compiler_agrees_through_edits_of_the_three_kinds() -> None:
    """Add, change and remove each kind: every update equals a cold compile (bundles, release,
    diagnostics), as the control plane relies on."""
    from test_incremental import assert_same
    from test_properties import _sources

    from compiler.incremental import IncrementalCompiler
    from compiler.pipeline import compile_sources

    log = _log("all", "{kind: Mesh}", "{kind: Mesh}", "{backends: [{type: File, file: {path: /tmp/a.log}}]}")
    steps = [
        {"c.yaml": CATALOG},
        {"c.yaml": CATALOG, "lb.yaml": _lb("{loadBalancer: {type: Random}}")},
        {"c.yaml": CATALOG, "lb.yaml": _lb("{loadBalancer: {type: Maglev}}"), "tcp.yaml": TCP_ROUTE},
        {"c.yaml": CATALOG, "tcp.yaml": TCP_ROUTE, "log.yaml": log, "old.yaml": LEGACY_TCP},
        {"c.yaml": CATALOG, "log.yaml": log.replace("/tmp/a.log", "/tmp/b.log")},
        {"c.yaml": CATALOG},
    ]
    inc = IncrementalCompiler()
    digests = set()
    for files in steps:
        src = _sources(files)
        got = inc.update(src).result
        assert_same(got, compile_sources(src))
        digests.add(tuple(sorted(got.digests.items())))
    assert len(digests) == len(steps) - 1  # every edit changed a bundle; the last is the first again
