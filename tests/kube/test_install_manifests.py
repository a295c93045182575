"""``meshc manifests``: every object passes ``kubernetes-validate --strict`` for Kubernetes 1.30.

kubernetes-validate ships the API's JSON schemas, so this runs offline. The injected goldens are
validated the same way (the sidecar must be a valid 1.30 pod spec too).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
from kube_harness import GOLDEN, meshc
from ruamel.yaml import YAML

K8S = "1.30.0"


def docs(text: str) -> list[dict[str, object]]:
    return [d for d in YAML(typ="safe", pure=True).load_all(text) if d is not None]


def validate_cli(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    return subprocess.run(
        [tool, "--strict", "-k", K8S, str(path)], capture_output=True, text=True, check=False, timeout=300
    )


def test_every_object_passes_strict_validation_for_1_30(tmp_path: Path) -> None:
    res = meshc("manifests", "--repo", "https://git.example.com/you/policies.git")
    assert res.returncode == 0, res.stderr
    objs = docs(res.stdout)
    kinds = sorted({str(o["kind"]) for o in objs})
    assert kinds == [
        "ClusterRole", "ClusterRoleBinding", "Deployment", "Namespace", "PodDisruptionBudget",
        "Role", "RoleBinding", "Service", "ServiceAccount",
    ]  # fmt: skip
    for o in objs:
        assert kubernetes_validate.validate(o, K8S, strict=True) == "1.30"
    out = tmp_path / "all.yaml"
    out.write_text(res.stdout)
    cli = validate_cli(out)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.count("passed for resource") == len(objs)


def test_strict_validation_catches_a_wrong_field() -> None:
    """The check above can fail: an unknown field is refused in strict mode."""
    res = meshc("manifests")
    dep = next(o for o in docs(res.stdout) if o["kind"] == "Deployment")
    dep["spec"]["replica"] = 3  # type: ignore[index]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S, strict=True)


def test_control_plane_shape_and_rbac() -> None:
    objs = docs(meshc("manifests", "--namespace", "mesh", "--ref", "prod").stdout)
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}  # type: ignore[index]
    cp = by[("Deployment", "meshc-control-plane")]
    spec = cp["spec"]  # type: ignore[index]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    [git_sync] = pod["initContainers"]
    assert git_sync["restartPolicy"] == "Always" and "--ref=prod" in git_sync["args"]
    assert by[("PodDisruptionBudget", "meshc-control-plane")]["spec"]["maxUnavailable"] == 1  # type: ignore[index]
    rules = by[("ClusterRole", "meshc-control-plane")]["rules"]  # type: ignore[index]
    verbs = {(g, r): set(x["verbs"]) for x in rules for g in x["apiGroups"] for r in x["resources"]}
    assert verbs[("discovery.k8s.io", "endpointslices")] == {"get", "list", "watch"}
    assert verbs[("authentication.k8s.io", "tokenreviews")] == {"create"}
    assert ("", "secrets") not in verbs and ("coordination.k8s.io", "leases") not in verbs  # namespaced only
    role = by[("Role", "meshc-control-plane")]
    assert role["metadata"]["namespace"] == "mesh"  # type: ignore[index]
    assert {r for x in role["rules"] for r in x["resources"]} == {"leases", "secrets"}  # type: ignore[index]
    gw = by[("Service", "meshc-gateway")]
    assert gw["spec"]["type"] == "LoadBalancer"  # type: ignore[index]
    assert "PRIVATE KEY" not in meshc("manifests").stdout


def test_kustomization_lists_every_file(tmp_path: Path) -> None:
    res = meshc("manifests", "--out", str(tmp_path / "k"))
    assert res.returncode == 0, res.stderr
    kust = YAML(typ="safe", pure=True).load((tmp_path / "k" / "kustomization.yaml").read_text())
    files = sorted(p.name for p in (tmp_path / "k").iterdir() if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files and len(files) == 12
    each = [d for f in kust["resources"] for d in docs((tmp_path / "k" / f).read_text())]
    assert each == docs(meshc("manifests").stdout)


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.injected.yaml")))
def test_injected_goldens_pass_strict_validation(golden: str) -> None:
    for o in docs((GOLDEN / golden).read_text()):
        assert kubernetes_validate.validate(o, K8S, strict=True) == "1.30"


GATEWAYS = """\
apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: edge}
spec:
  selectors: [{match: {kuma.io/service: meshc-gateway}}]
  conf:
    listeners:
      - {port: 8080, protocol: HTTP}
      - port: 8443
        protocol: HTTPS
        hostname: a.example.com
        tls: {mode: TERMINATE, certificates: [{secret: a-example-tls}, {file: /etc/meshc/x.pem}]}
      - port: 8443
        protocol: HTTPS
        hostname: api.example.com
        tls: {mode: TERMINATE, certificates: [{secret: api.example.com}, {inlineString: nope}]}
