"""Kubernetes objects -> the catalog, gateway and route documents they mean (a pure function).

As Kuma names them, each port of a Kubernetes Service is the mesh service
``<name>_<namespace>_svc_<port>``; its subsets are the pod template labels of the Deployments and
StatefulSets the Service selects; its protocol comes from the ``<port>.service.kuma.io/protocol``
annotation, ``appProtocol`` or the port name (``http``, ``http-*``), else ``tcp`` (Kuma's default).
The mesh is the ``kuma.io/mesh`` label or annotation of the object, else of its Namespace, else
``default``; like Kuma on Kubernetes, the ``default`` Mesh exists without a document.

An Ingress becomes a MeshGatewayRoute on the gateway its ``meshc.io/gateway`` annotation names,
else on the mesh's only MeshGateway, else on ``meshc-gateway`` (HTTP on 8080, the gateway
``meshc manifests`` deploys). ``konghq.com/strip-path: "true"`` strips the matched prefix, as Kong
does. Derived documents point at the Kubernetes object they come from, so every later finding
has its file, line and column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

from ruamel.yaml import YAML

from compiler.diagnostics import Diagnostic, Loc, Path
from compiler.kinds import REGISTRY
from compiler.kinds.base import PROTOCOL_TAG, SERVICE_TAG
from compiler.kube import objects as k
from compiler.parse import Doc

__all__ = ["DEFAULT_GATEWAY", "DEFAULT_GATEWAY_PORT", "KubeExpander", "expand", "is_kube", "service_name"]

DEFAULT_GATEWAY = "meshc-gateway"
DEFAULT_GATEWAY_PORT = 8080
MESH_KEY = "kuma.io/mesh"
GATEWAY_KEY = "meshc.io/gateway"
SERVICE_LABEL = "kuma.io/service"
"""A gateway pod's label naming its gateway (the name it registers as), as on Kuma's gateway pods."""
STRIP_KEY = "konghq.com/strip-path"
_RESERVED = {SERVICE_TAG, PROTOCOL_TAG}
_HTTP = {"http", "kuma.io/http"}
_TCP = {"tcp", "kuma.io/tcp"}


def service_name(name: str, namespace: str, port: int) -> str:
    """Kuma's name of a Kubernetes Service port (``benigno_kong-mesh-app_svc_5000``)."""
    return f"{name}_{namespace}_svc_{port}"


def is_kube(d: Doc) -> bool:
    return d.kind.startswith(k.KIND_PREFIX)


def expand(docs: Sequence[Doc]) -> tuple[list[Doc], list[Diagnostic]]:
    """The documents without the Kubernetes objects, plus what those objects declare."""
    if not any(is_kube(d) for d in docs):
        return list(docs), []
    return _Derivation(docs).run()


class KubeExpander:
    """``expand`` remembered between incremental compiles: while the Kubernetes objects and the
    catalog documents they depend on are the same objects, the derived documents are too (the
    incremental compiler keys its per-document checks by identity)."""

    def __init__(self) -> None:
        self._key: list[Doc] = []
        self._out: tuple[list[Doc], list[Diagnostic]] = ([], [])

    def expand(self, docs: Sequence[Doc]) -> tuple[list[Doc], list[Diagnostic]]:
        key = [d for d in docs if is_kube(d) or d.kind in ("Mesh", "MeshGateway")]
        if not any(is_kube(d) for d in key):
            return list(docs), []
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key, strict=True)):
            self._key = key
            derived = _Derivation(docs).run()
            base = {id(d) for d in docs}
            self._out = ([d for d in derived[0] if id(d) not in base], derived[1])
        return [d for d in docs if not is_kube(d)] + self._out[0], list(self._out[1])


