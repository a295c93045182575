"""The Kubernetes objects meshc reads from a policy directory, typed to the fields it uses.

Deployment, StatefulSet, Service, Namespace and Ingress (``networking.k8s.io/v1``, and the older
``extensions/v1beta1`` / ``networking.k8s.io/v1beta1`` with a warning) are read; every other
Kubernetes object is ignored with an info note (a repo that Argo CD or Flux syncs holds many
kinds, none of them meshc's business). Unlike policy kinds, unknown fields are not errors: the
Kubernetes API server owns these schemas, meshc only types what it reads, so a wrong type there
is still a located error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compiler.diagnostics import Diagnostic, Loc, Path

__all__ = [
    "KIND_PREFIX",
    "Backend",
    "Ingress",
    "KubeObject",
    "Meta",
    "Namespace",
    "Service",
    "Workload",
    "is_kubernetes",
    "parse_object",
]

KIND_PREFIX = "kube:"
"""``Doc.kind`` of a Kubernetes object is ``kube:<Kind>``: never a policy kind, never in a bundle."""

OLD_INGRESS = ("extensions/v1beta1", "networking.k8s.io/v1beta1")
_READ = {
    ("v1", "Service"),
    ("v1", "Namespace"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("networking.k8s.io/v1", "Ingress"),
    *((api, "Ingress") for api in OLD_INGRESS),
}
_MESHC_GROUPS = ("kuma.io/", "meshc/")


class _K(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Meta(_K):
    name: str = Field(min_length=1)
    namespace: str = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}

    def tag(self, key: str) -> str | None:
        """A meshc/Kuma setting given as a label or an annotation (Kuma reads both)."""
        return self.labels.get(key, self.annotations.get(key))


class ServicePort(_K):
    name: str | None = None
    port: int
    protocol: str = "TCP"
    app_protocol: str | None = Field(None, alias="appProtocol")


class ServiceSpec(_K):
    type: str = "ClusterIP"
    ports: list[ServicePort] = []
    selector: dict[str, str] | None = None


class ContainerPort(_K):
    container_port: int = Field(alias="containerPort")
    name: str | None = None


class Container(_K):
    name: str
    ports: list[ContainerPort] = []


class PodSpec(_K):
    containers: list[Container] = []


class TemplateMeta(_K):
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class PodTemplate(_K):
    metadata: TemplateMeta = TemplateMeta()
    spec: PodSpec = PodSpec()


class WorkloadSpec(_K):
    template: PodTemplate


class BackendPort(_K):
    number: int | None = None
    name: str | None = None


class BackendService(_K):
    name: str
    port: BackendPort


class Backend(_K):
    """Both forms: v1 ``service: {name, port: {number|name}}``, v1beta1 ``serviceName/servicePort``."""

    service: BackendService | None = None
    service_name: str | None = Field(None, alias="serviceName")
    service_port: int | str | None = Field(None, alias="servicePort")

    @property
    def target(self) -> tuple[str, int | str] | None:
        if self.service is not None:
            port = (
                self.service.port.number if self.service.port.number is not None else self.service.port.name
            )
            return (self.service.name, port) if port is not None else None
        if self.service_name is not None and self.service_port is not None:
            return self.service_name, self.service_port
        return None


class IngressPath(_K):
    path: str = "/"
    path_type: str | None = Field(None, alias="pathType")
    backend: Backend


class IngressHttp(_K):
    paths: list[IngressPath] = []


class IngressRule(_K):
    host: str | None = None
    http: IngressHttp | None = None


class IngressSpec(_K):
    ingress_class_name: str | None = Field(None, alias="ingressClassName")
    default_backend: Backend | None = Field(None, alias="defaultBackend")
    backend: Backend | None = None
    """``extensions/v1beta1`` spelling of ``defaultBackend``."""
    rules: list[IngressRule] = []


class KubeObject(_K):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: Meta


class Namespace(KubeObject):
    pass


class Service(KubeObject):
    spec: ServiceSpec = ServiceSpec()


class Workload(KubeObject):
    """A Deployment or a StatefulSet: what matters is its pod template."""

    spec: WorkloadSpec


class Ingress(KubeObject):
    spec: IngressSpec = IngressSpec()


_MODELS: dict[str, type[KubeObject]] = {
    "Service": Service,
    "Namespace": Namespace,
    "Deployment": Workload,
    "StatefulSet": Workload,
    "Ingress": Ingress,
}


def is_kubernetes(raw: Mapping[Any, Any], policy_kinds: Mapping[str, Any]) -> bool:
    """Whether a document is a Kubernetes object rather than a policy.

    An ``apiVersion`` outside Kuma's and meshc's groups makes it one, except for a policy kind
    with a wrong apiVersion (that stays an error: a typo must not turn a policy into a no-op);
    ``v1`` ``Service`` is Kubernetes' own, not meshc's catalog ``Service``.
    """
    api, kind = raw.get("apiVersion"), raw.get("kind")
    if not isinstance(api, str) or not isinstance(kind, str) or api.startswith(_MESHC_GROUPS):
        return False
    return (api, kind) in _READ or kind not in policy_kinds


def parse_object(file: str, index: int, raw: dict[Any, Any]) -> tuple[KubeObject | None, list[Diagnostic]]:
    """The typed object (None when ignored or broken) and its findings, located by key path."""
    api, kind = raw["apiVersion"], raw["kind"]
    if (api, kind) not in _READ:
        note = f"Kubernetes {kind} ({api}) is not read by meshc; ignored"
        return None, [Diagnostic("I0001", note, Loc(file, index, ("kind",)))]
    try:
        obj = _MODELS[kind].model_validate(raw)
    except ValidationError as e:
        return None, [_error(file, index, raw, err) for err in e.errors(include_url=False)]
    return obj, []


def _error(file: str, index: int, raw: dict[Any, Any], err: Any) -> Diagnostic:
    path: Path = tuple(s for s in err["loc"] if isinstance(s, str | int))
    if err["type"] == "missing":
        code, msg = "E1003", f"`{path[-1]}` is required"
        path = path[:-1]
        anchor: Path = path if path else ("kind",)
        return Diagnostic(code, msg, Loc(file, index, anchor))
    value = err.get("input")
    if value is None:
        return Diagnostic("E1004", f"`{path[-1]}` has no value", Loc(file, index, path))
    if err["type"] == "string_too_short":
        return Diagnostic("E1005", f"`{path[-1]}` cannot be empty", Loc(file, index, path))
    return Diagnostic("E1002", f"wrong type: {err['msg'].lower()}", Loc(file, index, path))
