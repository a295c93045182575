"""Policies whose traffic the permissions deny: a cross-resource check no single document can make.

Decision (as in Kuma on Envoy): an active health check is traffic like any other. It leaves the
checking data plane under that data plane's identity, over mTLS, and reaches the destination's
inbound listener, where the TrafficPermissions are enforced; nothing exempts it. So a HealthCheck
whose sources include a data plane the permissions do not let call the destination produces checks
that are refused with 403 and count as failures, and (once every check fails) an endpoint that is
healthy is ejected from that source's view. Other policies only shape traffic that exists, so one
is reported only when it names a source explicitly and every source it names is denied: it can
never take effect.

Permissions are read at the service level: a permission whose selectors carry tags beyond the
service counts as allowing that pair (it allows some instances; a finer view would guess).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from compiler.catalog import Catalog, MeshInfo
from compiler.diagnostics import Diagnostic
from compiler.kinds.base import selector_service
from compiler.parse import Doc

__all__ = ["SHAPING_KINDS", "allowed_pairs", "check_denied", "doc_denied", "enforced"]

SHAPING_KINDS = frozenset(
    {"TrafficRoute", "HealthCheck", "CircuitBreaker", "Retry", "Timeout", "FaultInjection", "TrafficLog"}
)
"""Kinds that configure a source's calls to a destination (outbound), so a denied pair matters."""


def _services(mesh: MeshInfo, selectors: list[Mapping[str, str | None]]) -> list[str]:
    names = {selector_service(s) for s in selectors}
    if "*" in names:
        return sorted(mesh.services)
    return sorted(n for n in names if n in mesh.services)


def _matches(doc: Doc) -> tuple[list[Mapping[str, str | None]], list[Mapping[str, str | None]]]:
    src = [sel.match or {} for sel in doc.spec.sources or []]
    dst = [sel.match or {} for sel in doc.spec.destinations or []]
    return src, dst


def check_denied(docs: list[Doc], cat: Catalog) -> Iterator[Diagnostic]:
    """W2003 for each shaping policy and destination whose sources the permissions deny."""
    for mesh_name, mesh in cat.meshes.items():
        if not enforced(mesh):
            continue  # permissions have no effect (W2001 says so)
        perms = [d for d in docs if d.kind == "TrafficPermission" and d.mesh == mesh_name]
        allowed = allowed_pairs(perms)
        for d in docs:
            if d.mesh == mesh_name and d.kind in SHAPING_KINDS:
                yield from doc_denied(d, mesh, allowed, perms)


def enforced(mesh: MeshInfo) -> bool:
    """Whether the mesh's permissions are enforced (mTLS on)."""
    spec = mesh.doc.spec if mesh.doc else None
    return bool(spec and spec.mtls and spec.mtls.enabled_backend)


def allowed_pairs(perms: list[Doc]) -> set[tuple[str, str]]:
    """The (source, destination) service pairs a mesh's TrafficPermissions allow (``*`` kept)."""
    allowed: set[tuple[str, str]] = set()
    for p in perms:
        src, dst = _matches(p)
        for s in {selector_service(m) for m in src}:
            for t in {selector_service(m) for m in dst}:
                allowed.add((s, t))
    return allowed


def doc_denied(
    d: Doc, mesh: MeshInfo, allowed: set[tuple[str, str]], perms: list[Doc]
) -> Iterator[Diagnostic]:
    """The W2003 findings of one shaping document (``check_denied`` one document at a time, for
    the incremental compiler: a change to one policy re-checks that policy only)."""
    src, dst = _matches(d)
    explicit = all(selector_service(m) != "*" for m in src)
    if d.kind != "HealthCheck" and not explicit:
        return
    sources = _services(mesh, src)
    for dest in _services(mesh, dst):
        if mesh.services[dest].gateway:
            continue
        denied = [s for s in sources if not _permits(allowed, s, dest)]
        # a HealthCheck's every denied source is a failing check; any other policy is
        # reported only when it can never apply (every source it names is denied)
        if denied and (d.kind == "HealthCheck" or len(denied) == len(sources)):
            yield _finding(d, dest, denied, perms)


def _permits(allowed: set[tuple[str, str]], source: str, dest: str) -> bool:
    return any((s, t) in allowed for s in (source, "*") for t in (dest, "*"))


def _finding(d: Doc, dest: str, denied: list[str], perms: list[Doc]) -> Diagnostic:
    covering = [
        p
        for p in perms
        if any(selector_service(m.match or {}) in (dest, "*") for m in p.spec.destinations or [])
    ]
    if covering:
        why = "the TrafficPermissions that let callers reach it ({}) do not allow {}".format(
            ", ".join(repr(p.name) for p in covering), _names(denied)
        )
    else:
        why = f"no TrafficPermission lets any caller reach it, so {_names(denied)} cannot"
    if d.kind == "HealthCheck":
        what = (
            f"the health checks of {dest!r} from {_names(denied)} will be refused (403) and count as "
            f"failures: {why}; narrow `sources` to the callers that may reach {dest!r} or add a "
            "TrafficPermission"
        )
    else:
        what = (
            f"this {d.kind} shapes calls from {_names(denied)} to {dest!r}, which mTLS denies: {why}; "
            "it can never take effect"
        )
    return Diagnostic(
        "W2003",
        what,
        d.loc(("sources",)),
        related_locs=tuple((p.loc(("destinations",)), f"TrafficPermission {p.name!r}") for p in covering),
    )


def _names(services: list[str]) -> str:
    return ", ".join(repr(s) for s in services)