@dataclass
class _Derivation:
    docs: Sequence[Doc]
    out: list[Doc] = field(default_factory=list)
    findings: list[Diagnostic] = field(default_factory=list)

    def run(self) -> tuple[list[Doc], list[Diagnostic]]:
        kube = [d for d in self.docs if is_kube(d)]
        rest = [d for d in self.docs if not is_kube(d)]
        self.namespaces = {d.spec.metadata.name: d.spec for d in kube if d.kind == "kube:Namespace"}
        self.workloads = [d for d in kube if d.kind in ("kube:Deployment", "kube:StatefulSet")]
        self.services = [d for d in kube if d.kind == "kube:Service"]
        self.rest = rest
        self.meshes = {d.name for d in rest if d.kind == "Mesh"}
        self.synth_gateways: dict[str, Doc] = {}
        derived: list[Doc] = []
        for d in self.services:
            derived.extend(self._service(d))
        routes: list[Doc] = []
        for d in kube:
            if d.kind == "kube:Ingress":
                routes.extend(self._ingress(d))
        used = sorted({x.mesh for x in (*derived, *routes)})
        meshes = [self._synth_mesh(kube[0], m) for m in used if m == "default" and m not in self.meshes]
        return [*rest, *meshes, *derived, *self.synth_gateways.values(), *routes], self.findings

    # --- helpers ----------------------------------------------------------------------------------

    def _mesh(self, *metas: k.Meta | k.TemplateMeta, namespace: str) -> str:
        for m in metas:
            v = m.labels.get(MESH_KEY, m.annotations.get(MESH_KEY))
            if v:
                return v
        ns = self.namespaces.get(namespace)
        return (ns.metadata.tag(MESH_KEY) if ns else None) or "default"

    def _note(self, code: str, msg: str, d: Doc, path: Path) -> None:
        self.findings.append(Diagnostic(code, msg, Loc(d.file, d.index, path)))

    @staticmethod
    def _doc(src: Doc, kind: str, mesh: str, name: str, spec: dict[str, Any]) -> Doc:
        return Doc(src.file, src.index, kind, mesh, name, REGISTRY[kind].spec.model_validate(spec), ("spec",))

    def _synth_mesh(self, src: Doc, mesh: str) -> Doc:
        return self._doc(src, "Mesh", mesh, mesh, {})

    # --- Services ---------------------------------------------------------------------------------

    def _selected(self, svc: k.Service) -> list[k.Workload]:
        sel = svc.spec.selector or {}
        if not sel:
            return []
        out = []
        for d in self.workloads:
            w: k.Workload = d.spec
            labels = w.spec.template.metadata.labels
            if w.metadata.namespace == svc.metadata.namespace and all(
                labels.get(a) == b for a, b in sel.items()
            ):
                out.append(w)
        return out

    def _service(self, d: Doc) -> Iterable[Doc]:
        svc: k.Service = d.spec
        meta = svc.metadata
        selected = self._selected(svc)
        if svc.spec.selector and not selected:
            self._note(
                "I2001",
                f"Service {meta.name!r} selects no Deployment or StatefulSet of the policy directory: "
                "no subsets are known",
                d,
                ("spec", "selector"),
            )
        subsets: list[dict[str, str]] = []
        for w in selected:
            tags = {a: b for a, b in sorted(w.spec.template.metadata.labels.items()) if a not in _RESERVED}
            if tags and tags not in subsets:
                subsets.append(tags)
        subsets.sort(key=lambda t: sorted(t.items()))
        mesh = self._mesh(meta, *(w.spec.template.metadata for w in selected[:1]), namespace=meta.namespace)
        for i, port in enumerate(svc.spec.ports):
            path: Path = ("spec", "ports", i)
            if port.protocol.upper() == "UDP":
                self._note("I1001", f"port {port.port} is UDP, which meshc does not proxy; skipped", d, path)
                continue
            protocol = self._protocol(d, meta, port, path)
            spec = {"port": port.port, "protocol": protocol, "subsets": subsets}
            yield self._doc(d, "Service", mesh, service_name(meta.name, meta.namespace, port.port), spec)

    def _protocol(self, d: Doc, meta: k.Meta, port: k.ServicePort, path: Path) -> str:
        ann = meta.annotations.get(f"{port.port}.service.kuma.io/protocol")
        given = ann or port.app_protocol
        if given is None:
            name = (port.name or "").lower()
            return "http" if name == "http" or name.startswith("http-") else "tcp"
        low = given.lower()
        if low in _HTTP:
            return "http"
        if low not in _TCP:
            where = (
                ("metadata", "annotations", f"{port.port}.service.kuma.io/protocol")
                if ann
                else (*path, "appProtocol")
            )
            self._note("I1001", f"protocol {given!r} is not routed at L7 by meshc; proxied as tcp", d, where)
        return "tcp"

    # --- Ingress ----------------------------------------------------------------------------------

    def _gateway(self, d: Doc, ing: k.Ingress, mesh: str) -> str | None:
        declared = []
        for g in self.rest:
            if g.kind == "MeshGateway" and g.mesh == mesh:
                for sel in g.spec.selectors or []:
                    name = (sel.match or {}).get(SERVICE_TAG)
                    if isinstance(name, str) and name not in declared:
                        declared.append(name)
        wanted = ing.metadata.annotations.get(GATEWAY_KEY)
        if wanted is not None:
            if wanted in declared or (wanted == DEFAULT_GATEWAY and not declared):
                if wanted == DEFAULT_GATEWAY and not declared:
                    self._synth_gateway(d, mesh)
                return wanted
            known = ", ".join(declared) or "none"
            self._note(
                "E2007",
                f"{GATEWAY_KEY} names {wanted!r}, which no MeshGateway of mesh {mesh!r} selects "
                f"(declared: {known})",
                d,
                ("metadata", "annotations", GATEWAY_KEY),
            )
            return None
        if len(declared) == 1:
            return declared[0]
        if declared:
            self._note(
                "E2007",
                f"mesh {mesh!r} has several gateways ({', '.join(declared)}); "
                f"say which one serves this Ingress with the annotation {GATEWAY_KEY}",
                d,
                ("metadata", "name"),
            )
            return None
        self._synth_gateway(d, mesh)
        return DEFAULT_GATEWAY

    def _synth_gateway(self, src: Doc, mesh: str) -> None:
        if mesh not in self.synth_gateways:
            spec = {
                "selectors": [{"match": {SERVICE_TAG: DEFAULT_GATEWAY}}],
                "conf": {"listeners": [{"port": DEFAULT_GATEWAY_PORT, "protocol": "HTTP"}]},
            }
            self.synth_gateways[mesh] = self._doc(src, "MeshGateway", mesh, DEFAULT_GATEWAY, spec)

    def _backend(self, d: Doc, ns: str, b: k.Backend, path: Path) -> str | None:
        target = b.target
        if target is None:
            self._note("E1003", "the backend names no service and port", d, path)
            return None
        name, port = target
        for s in self.services:
            svc: k.Service = s.spec
            if svc.metadata.name != name or svc.metadata.namespace != ns:
                continue
            for p in svc.spec.ports:
                if port in (p.port, p.name):
                    return service_name(name, ns, p.port)
            self._note("E2006", f"Service {name!r} has no port {port!r}", d, path)
            return None
        self._note(
            "E2006", f"no Kubernetes Service {name!r} in namespace {ns!r} in the policy directory", d, path
        )
        return None

    def _ingress(self, d: Doc) -> Iterable[Doc]:
        ing: k.Ingress = d.spec
        meta = ing.metadata
        if ing.api_version in k.OLD_INGRESS:
            self._note(
                "W0001",
                f"{ing.api_version} Ingress was removed in Kubernetes 1.22; the same Ingress in "
                f"networking.k8s.io/v1 reads:\n{ingress_v1(ing)}",
                d,
                ("apiVersion",),
            )
        mesh = self._mesh(meta, namespace=meta.namespace)
        gateway = self._gateway(d, ing, mesh)
        strip = meta.annotations.get(STRIP_KEY, "").lower() == "true"
        groups: dict[str | None, list[dict[str, Any]]] = {}
        default = ing.spec.default_backend or ing.spec.backend
        if default is not None:
            key = "defaultBackend" if ing.spec.default_backend is not None else "backend"
            self._rule(d, groups, None, "/", None, default, False, ("spec", key))
        for i, rule in enumerate(ing.spec.rules):
            for j, p in enumerate(rule.http.paths if rule.http else []):
                path: Path = ("spec", "rules", i, "http", "paths", j)
                self._rule(d, groups, rule.host, p.path, p.path_type, p.backend, strip, path)
        if gateway is None:
            return
        for n, (host, rules) in enumerate(groups.items()):
            name = f"{meta.name}_{meta.namespace}_ingress" + (f"_{n}" if len(groups) > 1 else "")
            http: dict[str, Any] = {"rules": rules}
            if host:
                http["hostnames"] = [host]
            spec = {"selectors": [{"match": {SERVICE_TAG: gateway}}], "conf": {"http": http}}
            yield self._doc(d, "MeshGatewayRoute", mesh, name, spec)

    def _rule(
        self,
        d: Doc,
        groups: dict[str | None, list[dict[str, Any]]],
        host: str | None,
        value: str,
        path_type: str | None,
        backend: k.Backend,
        strip: bool,
        path: Path,
    ) -> None:
        if not value.startswith("/"):
            self._note("E1005", "an Ingress path must start with `/`", d, (*path, "path"))
            return
        target = self._backend(d, d.spec.metadata.namespace, backend, (*path, "backend"))
        if target is None:
            return
        exact = path_type == "Exact"
        value = value if exact else (value.rstrip("/") or "/")
        rule: dict[str, Any] = {
            "matches": [{"path": {"match": "EXACT" if exact else "PREFIX", "value": value}}],
            "backends": [{"weight": 1, "destination": {SERVICE_TAG: target}}],
        }
        if strip and value != "/":
            rewrite = {"replaceFull": "/"} if exact else {"replacePrefixMatch": "/"}
            rule["filters"] = [{"rewrite": rewrite}]
        groups.setdefault(host, []).append(rule)


