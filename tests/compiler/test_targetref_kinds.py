"""The targetRef kinds in a policy repo: both forms, the mesh label, examples, and what compile says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from compiler.kinds import REGISTRY
from compiler.pipeline import CompileResult, compile_dir

MESH = "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n"
TARGETREF = [k for k in REGISTRY.values() if k.dialect == "targetref"]


def _compile(tmp_path: Path, text: str, mesh: str = MESH) -> CompileResult:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "mesh.yaml").write_text(mesh, encoding="utf-8")
    (d / "policy.yaml").write_text(text, encoding="utf-8")
    return compile_dir(d)


def _codes(r: CompileResult) -> list[tuple[str, int, int]]:
    return [(d.code, d.span.line, d.span.column) for d in r.diagnostics if d.span]


def test_all_seventeen_kinds_are_registered() -> None:
    names = {k.kind for k in TARGETREF}
    assert names == {
        "MeshHTTPRoute", "MeshTCPRoute", "MeshTrafficPermission", "MeshTimeout", "MeshRetry",
        "MeshCircuitBreaker", "MeshHealthCheck", "MeshFaultInjection", "MeshRateLimit",
        "MeshLoadBalancingStrategy", "MeshAccessLog", "MeshPassthrough", "MeshTrace", "MeshMetric",
        "MeshTLS", "MeshProxyPatch", "MeshService",
    }  # fmt: skip
    assert all(k.api_version == "kuma.io/v1alpha1" for k in TARGETREF)


@pytest.mark.parametrize("kind", [k.kind for k in TARGETREF])
def test_documented_valid_example_validates(kind: str, tmp_path: Path) -> None:
    doc = REGISTRY[kind].doc
    block = re.search(r"Valid::\n\n((?:    .*\n|\n)+)", doc)
    assert block, f"{kind}: no Valid:: example"
    text = "\n".join(line[4:] for line in block.group(1).splitlines())
    assert yaml.safe_load(text)["kind"] == kind
    r = _compile(tmp_path, text)
    assert not r.errors, [(d.code, d.message) for d in r.diagnostics]
    # Compiled kinds resolve into bundles (compiler.resolve_targetref); the others say they do not.
    expected = [] if REGISTRY[kind].compiled else ["W1004" if kind == "MeshProxyPatch" else "W1003"]
    assert [d.code for d in r.diagnostics] == expected
    assert r.bundles


TIMEOUT = """apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata:
  name: t
  labels: {{kuma.io/mesh: {mesh}}}
spec:
  to:
    - targetRef: {{kind: Mesh}}
      default: {{connectionTimeout: {timeout}}}
"""


def test_the_mesh_is_the_label_and_default_without_one(tmp_path: Path) -> None:
    service = "---\napiVersion: meshc/v1alpha1\nkind: Service\nmesh: default\n"
    service += "metadata: {name: s}\nspec: {port: 80}\n"
    r = _compile(tmp_path, TIMEOUT.format(mesh="default", timeout="2s") + service)
    assert _codes(r) == []
    mesh = json.loads(r.bundles["default"])
    assert mesh["destinations"]["s"]["timeout"][0]["conf"]["connect_timeout_ms"] == 2000
    r = _compile(tmp_path, TIMEOUT.format(mesh="other", timeout="2s"))
    assert [d.code for d in r.diagnostics if d.severity == "error"] == ["E2003"]
    no_label = TIMEOUT.format(mesh="x", timeout="2s").replace("  labels: {kuma.io/mesh: x}\n", "")
    assert not _compile(tmp_path, no_label).errors


def test_a_top_level_mesh_is_an_unknown_key(tmp_path: Path) -> None:
    text = TIMEOUT.format(mesh="default", timeout="2s").replace("metadata:", "mesh: default\nmetadata:")
    r = _compile(tmp_path, text)
    assert [(d.code, d.span.line) for d in r.diagnostics if d.severity == "error" and d.span] == [
        ("E1001", 3)
    ]
    assert "kuma.io/mesh" in r.diagnostics[0].message


def test_kuma_violation_at_line_and_column(tmp_path: Path) -> None:
    r = _compile(tmp_path, TIMEOUT.format(mesh="default", timeout="-1s"))
    errors = [d for d in r.diagnostics if d.severity == "error"]
    assert _codes(r) == [("E1005", 9, 36)]
    assert errors[0].message == "must be greater than zero when defined"
    assert not r.bundles


def test_universal_form(tmp_path: Path) -> None:
    text = (
        "type: MeshRetry\nname: r\nmesh: default\nto:\n  - targetRef: {kind: Mesh}\n    default: {tcp: {}}\n"
    )
    r = _compile(tmp_path, text)
    assert _codes(r) == [("E1003", 6, 15)]
    assert r.diagnostics[0].message == "must not be empty"


def test_go_strings_take_yaml_numbers_but_integers_take_no_strings(tmp_path: Path) -> None:
    retry = (
        "apiVersion: kuma.io/v1alpha1\nkind: MeshRetry\nmetadata: {name: r}\nspec:\n"
        "  to:\n    - targetRef: {kind: Mesh}\n      default: {http: {retryOn: [503, 5xx], numRetries: N}}\n"
    )
    assert not _compile(tmp_path, retry.replace("N", "3")).errors
    r = _compile(tmp_path, retry.replace("N", '"3"'))
    assert [d.code for d in r.diagnostics if d.severity == "error"] == ["E1002"]


def test_meshservice_name_length(tmp_path: Path) -> None:
    ms = "apiVersion: kuma.io/v1alpha1\nkind: MeshService\nmetadata: {name: NAME}\nspec: {}\n"
    assert not _compile(tmp_path, ms.replace("NAME", "a" * 63)).errors
    r = _compile(tmp_path, ms.replace("NAME", "a" * 64))
    assert _codes(r) == [("E1005", 3, 18)]
    assert r.diagnostics[0].message == "must not be longer than 63 characters"
