"""Build: resolved policies -> bundles (DESIGN §4), with the provenance of each.

The mesh bundle carries the catalog, mesh settings and, per destination, what a source with no
specific policy gets. A service bundle carries the inbound rules of its service and the outbound
config for each destination that some policy names this service as a source of (wildcard
policies included, so the entry is complete on its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compiler import convert
from compiler.catalog import MeshInfo
from compiler.gateway import GatewayBuild
from compiler.parse import Doc
from compiler.resolve import Entry, PolicyIndex
from runtime import bundle as b

__all__ = ["Built", "build_mesh"]


@dataclass
class Built:
    bundles: dict[str, b.MeshBundle | b.ServiceBundle] = field(default_factory=dict)
    provenance: dict[str, list[Doc]] = field(default_factory=dict)


def _rules(entries: list[Entry], default: Any = None) -> tuple[b.Rule[Any], ...]:
    rules: list[b.Rule[Any]] = [b.Rule(when=dict(e.when), peer=dict(e.peer), conf=e.conf) for e in entries]
    if default is not None and (not rules or rules[-1].when or rules[-1].peer):
        rules.append(b.Rule(conf=default))
    return tuple(rules)


def _dedupe(rules: tuple[b.Rule[Any], ...]) -> tuple[b.Rule[Any], ...]:
    seen = set()
    out = []
    for r in rules:
        key = (tuple(sorted(r.when.items())), tuple(sorted(r.peer.items())))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return tuple(out)


class _Builder:
    def __init__(self, idx: PolicyIndex) -> None:
        self.idx = idx

    def destination(self, src: str, dst: str, used: list[Doc]) -> b.Destination:
        keys = [(src, dst), (src, "*"), ("*", dst), ("*", "*")] if src != "*" else [("*", dst), ("*", "*")]

        def ranked(kind: str) -> list[Entry]:
            entries = self.idx.ranked(kind, self.idx.entries(kind, keys))
            used.extend(e.doc for e in entries)
            return entries

        return b.Destination(
            route=_rules(ranked("TrafficRoute"), convert.default_route(dst)),
            timeout=_rules(ranked("Timeout"), b.TimeoutConf()),
            retry=_rules(ranked("Retry")),
            circuit_breaker=_rules(ranked("CircuitBreaker")),
            health_check=_rules(ranked("HealthCheck")),
            traffic_log=_rules(ranked("TrafficLog")),
        )

    def inbound(self, service: str, used: list[Doc]) -> b.Inbound:
        def entries(kind: str) -> list[Entry]:
            table = self.idx.by_dst.get(kind, {})
            out = [*table.get(service, ()), *table.get("*", ())]
            used.extend(e.doc for e in out)
            return out

        perms = sorted(entries("TrafficPermission"), key=lambda e: (e.when, e.peer))
        return b.Inbound(
            permissions=_dedupe(
                tuple(b.Rule[None](when=dict(e.when), peer=dict(e.peer), conf=None) for e in perms)
            ),
            rate_limit=_rules(self.idx.ranked("RateLimit", entries("RateLimit"))),
            fault_injection=_rules(self.idx.ranked("FaultInjection", entries("FaultInjection"))),
        )


def build_mesh(
    mesh: MeshInfo,
    idx: PolicyIndex,
    gateways: list[GatewayBuild],
    logging: tuple[b.LoggingBackend, ...],
    on_bundle: Callable[[str, b.MeshBundle | b.ServiceBundle, list[Doc]], None],
) -> None:
    """Build every bundle of one mesh, handing each to ``on_bundle(key, bundle, docs)``."""
    bld = _Builder(idx)
    mtls, passthrough = convert.mesh_settings(mesh.doc.spec if mesh.doc else None)
    services = dict(sorted(mesh.services.items()))
    destinations = [n for n, s in services.items() if not s.gateway]
    mesh_used: list[Doc] = [mesh.doc] if mesh.doc else []
    mesh_used.extend(s.doc for s in services.values())
    mesh_bundle = b.MeshBundle(
        mesh=mesh.name,
        mtls=mtls,
        passthrough=passthrough,
        logging=logging,
        services={
            n: b.CatalogService(port=s.port, protocol=s.protocol, subsets=tuple(s.subsets), gateway=s.gateway)
            for n, s in services.items()
        },
        destinations={d: bld.destination("*", d, mesh_used) for d in destinations},
    )
    on_bundle(mesh.name, mesh_bundle, mesh_used)
    gw_by_service = {g.service: g for g in gateways}
    for name, svc in services.items():
        used: list[Doc] = [svc.doc]
        named = idx.sources.get(name, set())
        dests = (
            destinations
            if "*" in named
            else sorted(d for d in named if d in services and not services[d].gateway)
        )
        gw = gw_by_service.get(name)
        if gw is not None:
            used.extend(gw.docs)
        bundle = b.ServiceBundle(
            mesh=mesh.name,
            service=name,
            inbound=bld.inbound(name, used) if not svc.gateway else b.Inbound(),
            outbound={d: bld.destination(name, d, used) for d in dests},
            gateway=gw.conf if gw is not None else None,
        )
        on_bundle(f"{mesh.name}/{name}", bundle, used)