def _v1_backend(b: k.Backend) -> dict[str, Any]:
    target = b.target
    if target is None:
        return {}
    name, port = target
    return {"service": {"name": name, "port": {"number": port} if isinstance(port, int) else {"name": port}}}


def ingress_v1(ing: k.Ingress) -> str:
    """The ``networking.k8s.io/v1`` form of an Ingress (``pathType: Prefix``: what meshc compiles)."""
    meta: dict[str, Any] = {"name": ing.metadata.name, "namespace": ing.metadata.namespace}
    if ing.metadata.labels:
        meta["labels"] = dict(ing.metadata.labels)
    if ing.metadata.annotations:
        meta["annotations"] = dict(ing.metadata.annotations)
    spec: dict[str, Any] = {}
    if ing.spec.ingress_class_name:
        spec["ingressClassName"] = ing.spec.ingress_class_name
    default = ing.spec.default_backend or ing.spec.backend
    if default is not None:
        spec["defaultBackend"] = _v1_backend(default)
    rules = []
    for r in ing.spec.rules:
        rule: dict[str, Any] = {}
        if r.host:
            rule["host"] = r.host
        if r.http is not None:
            rule["http"] = {
                "paths": [
                    {"path": p.path, "pathType": p.path_type or "Prefix", "backend": _v1_backend(p.backend)}
                    for p in r.http.paths
                ]
            }
        rules.append(rule)
    if rules:
        spec["rules"] = rules
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}
    yaml = YAML()
    buf = StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue().rstrip("\n")
