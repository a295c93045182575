"""MeshTrace resolved into the bundles' tracing: the mesh bundle for a Mesh-wide policy, a
service's own bundle for one that names it; the legacy Mesh ``tracing`` loses to it (W3005);
what the data planes cannot honour is a W3006 at its place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compiler.incremental import IncrementalCompiler
from compiler.pipeline import CompileResult, compile_dir
from compiler.source import read_policy_dir

SERVICES = """---
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
spec: {port: 81}
"""
MESH = "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n"
LEGACY_MESH = """apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  tracing:
    defaultBackend: z
    backends: [{name: z, type: zipkin, sampling: 30, conf: {url: "http://legacy:9411/api/v2/spans"}}]
"""


def _trace(name: str, top: str, default: str) -> str:
    return (
        f"---\napiVersion: kuma.io/v1alpha1\nkind: MeshTrace\n"
        f"metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}\n"
        f"spec:\n  targetRef: {top}\n  default: {default}\n"
    )


ZIPKIN = "{type: Zipkin, zipkin: {url: 'http://zipkin:9411/api/v2/spans'}}"


def _compile(tmp_path: Path, mesh: str, *docs: str) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "policies.yaml").write_text(mesh + SERVICES + "".join(docs), encoding="utf-8")
    return compile_dir(d)


def _tracing(r: CompileResult, key: str) -> Any:
    return json.loads(r.bundles[key]).get("tracing")  # a service bundle leaves out None


def _found(r: CompileResult, code: str) -> list[Any]:
    return [d for d in r.diagnostics if d.code == code]


def test_a_mesh_wide_meshtrace_sets_the_mesh_bundles_backend(tmp_path: Path) -> None:
    r = _compile(
        tmp_path, MESH, _trace("t", "{kind: Mesh}", f"{{backends: [{ZIPKIN}], sampling: {{overall: 10}}}}")
    )
    assert not r.errors, r.diagnostics
    assert _tracing(r, "default") == {
        "name": "t",
        "type": "zipkin",
        "sampling": 10.0,
        "url": "http://zipkin:9411/api/v2/spans",
        "b3": True,
    }
    assert _tracing(r, "default/web") is None  # the mesh bundle's applies
    assert not _found(r, "W1003")  # MeshTrace is compiled now
    assert "MeshTrace" in {p["kind"] for p in r.release["provenance"]["default"]}


def test_sampling_defaults_to_100_and_random_times_overall(tmp_path: Path) -> None:
    r = _compile(tmp_path, MESH, _trace("t", "{kind: Mesh}", f"{{backends: [{ZIPKIN}]}}"))
    assert _tracing(r, "default")["sampling"] == 100.0
    r = _compile(
        tmp_path,
        MESH,
        _trace("t", "{kind: Mesh}", f"{{backends: [{ZIPKIN}], sampling: {{overall: '50', random: 20}}}}"),
    )
    assert _tracing(r, "default")["sampling"] == 10.0


def test_a_meshtrace_naming_a_service_shapes_only_that_services_bundle(tmp_path: Path) -> None:
    other = "{type: Zipkin, zipkin: {url: 'http://other:9411/api/v2/spans'}}"
    r = _compile(
        tmp_path,
        MESH,
        _trace("wide", "{kind: Mesh}", f"{{backends: [{ZIPKIN}], sampling: {{overall: 40}}}}"),
        _trace("api-only", "{kind: MeshService, name: api}", f"{{backends: [{other}]}}"),
        _trace("web-off", "{kind: MeshSubset, tags: {kuma.io/service: web}}", "{backends: []}"),
    )
    assert not r.errors, r.diagnostics
    assert _tracing(r, "default")["url"] == "http://zipkin:9411/api/v2/spans"
    api = _tracing(r, "default/api")["backend"]
    # The more specific policy wins; its default merges over the Mesh-wide one's (sampling kept).
    assert api["url"] == "http://other:9411/api/v2/spans" and api["sampling"] == 40.0
    assert _tracing(r, "default/web") == {"backend": None}  # backends: [] turns it off there
    kinds = {p["name"] for p in r.release["provenance"]["default/api"] if p["kind"] == "MeshTrace"}
    assert kinds == {"wide", "api-only"}


def test_the_meshtrace_wins_over_the_legacy_mesh_tracing_with_a_warning(tmp_path: Path) -> None:
    r = _compile(tmp_path, LEGACY_MESH)
    assert _tracing(r, "default")["url"] == "http://legacy:9411/api/v2/spans"  # unchanged alone
    assert not _found(r, "W3005")
    r = _compile(tmp_path, LEGACY_MESH, _trace("t", "{kind: Mesh}", f"{{backends: [{ZIPKIN}]}}"))
    assert _tracing(r, "default")["url"] == "http://zipkin:9411/api/v2/spans"
    (w,) = _found(r, "W3005")
    assert "MeshTrace 't'" in w.message and "legacy `tracing`" in w.message
    assert w.file.endswith("policies.yaml") and w.span is not None
    assert (w.span.line, w.span.column) == (5, 3)  # the Mesh's `tracing`
    assert w.related and w.related[0].message == "MeshTrace 't' is here"


def test_a_service_meshtrace_beats_the_legacy_tracing_there_only(tmp_path: Path) -> None:
    r = _compile(
        tmp_path, LEGACY_MESH, _trace("t", "{kind: MeshService, name: api}", f"{{backends: [{ZIPKIN}]}}")
    )
    assert _tracing(r, "default")["url"] == "http://legacy:9411/api/v2/spans"
    assert _tracing(r, "default/api")["backend"]["url"] == "http://zipkin:9411/api/v2/spans"
    assert _tracing(r, "default/web") is None
    (w,) = _found(r, "W3005")
    assert "of api" in w.message


def test_what_the_data_planes_cannot_honour_is_a_w3006_at_its_place(tmp_path: Path) -> None:
    dd = "{type: Datadog, datadog: {url: 'http://dd:8126'}}"
    otel = (
        "{type: OpenTelemetry, openTelemetry: {backendRef: {kind: MeshOpenTelemetryBackend, labels: {a: b}}}}"
    )
    proto = "{type: Zipkin, zipkin: {url: 'http://z:9411/api/v2/spans', apiVersion: httpProto}}"
    r = _compile(
        tmp_path,
        MESH,
        _trace("dd", "{kind: Mesh}", f"{{backends: [{dd}], tags: [{{name: team, literal: core}}]}}"),
        _trace("otel", "{kind: MeshService, name: api}", f"{{backends: [{otel}], sampling: {{client: 5}}}}"),
        _trace("proto", "{kind: MeshService, name: web}", f"{{backends: [{proto}]}}"),
        _trace("gw", "{kind: MeshGateway, name: edge}", f"{{backends: [{ZIPKIN}]}}"),
    )
    assert not r.errors, r.diagnostics
    got = sorted((d.span.line, d.span.column, d.message) for d in _found(r, "W3006") if d.span)
    messages = " | ".join(m for _, _, m in got)
    for what in (
        "a Datadog backend",
        "an OpenTelemetry backendRef",
        "`sampling.client`",
        "`apiVersion: httpProto`",
        "a top-level targetRef of kind MeshGateway",
    ):
        assert what in messages, messages
    assert all(m.endswith("it has no effect") for _, _, m in got)
    assert all(line > 1 and col > 1 for line, col, _ in got)  # at the setting, not the document
    assert "tags" not in messages  # span tags apply
    # A Datadog backend traces nothing in meshc: the mesh bundle has no backend.
    assert _tracing(r, "default") is None
    assert _tracing(r, "default/api") == {"backend": None}


def test_incremental_compile_of_a_meshtrace_change_equals_a_cold_one(tmp_path: Path) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    f = d / "policies.yaml"
    inc = IncrementalCompiler()
    f.write_text(LEGACY_MESH + SERVICES, encoding="utf-8")
    inc.update(read_policy_dir(d))
    f.write_text(
        LEGACY_MESH + SERVICES + _trace("t", "{kind: MeshService, name: api}", f"{{backends: [{ZIPKIN}]}}")
    )
    upd = inc.update(read_policy_dir(d))
    cold = compile_dir(d)
    assert upd.result.bundles == cold.bundles and upd.changed == ["default/api"]
    assert [x.code for x in upd.result.diagnostics] == [x.code for x in cold.diagnostics]


def test_a_name_tie_between_two_meshtraces_is_one_w3004(tmp_path: Path) -> None:
    other = "{type: Zipkin, zipkin: {url: 'http://other:9411/api/v2/spans'}}"
    r = _compile(
        tmp_path,
        MESH,
        _trace("aaa", "{kind: Mesh}", f"{{backends: [{ZIPKIN}]}}"),
        _trace("bbb", "{kind: Mesh}", f"{{backends: [{other}]}}"),
        _trace("api", "{kind: MeshService, name: api}", "{sampling: {overall: 5}, backends: []}"),
    )
    (tie,) = _found(r, "W3004")
    assert "'aaa' overrides MeshTrace 'bbb'" in tie.message
    assert _tracing(r, "default")["url"] == "http://zipkin:9411/api/v2/spans"  # the smaller name wins


def test_an_opentelemetry_backend_with_tags_compiles_to_otlp_http(tmp_path: Path) -> None:
    otel = "{type: OpenTelemetry, openTelemetry: {endpoint: 'collector:4318'}}"
    tags = "[{name: team, literal: core}, {name: tenant, header: {name: x-tenant, default: none}}]"
    r = _compile(
        tmp_path,
        MESH,
        _trace("otel", "{kind: Mesh}", f"{{backends: [{otel}], tags: {tags}, sampling: {{overall: 50}}}}"),
    )
    assert [d for d in r.diagnostics if d.code == "W3006"] == []
    assert _tracing(r, "default") == {
        "name": "otel",
        "type": "otel",
        "url": "http://collector:4318/v1/traces",
        "b3": False,
        "sampling": 50.0,
        "tags": [
            {"name": "team", "literal": "core", "header": None, "default": None},
            {"name": "tenant", "literal": None, "header": "x-tenant", "default": "none"},
        ],
    }


def test_an_opentelemetry_endpoint_on_the_grpc_port_is_named(tmp_path: Path) -> None:
    """4317 is where a collector speaks OTLP/gRPC: the data planes' OTLP/HTTP would all fail."""
    otel = "{type: OpenTelemetry, openTelemetry: {endpoint: 'collector:4317'}}"
    r = _compile(tmp_path, MESH, _trace("otel", "{kind: Mesh}", f"{{backends: [{otel}]}}"))
    (w,) = _found(r, "W3006")
    assert "port 4317, OTLP/gRPC's" in w.message and w.loc.path[-1] == "endpoint"
