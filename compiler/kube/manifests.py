"""``meshc manifests``: the Kubernetes objects that install meshc, as plain YAML or a kustomization.

The control plane is a Deployment of 3 (a PodDisruptionBudget keeps 2, anti-affinity spreads them
over nodes) that reads the policy repo through a git-sync native sidecar: GitOps stays the source
of truth, and nothing here changes at run time, so Argo CD or Flux see no drift (the CA is a
Secret the operator creates; no key is ever printed). RBAC is the least the control plane needs:
read Pods, Services, EndpointSlices and Namespaces, create TokenReviews and Events, Leases and
Secrets in its own namespace only. The gateway is a Deployment behind a LoadBalancer Service;
each ``kubernetes.io/tls`` Secret its MeshGateways' HTTPS listeners name (``{secret: NAME}``, found
in a local copy of the policies) is a read-only ``secret`` volume at ``TLS_SECRETS_DIR/NAME``,
whole (no ``subPath``: the kubelet's updates reach the gateway, which reloads them), and each
HTTPS listener port is listened on and exposed. Every object passes ``kubernetes-validate
--strict`` for Kubernetes 1.30 (a test checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from compiler.kinds import mesh_gateway as mg
from compiler.kinds.base import SERVICE_TAG
from compiler.kube.derive import DEFAULT_GATEWAY, DEFAULT_GATEWAY_PORT, SERVICE_LABEL
from compiler.kube.inject import IMAGE, SECURITY_CONTEXT

__all__ = [
    "CP_NAME",
    "CP_PORT",
    "TLS_SECRETS_DIR",
    "GatewayTls",
    "Settings",
    "gateway_tls",
    "objects",
    "render",
    "write_kustomization",
]

CP_NAME = "meshc-control-plane"
CP_PORT = 5681
GIT_SYNC_IMAGE = "registry.k8s.io/git-sync/git-sync:v4.2.4"
_PART_OF = {"app.kubernetes.io/part-of": "meshc"}


TLS_SECRETS_DIR = "/var/run/secrets/meshc/tls"
"""The gateway's ``--tls-secrets-dir`` default (``runtime.gatewaytls.DEFAULT_SECRETS_DIR``)."""


@dataclass(frozen=True)
class GatewayTls:
    """What the gateway Deployment needs for its HTTPS listeners."""

    secrets: tuple[str, ...] = ()
    """Secret names to mount, sorted."""
    ports: tuple[int, ...] = ()
    """HTTPS listener ports to listen on and expose, sorted."""
    notes: tuple[str, ...] = ()
    """What was found and left out (printed on stderr)."""


@dataclass(frozen=True)
class Settings:
    namespace: str = "meshc-system"
    repo: str = "https://git.example.com/policies.git"
    ref: str = "main"
    policy_dir: str = "policies"
    image: str = IMAGE
    replicas: int = 3
    gateway_tls: GatewayTls = GatewayTls()


def gateway_tls(policies: Path, extra_secrets: tuple[str, ...] = ()) -> GatewayTls:
    """The Secrets and HTTPS ports of the MeshGateways the gateway Deployment serves (those that
    select ``kuma.io/service: meshc-gateway``) in a local copy of the policy directory, plus
    ``extra_secrets``. Documents that do not validate are ``meshc validate``'s to report."""
    from compiler.pipeline import parse_files
    from compiler.source import read_policy_dir

    secrets = set(extra_secrets)
    ports: set[int] = set()
    notes: list[str] = []
    for parsed in parse_files(read_policy_dir(policies).files):
        for doc in parsed.docs:
            if doc.kind != "MeshGateway":
                continue
            spec: mg.MeshGatewaySpec = doc.spec
            services = {(s.match or {}).get(SERVICE_TAG) for s in spec.selectors or []}
            for lst in (spec.conf.listeners if spec.conf else None) or []:
                if (lst.protocol or "").upper() != "HTTPS" or lst.tls is None:
                    continue
                names = [
                    got["secret"]
                    for c in lst.tls.certificates or []
                    if isinstance(got := mg.certificate(c), dict)
                ]
                if DEFAULT_GATEWAY not in services:
                    if names:
                        notes.append(
                            f"{doc.file}: MeshGateway {doc.name!r} is not served by the {DEFAULT_GATEWAY} "
                            f"Deployment (it selects {', '.join(sorted(str(x) for x in services))}): "
                            f"its Secrets {', '.join(names)} are not mounted"
                        )
                    continue
                secrets.update(names)
                if lst.port is not None and lst.port != DEFAULT_GATEWAY_PORT:
                    ports.add(lst.port)
    return GatewayTls(tuple(sorted(secrets)), tuple(sorted(ports)), tuple(notes))


