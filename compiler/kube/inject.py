"""``meshc inject``: add the meshc sidecar to Kubernetes workloads, offline and deterministically.

Like ``linkerd inject --manual`` and ``istioctl kube-inject``, it rewrites YAML and talks to no
cluster. It reads with ruamel.yaml's round-trip loader, so comments, key order and document order
survive; only the pod specs it injects change. The sidecar is a native sidecar (an init container
with ``restartPolicy: Always``, Kubernetes 1.29+) or, with ``classic``, one more container. A pod
spec that already has the sidecar is left alone, so injecting twice changes nothing.

Whether a workload is injected follows ``kuma.io/sidecar-injection`` (``enabled``/``disabled``,
also ``true``/``false``): on the pod template, else on the workload, else on its Namespace (a
Namespace document in the input or the policy directory). With ``namespace_aware`` a workload
with no setting anywhere is left alone; without it (manual injection) it is injected.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from compiler.kube.derive import service_name

__all__ = [
    "ADMIN_PORT",
    "AUDIENCE",
    "CONTROL_PLANE_URL",
    "INBOUND_PORT",
    "OUTBOUND_PORT",
    "SIDECAR",
    "InjectError",
    "Options",
    "inject_text",
    "known_objects",
]

SIDECAR = "meshc-sidecar"
IMAGE = "ghcr.io/meshc/meshc:0.1.0"
CONTROL_PLANE_URL = "http://meshc-control-plane.meshc-system.svc:5681"
AUDIENCE = "meshc"
"""Audience of the projected service-account token the sidecar bootstraps with (TokenReview)."""
TOKEN_DIR = "/var/run/secrets/meshc.io"
STATE_DIR = "/var/lib/meshc"
ADMIN_PORT = 15002
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
INJECTION_KEY = "kuma.io/sidecar-injection"
SERVICE_KEY = "meshc.io/service"
_ON = {"enabled", "true"}
_OFF = {"disabled", "false"}
_RESOURCES = {
    # Kuma's annotation names; meshc's defaults (the sidecar idles at ~55 MB RSS).
    ("requests", "cpu"): ("kuma.io/sidecar-proxy-cpu-requests", "50m"),
    ("requests", "memory"): ("kuma.io/sidecar-proxy-memory-requests", "64Mi"),
    ("limits", "cpu"): ("kuma.io/sidecar-proxy-cpu-limits", "1000m"),
    ("limits", "memory"): ("kuma.io/sidecar-proxy-memory-limits", "256Mi"),
}
SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 5678,
    "runAsGroup": 5678,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Non-root, read-only root file system, no capabilities: every meshc container runs so."""
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class InjectError(Exception):
    """The input cannot be injected (exit 2): bad YAML, or a workload with no service name."""


@dataclass(frozen=True)
class Options:
    namespace_aware: bool = False
    classic: bool = False
    control_plane: str = CONTROL_PLANE_URL
    image: str = IMAGE


@dataclass
class Known:
    """Services and Namespaces a workload's service name and injection setting come from."""

    services: list[Mapping[str, Any]] = field(default_factory=list)
    namespaces: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def add(self, doc: Any) -> None:
        if not isinstance(doc, Mapping):
            return
        meta = _meta(doc)
        if doc.get("apiVersion") == "v1" and doc.get("kind") == "Service":
            self.services.append(doc)
        elif doc.get("apiVersion") == "v1" and doc.get("kind") == "Namespace" and meta.get("name"):
            self.namespaces.setdefault(str(meta["name"]), doc)


def known_objects(policy_dir: Path) -> Known:
    """The Services and Namespaces of a directory of manifests (e.g. the policy directory)."""
    known = Known()
    yaml = YAML(typ="safe", pure=True)
    for p in sorted([*policy_dir.rglob("*.yaml"), *policy_dir.rglob("*.yml")]):
        if any(part.startswith(".") for part in p.relative_to(policy_dir).parts):
            continue
        try:
            for doc in yaml.load_all(p.read_text(encoding="utf-8")):
                known.add(doc)
        except Exception as e:  # a broken file there is `meshc validate`'s to report
            raise InjectError(f"{p}: cannot read it: {e}") from None
    return known


def _meta(obj: Mapping[str, Any], key: str = "metadata") -> Mapping[str, Any]:
    m = obj.get(key)
    return m if isinstance(m, Mapping) else {}


def _setting(meta: Mapping[str, Any]) -> bool | None:
    for part in ("annotations", "labels"):
        v = _meta(meta, part).get(INJECTION_KEY)
        if isinstance(v, str) and v.lower() in _ON:
            return True
        if isinstance(v, str) and v.lower() in _OFF:
            return False
    return None


