"""Kubernetes manifests beside the policies: the seed's tutorial compiles as Kuma would name it.

The seed's Deployments, Services, Namespace and ``extensions/v1beta1`` Ingress are in
``docs/kubernetes/seed/`` with the tutorial's TrafficRoute, written with Kuma's long names and no
meshc ``Service`` entry. Every test runs the real CLI (or the real compiler) on real files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from compiler.cli import main
from compiler.incremental import IncrementalCompiler
from compiler.pipeline import compile_sources
from compiler.source import read_policy_dir

SEED = Path(__file__).resolve().parents[2] / "docs" / "kubernetes" / "seed"
BENIGNO = "benigno_kong-mesh-app_svc_5000"
MAGNANIMO = "magnanimo_kong-mesh-app_svc_4000"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    out, _ = capsys.readouterr()
    return code, out


def validate(d: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[dict[str, Any]]]:
    code, out = run(["validate", str(d), "--format", "json", *extra], capsys)
    return code, json.loads(out)["diagnostics"]


def where(diags: list[dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    return [(d["code"], d["file"], d["line"], d["column"]) for d in diags]


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    dst = tmp_path / "seed"
    shutil.copytree(SEED, dst)
    return dst


def bundles(d: Path) -> dict[str, Any]:
    result = compile_sources(read_policy_dir(d))
    assert result.errors == 0, result.diagnostics
    return {k: json.loads(v) for k, v in result.bundles.items()}


def test_seed_compiles_with_kumas_names_and_subsets_from_pod_templates(seed: Path) -> None:
    got = bundles(seed)
    assert sorted(got) == ["default", f"default/{BENIGNO}", f"default/{MAGNANIMO}", "default/meshc-gateway"]
    catalog = got["default"]["services"]
    assert catalog[BENIGNO]["port"] == 5000 and catalog[BENIGNO]["protocol"] == "http"
    assert catalog[BENIGNO]["subsets"] == [
        {"app": "benigno", "version": "v1"},
        {"app": "benigno", "version": "v2"},
    ]
    assert catalog[MAGNANIMO]["subsets"] == [{"app": "magnanimo"}]
    split = got[f"default/{MAGNANIMO}"]["outbound"][BENIGNO]["route"]
    text = json.dumps(split)
    assert '"weight": 90' in text and '"weight": 10' in text
    assert '"version": "v1"' in text and '"version": "v2"' in text


def test_ingress_strip_path_becomes_a_gateway_route(seed: Path) -> None:
    gw = bundles(seed)["default/meshc-gateway"]["gateway"]
    [listener] = gw["listeners"]
    assert listener["port"] == 8080
    [rule] = listener["rules"]
    assert rule["matches"][0]["path"] == {"kind": "prefix", "value": "/route1"}
    assert [f["rewrite_prefix"] for f in rule["filters"]] == ["/"]
    assert [b["service"] for b in rule["backends"]] == [MAGNANIMO]


def test_old_ingress_warns_with_its_v1_form_which_compiles_the_same(
    seed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, diags = validate(seed, capsys)
    assert code == 0
    assert where(diags) == [("W0001", "ingress.yaml", 2, 13)]
    msg = diags[0]["message"]
    v1 = msg[msg.index("apiVersion: networking.k8s.io/v1") :]
    assert "pathType: Prefix" in v1 and "number: 4000" in v1
    before = bundles(seed)
    (seed / "ingress.yaml").write_text(v1 + "\n")
    assert validate(seed, capsys, "--strict") == (0, [])
    assert bundles(seed) == before


def test_other_kinds_are_an_info_note_never_an_error(seed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (seed / "ingress.yaml").unlink()
    (seed / "extra.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n---\n"
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: y}\n"
    )
    code, diags = validate(seed, capsys, "--strict")
    assert code == 0
    assert where(diags) == [("I0001", "extra.yaml", 2, 7), ("I0001", "extra.yaml", 7, 7)]
    assert all(d["severity"] == "info" for d in diags)
    code, out = run(["validate", str(seed), "--format", "text"], capsys)
    assert "extra.yaml:2:7: info I0001 Kubernetes ConfigMap (v1) is not read by meshc; ignored" in out


def test_a_policy_kind_with_a_kubernetes_api_version_stays_an_error(
    seed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = (seed / "traffic-route.yaml").read_text().replace("kuma.io/v1alpha1", "v1")
    (seed / "traffic-route.yaml").write_text(route)
    code, diags = validate(seed, capsys)
    assert code == 1
    assert ("E0006", "traffic-route.yaml", 2, 13) in where(diags)


def test_errors_point_at_the_kubernetes_key(seed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ing = (seed / "ingress.yaml").read_text().replace("serviceName: magnanimo", "serviceName: magnanim0")
    (seed / "ingress.yaml").write_text(ing)
    svc = (seed / "benigno.yaml").read_text().replace("  - port: 5000", '  - port: "five"')
    (seed / "benigno.yaml").write_text(svc)
    route = (seed / "traffic-route.yaml").read_text().replace("version: v2", "version: v3")
    (seed / "traffic-route.yaml").write_text(route)
    code, diags = validate(seed, capsys)
    assert code == 1
    got = where(diags)
    assert ("E2006", "ingress.yaml", 14, 9) in got  # the backend
    assert ("E1002", "benigno.yaml", 34, 11) in got  # port: "five"
    # The broken Service declares nothing, so the route's names are unknown, at their lines.
    assert ("E2001", "traffic-route.yaml", 14, 24) in got


def test_undeclared_subset_of_a_kubernetes_service(seed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    route = (seed / "traffic-route.yaml").read_text().replace("version: v2", "version: v3")
    (seed / "traffic-route.yaml").write_text(route)
    code, diags = validate(seed, capsys)
    assert code == 1
    [e] = [d for d in diags if d["code"] == "E2002"]
    assert (e["file"], e["line"], e["column"]) == ("traffic-route.yaml", 24, 18)
    assert "{app: benigno, version: v1}" in e["message"]


def test_protocol_from_annotation_app_protocol_and_port_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "svc.yaml").write_text(
        """apiVersion: v1