def _meta(name: str, s: Settings, component: str, namespaced: bool = True) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name}
    if namespaced:
        m["namespace"] = s.namespace
    m["labels"] = {"app.kubernetes.io/name": component, **_PART_OF}
    return m


_HARDENED = SECURITY_CONTEXT


def _resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def _rules_cluster() -> list[dict[str, Any]]:
    return [
        {
            "apiGroups": [""],
            "resources": ["pods", "services", "namespaces"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]


def _rules_namespace() -> list[dict[str, Any]]:
    rw = ["get", "list", "watch", "create", "update", "patch"]
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": rw},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": rw},
    ]


def _control_plane(s: Settings) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": CP_NAME}
    git_sync = {
        "name": "git-sync",
        "image": GIT_SYNC_IMAGE,
        "restartPolicy": "Always",
        "args": [
            f"--repo={s.repo}",
            f"--ref={s.ref}",
            "--root=/git",
            "--link=current",
            "--period=10s",
            "--http-bind=:1234",
        ],
        "ports": [{"name": "git-sync", "containerPort": 1234}],
        # 200 once a sync succeeded: the control plane starts only when the policy repo is there.
        "startupProbe": {"httpGet": {"path": "/", "port": 1234}, "periodSeconds": 2, "failureThreshold": 150},
        "resources": _resources("10m", "32Mi", "200m", "128Mi"),
        "securityContext": {**_HARDENED, "runAsUser": 65533, "runAsGroup": 65533},
        "volumeMounts": [{"name": "git", "mountPath": "/git"}],
    }
    cp = {
        "name": "control-plane",
        "image": s.image,
        "args": [
            "controlplane",
            s.policy_dir,
            "--repo=/git/current",
            f"--listen=0.0.0.0:{CP_PORT}",
            "--out=/var/lib/meshc/out",
            "--state-dir=/var/lib/meshc/state",
            "--secrets-dir=/etc/meshc/secrets",
            "--kubernetes",
        ],
        "env": [
            {
                "name": "MESHC_CONTROLPLANE_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "meshc-api-token", "key": "token", "optional": True}},
            },
            {"name": "MESHC_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MESHC_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": "api", "containerPort": CP_PORT}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": CP_PORT},
            "periodSeconds": 2,
            "failureThreshold": 60,
        },
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": CP_PORT}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": CP_PORT}, "periodSeconds": 5},
        "resources": _resources("100m", "128Mi", "2", "1Gi"),
        "securityContext": _HARDENED,
        "volumeMounts": [
            {"name": "git", "mountPath": "/git", "readOnly": True},
            {"name": "state", "mountPath": "/var/lib/meshc"},
            {"name": "secrets", "mountPath": "/etc/meshc/secrets", "readOnly": True},
        ],
    }
    affinity = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": labels},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(CP_NAME, s, CP_NAME),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, **_PART_OF}},
                "spec": {
                    "serviceAccountName": CP_NAME,
                    "affinity": affinity,
                    "securityContext": {"fsGroup": 5678},
                    "initContainers": [git_sync],
                    "containers": [cp],
                    "volumes": [
                        {"name": "git", "emptyDir": {}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "secrets", "secret": {"secretName": "meshc-secrets", "defaultMode": 0o440}},
                    ],
                },
            },
        },
    }