def inject_text(text: str, opts: Options, known: Known | None = None) -> str:
    """The input YAML with every eligible workload injected (byte-stable: same input, same output)."""
    try:
        indent, offset = _guess_indent(text)
        yaml = YAML()
        yaml.preserve_quotes = True
        yaml.width = 4096
        yaml.indent(mapping=indent, sequence=offset + 2, offset=offset)
        docs = list(yaml.load_all(text))
    except Exception as e:
        raise InjectError(f"not valid YAML: {e}") from None
    ctx = Known() if known is None else Known(list(known.services), dict(known.namespaces))
    for d in docs:
        ctx.add(d)
    for d in docs:
        _inject_doc(d, opts, ctx)
    buf = StringIO()
    yaml.dump_all(docs, buf)
    out = buf.getvalue()
    if not text.lstrip().startswith("---") and out.startswith("---"):
        out = out[4:]
    return out


def _guess_indent(text: str) -> tuple[int, int]:
    """(mapping indent, dash offset) as the input writes them: ruamel dumps one style, the input's."""
    mapping = offset = None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for prev, line in itertools.pairwise(lines):
        if not prev.rstrip().endswith(":"):
            continue
        i = len(prev) - len(prev.lstrip(" -"))
        j = len(line) - len(line.lstrip(" "))
        if line.lstrip().startswith("- "):
            offset = j - i if offset is None and j >= i else offset
        elif j > i and mapping is None:
            mapping = j - i
        if mapping is not None and offset is not None:
            break
    return mapping or 2, offset or 0


def _pod(doc: Any) -> tuple[CommentedMap, CommentedMap] | None:
    """(pod template metadata, pod spec) of a workload, or None for anything else."""
    if not isinstance(doc, CommentedMap) or not isinstance(doc.get("kind"), str):
        return None
    if doc["kind"] == "Pod":
        spec = doc.get("spec")
        return (doc.setdefault("metadata", CommentedMap()), spec) if isinstance(spec, CommentedMap) else None
    if doc["kind"] == "CronJob":
        doc = doc.get("spec", {}).get("jobTemplate", {})
    elif doc["kind"] not in _POD_TEMPLATE_KINDS:
        return None
    tpl = doc.get("spec", {}).get("template") if isinstance(doc.get("spec"), Mapping) else None
    if not isinstance(tpl, CommentedMap) or not isinstance(tpl.get("spec"), CommentedMap):
        return None
    if not isinstance(tpl.get("metadata"), CommentedMap):
        tpl.insert(0, "metadata", CommentedMap())
    return tpl["metadata"], tpl["spec"]


def _inject_doc(doc: Any, opts: Options, ctx: Known) -> None:
    pod = _pod(doc)
    if pod is None:
        return
    tmeta, spec = pod
    name = str(_meta(doc).get("name", ""))
    ns = str(_meta(doc).get("namespace") or "default")
    wanted = _setting(tmeta)
    if wanted is None:
        wanted = _setting(_meta(doc))
    if wanted is None and ns in ctx.namespaces:
        wanted = _setting(_meta(ctx.namespaces[ns]))
    if wanted is None:
        wanted = not opts.namespace_aware
    containers = spec.get("containers")
    if not wanted or not isinstance(containers, list) or not containers:
        return
    names = [
        c.get("name") for c in [*containers, *(spec.get("initContainers") or [])] if isinstance(c, Mapping)
    ]
    if SIDECAR in names:
        return  # injected already: injecting twice changes nothing
    labels = dict(_meta(tmeta, "labels"))
    service = _service(doc, name, ns, labels, ctx)
    mesh = _meta(tmeta, "labels").get("kuma.io/mesh") or _meta(doc).get("labels", {}).get("kuma.io/mesh")
    annotations = {**_meta(_meta(doc), "annotations"), **_meta(tmeta, "annotations")}
    app_port = _app_port(containers)
    sidecar = _sidecar(opts, service, str(mesh or "default"), labels, app_port, annotations)
    if opts.classic:
        containers.append(sidecar)
    else:
        if not isinstance(spec.get("initContainers"), list):
            spec["initContainers"] = CommentedSeq()
        spec["initContainers"].append(sidecar)
    for c in containers:
        if isinstance(c, CommentedMap) and c.get("name") != SIDECAR:
            _proxy_env(c)
    volumes = spec.get("volumes")
    if not isinstance(volumes, list):
        spec["volumes"] = volumes = CommentedSeq()
    volumes.extend(_volumes())


def _service(doc: Any, name: str, ns: str, labels: Mapping[str, Any], ctx: Known) -> str:
    given = _meta(_meta(doc), "annotations").get(SERVICE_KEY)
    if isinstance(given, str) and given:
        return given
    found = []
    for svc in ctx.services:
        sel = svc.get("spec", {}).get("selector") if isinstance(svc.get("spec"), Mapping) else None
        if (
            isinstance(sel, Mapping)
            and sel
            and str(_meta(svc).get("namespace") or "default") == ns
            and all(labels.get(k) == v for k, v in sel.items())
        ):
            for port in svc["spec"].get("ports") or []:
                if isinstance(port, Mapping) and isinstance(port.get("port"), int):
                    found.append(service_name(str(_meta(svc)["name"]), ns, port["port"]))
    if not found:
        raise InjectError(
            f"{doc.get('kind')} {ns}/{name}: no Service in the input (or --policy-dir) selects it; "
            f"name its mesh service with the annotation {SERVICE_KEY}"
        )
    return sorted(found)[0]