kind: Service
metadata:
  name: multi
  annotations:
    "7000.service.kuma.io/protocol": http
spec:
  ports:
  - {port: 7000, name: web}
  - {port: 7001, name: http-admin}
  - {port: 7002, name: grpc, appProtocol: grpc}
  - {port: 7003, name: tcp}
  - {port: 7004, appProtocol: kuma.io/http}
  - {port: 7005, protocol: UDP}
"""
    )
    code, diags = validate(d, capsys, "--strict")
    assert code == 0
    assert where(diags) == [("I1001", "svc.yaml", 11, 43), ("I1001", "svc.yaml", 14, 5)]
    cat = bundles(d)["default"]["services"]
    assert {k: v["protocol"] for k, v in cat.items()} == {
        "multi_default_svc_7000": "http",
        "multi_default_svc_7001": "http",
        "multi_default_svc_7002": "tcp",
        "multi_default_svc_7003": "tcp",
        "multi_default_svc_7004": "http",
    }
    assert all(v["subsets"] == [] for v in cat.values())


def test_mesh_from_namespace_label_and_selection_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "mesh.yaml").write_text("apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: prod}\n")
    (d / "app.yaml").write_text(
        """apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kuma.io/mesh: prod}}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{port: 80, name: http}]
"""
    )
    code, diags = validate(d, capsys)
    assert code == 0
    assert where(diags) == [("I2001", "app.yaml", 9, 3)]
    assert sorted(bundles(d)) == ["prod", "prod/cart_shop_svc_80"]


GATEWAYS = """apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: edge}
spec:
  selectors: [{match: {kuma.io/service: edge-gateway}}]
  conf: {listeners: [{port: 9000, protocol: HTTP}]}
"""


def test_ingress_attaches_to_the_one_gateway_or_needs_the_annotation(
    seed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (seed / "gw.yaml").write_text(GATEWAYS)
    got = bundles(seed)
    assert "default/meshc-gateway" not in got
    assert (
        got["default/edge-gateway"]["gateway"]["listeners"][0]["rules"][0]["backends"][0]["service"]
        == MAGNANIMO
    )
    second = GATEWAYS.replace("name: edge}", "name: edge2}").replace("edge-gateway", "other-gateway")
    (seed / "gw2.yaml").write_text(second)
    code, diags = validate(seed, capsys)
    assert code == 1 and ("E2007", "ingress.yaml", 5, 9) in where(diags)
    ing = (seed / "ingress.yaml").read_text()
    (seed / "ingress.yaml").write_text(
        ing.replace("annotations:\n", "annotations:\n    meshc.io/gateway: nope\n")
    )
    code, diags = validate(seed, capsys)
    assert code == 1 and ("E2007", "ingress.yaml", 8, 23) in where(diags)
    (seed / "ingress.yaml").write_text(
        ing.replace("annotations:\n", "annotations:\n    meshc.io/gateway: other-gateway\n")
    )
    got = bundles(seed)
    assert got["default/other-gateway"]["gateway"]["listeners"][0]["rules"]
    assert not got["default/edge-gateway"]["gateway"]["listeners"][0]["rules"]


def test_incremental_compile_equals_cold_with_kubernetes_objects(seed: Path) -> None:
    inc = IncrementalCompiler()
    steps = [
        lambda: None,
        lambda: (seed / "traffic-route.yaml").write_text(
            (seed / "traffic-route.yaml").read_text().replace("weight: 90", "weight: 80")
        ),
        lambda: (seed / "benigno-v2.yaml").unlink(),
        lambda: (seed / "gw.yaml").write_text(GATEWAYS),
        lambda: (seed / "magnanimo.yaml").write_text(
            (seed / "magnanimo.yaml")
            .read_text()
            .replace("app: magnanimo\n    spec", "app: magnanimo\n        tier: web\n    spec")
        ),
    ]
    for step in steps:
        step()
        src = read_policy_dir(seed)
        cold = compile_sources(src)
        warm = inc.update(src).result
        assert warm.diagnostics == cold.diagnostics
        assert warm.bundles == cold.bundles and warm.release == cold.release
    assert compile_sources(read_policy_dir(seed)).errors == 1  # v2 is gone: the route's v2 is unknown


def test_readme_shows_what_validate_prints_on_the_seed() -> None:
    from kube_harness import REPO, meshc

    res = meshc("validate", "docs/kubernetes/seed")
    assert res.returncode == 0
    first = res.stdout.splitlines()[0]
    shown = "docs/kubernetes/seed/ingress.yaml:2:13: warning W0001 extensions/v1beta1 Ingress was removed in"
    assert first.startswith(shown)
    assert shown in (REPO / "README.md").read_text()