def _gateway(s: Settings) -> Iterator[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": DEFAULT_GATEWAY}
    yield {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(DEFAULT_GATEWAY, s, DEFAULT_GATEWAY),
        "automountServiceAccountToken": False,
    }
    gw: dict[str, Any] = {
        "name": "gateway",
        "image": s.image,
        "args": [
            "gateway",
            f"--service={DEFAULT_GATEWAY}",
            f"--control-plane=http://{CP_NAME}.{s.namespace}.svc:{CP_PORT}",
            f"--listen=0.0.0.0:{DEFAULT_GATEWAY_PORT}",
            "--admin=$(MESHC_POD_IP):15002",
            "--admin-allow-remote",
            "--state-dir=/var/lib/meshc",
            "--token-file=/var/run/secrets/meshc.io/token",
        ],
        "env": [{"name": "MESHC_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"name": "http", "containerPort": DEFAULT_GATEWAY_PORT},
            {"name": "admin", "containerPort": 15002},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15002}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 15002}, "periodSeconds": 10},
        "resources": _resources("100m", "64Mi", "2", "512Mi"),
        "securityContext": _HARDENED,
        "volumeMounts": [
            {"name": "meshc-token", "mountPath": "/var/run/secrets/meshc.io", "readOnly": True},
            {"name": "state", "mountPath": "/var/lib/meshc"},
        ],
    }
    tls = s.gateway_tls
    for port in tls.ports:
        gw["args"].append(f"--listen=0.0.0.0:{port}")
        gw["ports"].append({"name": f"https-{port}", "containerPort": port})
    tls_volumes: list[dict[str, Any]] = []
    if tls.secrets:
        gw["args"].append(f"--tls-secrets-dir={TLS_SECRETS_DIR}")
    for i, name in enumerate(tls.secrets):
        volume = f"tls-{i}"  # a volume name is a DNS label: a Secret name may hold dots
        gw["volumeMounts"].append(
            {"name": volume, "mountPath": f"{TLS_SECRETS_DIR}/{name}", "readOnly": True}
        )
        tls_volumes.append(
            {
                "name": volume,
                "secret": {
                    "secretName": name,
                    "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
                    "defaultMode": 0o440,  # group-readable: the pod's fsGroup is the gateway's group
                },
            }
        )
    token = {"serviceAccountToken": {"audience": "meshc", "expirationSeconds": 3600, "path": "token"}}
    pod: dict[str, Any] = {"serviceAccountName": DEFAULT_GATEWAY}
    if tls.secrets:
        pod["securityContext"] = {"fsGroup": SECURITY_CONTEXT["runAsGroup"]}
    yield {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(DEFAULT_GATEWAY, s, DEFAULT_GATEWAY),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, **_PART_OF, SERVICE_LABEL: DEFAULT_GATEWAY}},
                "spec": {
                    **pod,
                    "containers": [gw],
                    "volumes": [
                        {"name": "meshc-token", "projected": {"sources": [token]}},
                        {"name": "state", "emptyDir": {}},
                        *tls_volumes,
                    ],
                },
            },
        },
    }
    yield {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(DEFAULT_GATEWAY, s, DEFAULT_GATEWAY),
        "spec": {
            "type": "LoadBalancer",
            "selector": labels,
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                *(
                    {
                        "name": f"https-{port}",
                        "port": 443 if i == 0 else port,
                        "targetPort": f"https-{port}",
                        "protocol": "TCP",
                    }
                    for i, port in enumerate(tls.ports)
                ),
            ],
        },
    }


def objects(s: Settings) -> list[dict[str, Any]]:
    """Every object, in the order ``kubectl apply`` needs (Namespace first)."""
    cp_labels = {"app.kubernetes.io/name": CP_NAME}
    sa = {"kind": "ServiceAccount", "name": CP_NAME, "namespace": s.namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": s.namespace, "labels": dict(_PART_OF)},
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(CP_NAME, s, CP_NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(CP_NAME, s, CP_NAME, namespaced=False),
            "rules": _rules_cluster(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(CP_NAME, s, CP_NAME, namespaced=False),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CP_NAME},
            "subjects": [sa],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(CP_NAME, s, CP_NAME),
            "rules": _rules_namespace(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(CP_NAME, s, CP_NAME),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CP_NAME},
            "subjects": [sa],
        },
        _control_plane(s),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(CP_NAME, s, CP_NAME),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": cp_labels}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(CP_NAME, s, CP_NAME),
            "spec": {
                "type": "ClusterIP",
                "selector": cp_labels,
                "ports": [
                    {
                        "name": "api",
                        "port": CP_PORT,
                        "targetPort": "api",
                        "protocol": "TCP",
                        "appProtocol": "http",
                    }
                ],
            },
        },
        *_gateway(s),
    ]


def _dump(docs: list[dict[str, Any]]) -> str:
    yaml = YAML()
    yaml.width = 4096
    buf = StringIO()
    yaml.dump_all(docs, buf)
    return buf.getvalue()


_HEADER = (
    "# meshc installation, generated by `meshc manifests`. Every replica shares the Secret\n"
    "# meshc-secrets (push-signing key, token secret, CAs: `meshc secrets --out DIR` prints how to\n"
    "# create it; no key is printed here); the API token is the Secret meshc-api-token.\n"
)


def render(s: Settings) -> str:
    return _HEADER + _dump(objects(s))


def _file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_kustomization(s: Settings, out: Path) -> list[Path]:
    """One file per object and a ``kustomization.yaml`` listing them (``kubectl apply -k``)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = []
    for obj in objects(s):
        name = _file_name(obj)
        (out / name).write_text(_dump([obj]), encoding="utf-8")
        names.append(name)
        written.append(out / name)
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": names}
    (out / "kustomization.yaml").write_text(_HEADER + _dump([kust]), encoding="utf-8")
    written.append(out / "kustomization.yaml")
    return written