def _app_port(containers: Iterable[Any]) -> int | None:
    for c in containers:
        for p in c.get("ports") or [] if isinstance(c, Mapping) else []:
            if isinstance(p, Mapping) and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def _env(name: str, path: str) -> CommentedMap:
    return CommentedMap([("name", name), ("valueFrom", {"fieldRef": {"fieldPath": path}})])


def _probe(path: str, **extra: int) -> CommentedMap:
    return CommentedMap([("httpGet", {"path": path, "port": ADMIN_PORT}), *extra.items()])


def _sidecar(
    opts: Options,
    service: str,
    mesh: str,
    labels: Mapping[str, Any],
    app_port: int | None,
    annotations: Mapping[str, Any],
) -> CommentedMap:
    args = ["sidecar", "--service", service, "--mesh", mesh, "--control-plane", opts.control_plane]
    for k, v in sorted(labels.items()):
        args += ["--tag", f"{k}={v}"]
    # Kuma's Dataplane labels: the pod's labels, its name and namespace (Dataplane targetRefs).
    for k, v in sorted(labels.items()):
        args += ["--label", f"{k}={v}"]
    args += ["--label", "kuma.io/display-name=$(MESHC_POD_NAME)"]
    args += ["--label", "k8s.kuma.io/namespace=$(MESHC_POD_NAMESPACE)"]
    if app_port is not None:
        args += ["--app", f"127.0.0.1:{app_port}"]
    args += [
        "--inbound",
        f"$(MESHC_POD_IP):{INBOUND_PORT}",
        "--outbound",
        f"127.0.0.1:{OUTBOUND_PORT}",
        "--admin",
        f"$(MESHC_POD_IP):{ADMIN_PORT}",
        "--admin-allow-remote",
        "--state-dir",
        STATE_DIR,
        "--token-file",
        f"{TOKEN_DIR}/token",
    ]
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    for (section, what), (key, default) in _RESOURCES.items():
        value = annotations.get(key)
        resources[section][what] = str(value) if value else default
    c = CommentedMap()
    c["name"] = SIDECAR
    c["image"] = opts.image
    if not opts.classic:
        c["restartPolicy"] = "Always"
    c["args"] = args
    c["env"] = [
        _env("MESHC_POD_NAME", "metadata.name"),
        _env("MESHC_POD_NAMESPACE", "metadata.namespace"),
        _env("MESHC_POD_IP", "status.podIP"),
        _env("MESHC_NODE_NAME", "spec.nodeName"),
        _env("MESHC_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ]
    c["ports"] = [
        {"name": "meshc-inbound", "containerPort": INBOUND_PORT},
        {"name": "meshc-admin", "containerPort": ADMIN_PORT},
    ]
    c["startupProbe"] = _probe("/live", periodSeconds=1, failureThreshold=60)
    c["livenessProbe"] = _probe("/live", periodSeconds=10, failureThreshold=3)
    c["readinessProbe"] = _probe("/ready", periodSeconds=2, failureThreshold=3)
    c["resources"] = resources
    c["securityContext"] = copy.deepcopy(SECURITY_CONTEXT)
    c["volumeMounts"] = [
        {"name": "meshc-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "meshc-state", "mountPath": STATE_DIR},
    ]
    return c


def _proxy_env(c: CommentedMap) -> None:
    """The app's outbound HTTP goes to its sidecar (values the app already sets are kept)."""
    env = c.get("env")
    if not isinstance(env, list):
        c["env"] = env = CommentedSeq()
    have = {e.get("name") for e in env if isinstance(e, Mapping)}
    for name, value in (
        ("HTTP_PROXY", f"http://127.0.0.1:{OUTBOUND_PORT}"),
        ("http_proxy", f"http://127.0.0.1:{OUTBOUND_PORT}"),
        ("NO_PROXY", "localhost,127.0.0.1"),
    ):
        if name not in have:
            env.append(CommentedMap([("name", name), ("value", value)]))


def _volumes() -> Iterator[CommentedMap]:
    yield CommentedMap(
        [
            ("name", "meshc-token"),
            (
                "projected",
                {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": AUDIENCE,
                                "expirationSeconds": 3600,
                                "path": "token",
                            }
                        }
                    ]
                },
            ),
        ]
    )
    yield CommentedMap([("name", "meshc-state"), ("emptyDir", {})])