---
apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: other}
spec:
  selectors: [{match: {kuma.io/service: other-gateway}}]
  conf:
    listeners:
      - port: 9443
        protocol: HTTPS
        tls: {mode: TERMINATE, certificates: [{secret: other-tls}]}
"""


def test_gateway_mounts_the_tls_secrets_its_meshgateways_name(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "gateway.yaml").write_text(GATEWAYS)
    res = meshc("manifests", "--policies", str(policies), "--gateway-tls-secret", "extra-tls")
    assert res.returncode == 0, res.stderr
    assert "'other'" in res.stderr and "other-tls are not mounted" in res.stderr
    objs = docs(res.stdout)
    for o in objs:
        assert kubernetes_validate.validate(o, K8S, strict=True) == "1.30"
    out = tmp_path / "all.yaml"
    out.write_text(res.stdout)
    cli = validate_cli(out)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}  # type: ignore[index]
    pod = by[("Deployment", "meshc-gateway")]["spec"]["template"]["spec"]  # type: ignore[index]
    [gw] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for m in gw["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret is not None and m["mountPath"].startswith("/var/run/secrets/meshc/tls/"):
            assert m["readOnly"] is True and "subPath" not in m  # whole volume: the kubelet's updates arrive
            assert [i["key"] for i in secret["items"]] == ["tls.crt", "tls.key"]
            mounted[m["mountPath"].rsplit("/", 1)[1]] = secret["secretName"]
    assert mounted == {n: n for n in ("a-example-tls", "api.example.com", "extra-tls")}
    assert pod["securityContext"]["fsGroup"] == gw["securityContext"]["runAsGroup"]
    assert "--tls-secrets-dir=/var/run/secrets/meshc/tls" in gw["args"]
    assert "--listen=0.0.0.0:8443" in gw["args"] and "--listen=0.0.0.0:8080" in gw["args"]
    svc = by[("Service", "meshc-gateway")]["spec"]  # type: ignore[index]
    assert {(p["port"], p["targetPort"]) for p in svc["ports"]} == {(80, "http"), (443, "https-8443")}
    assert "PRIVATE KEY" not in res.stdout and "nope" not in res.stdout


def test_without_tls_secrets_the_gateway_is_unchanged() -> None:
    plain = docs(meshc("manifests").stdout)
    dep = next(o for o in plain if o["kind"] == "Deployment" and o["metadata"]["name"] == "meshc-gateway")  # type: ignore[index]
    pod = dep["spec"]["template"]["spec"]  # type: ignore[index]
    assert "securityContext" not in pod and [v["name"] for v in pod["volumes"]] == ["meshc-token", "state"]
    bad = meshc("manifests", "--gateway-tls-secret", "../etc")
    assert bad.returncode == 2 and "not a Secret name" in bad.stderr


def test_the_mount_dir_is_the_gateways_default() -> None:
    from compiler.kube.manifests import TLS_SECRETS_DIR
    from runtime.gatewaytls import DEFAULT_SECRETS_DIR

    assert TLS_SECRETS_DIR == DEFAULT_SECRETS_DIR
