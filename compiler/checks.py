"""Checks across the whole repo that no single document can make (references, shadowing, mTLS).

Each function takes the parsed documents and the catalog and yields findings; none has side
effects. Conflicts of equal specificity are found by ``resolve``; gateway checks by ``gateway``.
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.catalog import Catalog, check_tags
from compiler.denied import check_denied
from compiler.diagnostics import Diagnostic, Loc
from compiler.kinds import REGISTRY
from compiler.kinds import traffic_route as tr
from compiler.parse import Doc
from compiler.resolve_targetref import allowed_services

__all__ = ["check_all", "check_doc", "check_permissions"]

_SELECTOR_KINDS = {
    "TrafficRoute",
    "TrafficPermission",
    "HealthCheck",
    "CircuitBreaker",
    "Retry",
    "Timeout",
    "FaultInjection",
    "RateLimit",
    "TrafficLog",
}


def check_all(docs: list[Doc], cat: Catalog) -> Iterator[Diagnostic]:
    for d in docs:
        yield from check_doc(d, cat)
    yield from check_permissions(docs, cat)
    yield from check_denied(docs, cat)


def check_doc(d: Doc, cat: Catalog) -> Iterator[Diagnostic]:
    """The checks of one document against the catalog (the incremental compiler caches them)."""
    if d.mesh not in cat.meshes:
        return
    yield from _not_compiled(d)
    if d.kind in _SELECTOR_KINDS:
        yield from _selectors(d, cat)
    if d.kind == "TrafficRoute":
        yield from _route_targets(d, cat)
        yield from _shadowed(d)
    if d.kind == "TrafficLog":
        yield from _log_backend(d, cat)


def _not_compiled(d: Doc) -> Iterator[Diagnostic]:
    """A valid policy of a kind that does not shape bundles: say so where the kind is named."""
    kdef = REGISTRY[d.kind]
    where = Loc(d.file, d.index, ("kind",) if d.prefix else ("type",))
    if kdef.no_effect is not None:
        yield Diagnostic("W1004", f"{kdef.no_effect}; it is validated only", where)
    elif not kdef.compiled:
        msg = (
            f"{d.kind} is valid, but meshc does not compile targetRef policies into bundles yet: "
            "it has no effect on traffic (the legacy kinds do, meanwhile)"
        )
        yield Diagnostic("W1003", msg, where)


def check_permissions(docs: list[Doc], cat: Catalog) -> Iterator[Diagnostic]:
    """The checks that need every TrafficPermission (and MeshTrafficPermission) of a mesh."""
    yield from _permissions(docs, cat)


def _selectors(d: Doc, cat: Catalog) -> Iterator[Diagnostic]:
    for field in ("sources", "destinations"):
        for i, sel in enumerate(getattr(d.spec, field) or []):
            yield from check_tags(cat, d, (field, i, "match"), sel.match or {}, role="selector")


def _route_targets(d: Doc, cat: Catalog) -> Iterator[Diagnostic]:
    conf = d.spec.conf
    targets: list[tuple[tuple[str | int, ...], dict[str, str | None]]] = []
    if conf.destination is not None:
        targets.append((("conf", "destination"), conf.destination))
    for i, s in enumerate(conf.split or []):
        targets.append((("conf", "split", i, "destination"), s.destination or {}))
    for hi, h in enumerate(conf.http or []):
        if h.destination is not None:
            targets.append((("conf", "http", hi, "destination"), h.destination))
        for i, s in enumerate(h.split or []):
            targets.append((("conf", "http", hi, "split", i, "destination"), s.destination or {}))
    for path, tags in targets:
        yield from check_tags(cat, d, path, tags, role="route target")


def _covers(a: tr.StringMatch | None, b: tr.StringMatch | None) -> bool:
    """Whether every value ``b`` matches is matched by ``a`` (None matches everything)."""
    if a is None:
        return True
    if b is None:
        return False
    if a.exact is not None:
        return b.exact == a.exact
    if a.prefix is not None:
        if b.exact is not None:
            return b.exact.startswith(a.prefix)
        if b.prefix is not None:
            return b.prefix.startswith(a.prefix)
        return False
    return a.regex is not None and b.regex == a.regex


def _shadowed(d: Doc) -> Iterator[Diagnostic]:
    entries = d.spec.conf.http or []
    for j, later in enumerate(entries):
        for i in range(j):
            early = entries[i]
            em, lm = early.match, later.match
            if em is None or lm is None:
                continue
            headers_cover = all(
                name in (lm.headers or {}) and _covers(m, (lm.headers or {})[name])
                for name, m in (em.headers or {}).items()
            )
            if _covers(em.method, lm.method) and _covers(em.path, lm.path) and headers_cover:
                yield Diagnostic(
                    "W1002",
                    f"http[{i}] matches every request this entry matches, so it is never used; "
                    "move it above or make it narrower",
                    d.loc(("conf", "http", j, "match")),
                    related_locs=((d.loc(("conf", "http", i, "match")), "the earlier match"),),
                )
                break


def _log_backend(d: Doc, cat: Catalog) -> Iterator[Diagnostic]:
    mesh = cat.meshes[d.mesh].doc
    backends = [b.name for b in (mesh.spec.logging.backends if mesh and mesh.spec.logging else [])]
    name = d.spec.conf.backend if d.spec.conf else None
    if (name and name not in backends) or (not name and not backends):
        yield Diagnostic(
            "E2005",
            f"logging backend {name!r} is not defined by Mesh {d.mesh!r} "
            f"(defined: {', '.join(backends) or 'none'})",
            d.loc(("conf", "backend") if name else ("conf",)),
        )


def _permissions(docs: list[Doc], cat: Catalog) -> Iterator[Diagnostic]:
    for mesh_name, mesh in cat.meshes.items():
        perms = [d for d in docs if d.kind == "TrafficPermission" and d.mesh == mesh_name]
        spec = mesh.doc.spec if mesh.doc else None
        mtls_on = bool(spec and spec.mtls and spec.mtls.enabled_backend)
        if not mtls_on:
            for p in perms:
                yield Diagnostic(
                    "W2001",
                    f"mesh {mesh_name!r} has mTLS off, so this TrafficPermission has no effect "
                    "(set `mtls.enabledBackend` on the Mesh to enforce it)",
                    Loc(p.file, p.index, ("kind",) if p.prefix else ("type",)),
                )
            continue
        # The services some permission lets callers into (``*``: all of them), computed once.
        named = {
            (sel.match or {}).get("kuma.io/service", "*") for p in perms for sel in p.spec.destinations or []
        }
        named.update(allowed_services(d for d in docs if d.mesh == mesh_name))
        for svc in mesh.services.values():
            if svc.gateway:
                continue
            if "*" not in named and svc.name not in named:
                yield Diagnostic(
                    "W2002",
                    f"mTLS is on and no TrafficPermission lets any caller reach {svc.name!r}: "
                    "all its traffic will be denied",
                    Loc(svc.doc.file, svc.doc.index, ("metadata", "name") if svc.doc.prefix else ("name",)),
                )
