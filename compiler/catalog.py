"""The catalog: meshes, services, gateways and their subsets, and the checks against it.

Everything a selector may name is declared here: ``Service`` documents (with their subsets) and
the gateway service of each ``MeshGateway``. Checks that need the whole repo (unknown mesh,
unknown service, undeclared subset, duplicate names, selectors that match nothing) live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from compiler.diagnostics import Diagnostic, Loc, Path
from compiler.kinds.base import SERVICE_TAG, extra_tags, selector_service
from compiler.parse import Doc

__all__ = ["Catalog", "MeshInfo", "ServiceInfo", "build_catalog"]


@dataclass
class ServiceInfo:
    name: str
    port: int
    protocol: str
    subsets: list[dict[str, str]]
    doc: Doc
    gateway: bool = False


@dataclass
class MeshInfo:
    name: str
    doc: Doc | None
    services: dict[str, ServiceInfo] = field(default_factory=dict)


@dataclass
class Catalog:
    meshes: dict[str, MeshInfo]
    broken: frozenset[tuple[str, str, str]] = frozenset()
    """(kind, mesh, name) declared by catalog documents that did not validate: references to them
    are not reported again (their own diagnostics say what is wrong)."""

    def service(self, mesh: str, name: str) -> ServiceInfo | None:
        m = self.meshes.get(mesh)
        return m.services.get(name) if m else None


def build_catalog(
    docs: list[Doc], declared: Iterable[tuple[str, str, str]] = ()
) -> tuple[Catalog, list[Diagnostic]]:
    findings: list[Diagnostic] = []
    broken = frozenset(declared)
    meshes: dict[str, MeshInfo] = {}
    seen: dict[tuple[str, str, str], Doc] = {}
    for d in docs:
        key = (d.kind, d.mesh, d.name)
        if key in seen:
            first = seen[key]
            findings.append(
                Diagnostic(
                    "E3001",
                    f"{d.kind} {d.name!r} is defined twice in mesh {d.mesh!r}; rename one",
                    _name_loc(d),
                    related_locs=((_name_loc(first), f"first defined in {first.file}"),),
                )
            )
        else:
            seen[key] = d
        if d.kind == "Mesh" and d.name not in meshes:
            meshes[d.name] = MeshInfo(d.name, d)
    for d in docs:
        if d.kind != "Mesh" and d.mesh not in meshes and ("Mesh", d.mesh, d.mesh) not in broken:
            known = ", ".join(sorted(meshes)) or "none"
            findings.append(
                Diagnostic(
                    "E2003",
                    f"mesh {d.mesh!r} is not declared by any Mesh document (declared: {known})",
                    Loc(d.file, d.index, ("mesh",)),
                )
            )
    for d in docs:
        m = meshes.get(d.mesh)
        if m is None:
            continue
        if d.kind == "Service":
            _add(m, ServiceInfo(d.name, d.spec.port, d.spec.protocol, list(d.spec.subsets), d), findings)
        elif d.kind == "MeshGateway":
            for sel in d.spec.selectors or []:
                name = (sel.match or {}).get(SERVICE_TAG)
                if isinstance(name, str) and name and name != "*":
                    existing = m.services.get(name)
                    if existing is not None and existing.doc is d:
                        continue
                    ports = [lst.port for lst in d.spec.conf.listeners if lst.port] if d.spec.conf else []
                    tags = dict(d.spec.tags or {})
                    _add(
                        m,
                        ServiceInfo(name, ports[0] if ports else 80, "http", [tags] if tags else [], d, True),
                        findings,
                    )
    return Catalog(meshes, broken), findings


def _add(mesh: MeshInfo, info: ServiceInfo, findings: list[Diagnostic]) -> None:
    prev = mesh.services.get(info.name)
    if prev is not None:
        findings.append(
            Diagnostic(
                "E3001",
                f"service {info.name!r} is declared twice in mesh {mesh.name!r} "
                f"(by {prev.doc.kind} {prev.doc.name!r} and {info.doc.kind} {info.doc.name!r})",
                _name_loc(info.doc),
                related_locs=((_name_loc(prev.doc), f"first declared in {prev.doc.file}"),),
            )
        )
        return
    mesh.services[info.name] = info


def _name_loc(d: Doc) -> Loc:
    return Loc(d.file, d.index, ("metadata", "name") if d.prefix else ("name",))


def subset_matches(selector: Mapping[str, str], subset: Mapping[str, str]) -> bool:
    return all(k in subset and (v == "*" or subset[k] == v) for k, v in selector.items())


def carries(svc: ServiceInfo, tags: Mapping[str, str]) -> bool:
    """Whether some declared subset of the service carries these tags."""
    if not tags:
        return True
    return any(subset_matches(tags, s) for s in svc.subsets)


def check_tags(
    cat: Catalog, doc: Doc, path: Path, tags: Mapping[str, Any], *, role: str, wildcard_ok: bool = True
) -> Iterator[Diagnostic]:
    """Unknown service, undeclared subset, or (for ``*``) tags that match no service."""
    mesh = cat.meshes.get(doc.mesh)
    if mesh is None:
        return
    name = selector_service(tags)
    extra = extra_tags(tags)
    if name == "*":
        if extra and not any(carries(s, extra) for s in mesh.services.values()):
            yield Diagnostic(
                "W1001",
                f"no service declares a subset with tags {_fmt(extra)}: this {role} matches nothing",
                doc.loc(path),
            )
        return
    svc = mesh.services.get(name)
    if svc is None and ("Service", doc.mesh, name) in cat.broken:
        return
    if svc is None:
        yield Diagnostic(
            "E2001",
            f"service {name!r} is not in mesh {doc.mesh!r}; declare it with a Service document"
            f"{_suggest(name, mesh.services)}",
            doc.loc((*path, SERVICE_TAG)),
        )
        return
    if not carries(svc, extra):
        declared = ", ".join(_fmt(s) for s in svc.subsets) or "none"
        bad = next(iter(extra))
        yield Diagnostic(
            "E2002",
            f"no subset of {name!r} carries {_fmt(extra)} (declared subsets: {declared}); "
            "add the subset to its Service or fix the tags",
            doc.loc((*path, bad)),
        )


def _fmt(tags: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(tags.items())) + "}"


def _suggest(name: str, services: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(services), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""
