"""``meshc inject``: golden files on the seed's manifests, idempotence, and what it keeps.

The goldens in ``tests/kube/golden/`` are the output of ``meshc inject`` on each manifest of
``docs/kubernetes/seed/`` (with the seed as ``--policy-dir``, where benigno-v2's Service lives).
Regenerate them with ``MESHC_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kube_harness import GOLDEN, SEED, meshc
from ruamel.yaml import YAML

from compiler.kube.inject import InjectError, Options, inject_text, known_objects

UPDATE = os.environ.get("MESHC_UPDATE_GOLDEN") == "1"
CASES = [
    ("magnanimo.yaml", []),
    ("benigno.yaml", []),
    ("benigno-v2.yaml", ["--policy-dir", str(SEED)]),
    ("namespace.yaml", []),
    ("magnanimo.yaml", ["--classic"]),
]


def golden_name(name: str, flags: list[str]) -> str:
    extra = "".join(f"-{f.lstrip('-')}" for f in flags if f.startswith("--") and f != "--policy-dir")
    return name.replace(".yaml", f"{extra}.injected.yaml")


@pytest.mark.parametrize(("name", "flags"), CASES)
def test_inject_matches_golden(name: str, flags: list[str]) -> None:
    res = meshc("inject", "-f", str(SEED / name), *flags)
    assert res.returncode == 0, res.stderr
    golden = GOLDEN / golden_name(name, flags)
    if UPDATE:
        golden.write_text(res.stdout)
    assert res.stdout == golden.read_text()


@pytest.mark.parametrize(("name", "flags"), CASES)
def test_injecting_twice_changes_nothing(name: str, flags: list[str]) -> None:
    once = (GOLDEN / golden_name(name, flags)).read_text()
    res = meshc("inject", *flags, stdin=once)
    assert res.returncode == 0, res.stderr
    assert res.stdout == once


def test_comments_order_and_other_fields_are_kept() -> None:
    src = (SEED / "magnanimo.yaml").read_text()
    out = inject_text(src, Options())
    assert out.startswith("# magnanimo: exposed through the Ingress; its /hw2 calls benigno.\n")
    yaml = YAML(typ="safe", pure=True)
    before, after = list(yaml.load_all(src)), list(yaml.load_all(out))
    assert [d["kind"] for d in after] == [d["kind"] for d in before] == ["Deployment", "Service"]
    assert after[1] == before[1]  # the Service is untouched
    assert list(after[0]) == list(before[0])  # top-level key order
    pod = after[0]["spec"]["template"]["spec"]
    [app] = pod["containers"]
    assert app["image"] == "claudioacquaviva/magnanimo" and app["ports"] == [{"containerPort": 4000}]
    assert {"name": "HTTP_PROXY", "value": "http://127.0.0.1:15001"} in app["env"]
    [side] = pod["initContainers"]
    assert side["name"] == "meshc-sidecar" and side["restartPolicy"] == "Always"
    args = side["args"]
    assert args[args.index("--service") + 1] == "magnanimo_kong-mesh-app_svc_4000"
    assert args[args.index("--app") + 1] == "127.0.0.1:4000"
    assert args[args.index("--tag") : args.index("--tag") + 2] == ["--tag", "app=magnanimo"]
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc["allowPrivilegeEscalation"]
    assert side["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15002}
    assert side["livenessProbe"]["httpGet"]["path"] == "/live"
    assert side["startupProbe"]["httpGet"]["path"] == "/live"
    assert side["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "1000m", "memory": "256Mi"},
    }
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in side["env"]}
    assert env["MESHC_POD_IP"] == "status.podIP" and env["MESHC_POD_NAMESPACE"] == "metadata.namespace"
    [token] = [v for v in pod["volumes"] if v["name"] == "meshc-token"]
    sat = token["projected"]["sources"][0]["serviceAccountToken"]
    assert sat["audience"] == "meshc"


def _deployment(annotations: str = "", template_annotations: str = "", ns: str = "shop") -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: cart
  namespace: {ns}
  annotations: {{meshc.io/service: cart_shop_svc_80{annotations}}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  template:
    metadata:
      labels: {{app: cart}}
      annotations: {{{template_annotations}}}
    spec:
      containers: [{{name: cart, image: cart:1}}]
"""


def _injected(text: str) -> bool:
    return "meshc-sidecar" in text


def test_injection_follows_workload_and_namespace_settings() -> None:
    enabled_ns = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
        "  labels: {kuma.io/sidecar-injection: enabled}\n---\n"
    )
    disabled_ns = enabled_ns.replace("enabled", "disabled")
    aware = Options(namespace_aware=True)
    assert _injected(inject_text(_deployment(), Options()))
    assert not _injected(inject_text(_deployment(), aware))
    assert _injected(inject_text(enabled_ns + _deployment(), aware))
    assert not _injected(inject_text(disabled_ns + _deployment(), Options()))
    # the workload wins over its namespace, the pod template over the workload
    assert _injected(inject_text(disabled_ns + _deployment(", kuma.io/sidecar-injection: enabled"), aware))
    off = "kuma.io/sidecar-injection: disabled"
    assert not _injected(inject_text(enabled_ns + _deployment(template_annotations=off), aware))


def test_resources_from_annotations() -> None:
    ann = "kuma.io/sidecar-proxy-cpu-requests: 200m, kuma.io/sidecar-proxy-memory-limits: 1Gi"
    out = inject_text(_deployment(template_annotations=ann), Options())
    pod = YAML(typ="safe", pure=True).load(out)["spec"]["template"]["spec"]
    res = pod["initContainers"][0]["resources"]
    assert res["requests"]["cpu"] == "200m" and res["limits"]["memory"] == "1Gi"
    assert res["requests"]["memory"] == "64Mi"


def test_a_workload_without_a_service_name_is_a_clear_error(tmp_path: Path) -> None:
    src = (SEED / "benigno-v2.yaml").read_text()
    with pytest.raises(InjectError, match="no Service in the input"):
        inject_text(src, Options())
    assert "benigno_kong-mesh-app_svc_5000" in inject_text(src, Options(), known_objects(SEED))
    (tmp_path / "app.yaml").write_text(src)
    res = meshc("inject", "-f", str(tmp_path / "app.yaml"))
    assert res.returncode == 2 and "meshc.io/service" in res.stderr and res.stdout == ""
    res = meshc("inject", "-f", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml" in res.stderr
    res = meshc("inject", stdin="a: [1\n")
    assert res.returncode == 2 and "not valid YAML" in res.stderr


def test_indentation_style_of_the_input_is_kept() -> None:
    seed = (SEED / "magnanimo.yaml").read_text()
    img = "image: claudioacquaviva/magnanimo"
    old = f"\n      - name: magnanimo\n        {img}\n        ports:\n        - containerPort"
    new = f"\n        - name: magnanimo\n          {img}\n          ports:\n            - containerPort"
    src = seed.replace(old, new).replace(
        "  ports:\n  - port: 4000\n    name: http\n", "  ports:\n    - port: 4000\n      name: http\n"
    )
    assert new in src
    out = inject_text(src, Options())
    assert "\n        - name: magnanimo\n          image: claudioacquaviva/magnanimo\n" in out
    assert "\n    - port: 4000\n      name: http\n" in out
