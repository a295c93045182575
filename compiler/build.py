"""Build: resolved policies -> bundles (DESIGN §4), with the provenance of each.

The mesh bundle carries the catalog, mesh settings and, per destination, what a source with no
specific policy gets. A service bundle carries the inbound rules of its service and the outbound
config for each destination that some policy names this service as a source of (wildcard
policies included, so the entry is complete on its own).

Bundles are written straight to canonical JSON, the bytes ``runtime.bundle.bundle_bytes`` gives
for the equivalent ``MeshBundle``/``ServiceBundle`` model (a test holds them to it): each policy
conf is dumped by its pydantic model once, each rule serialized once per entry, and a bundle is
assembled from those fragments with its keys sorted as ``json.dumps(sort_keys=True)`` sorts
them. A 10,000-service mesh so never builds 10,000 pydantic bundle models only to dump them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from compiler import convert
from compiler.catalog import MeshInfo, ServiceInfo
from compiler.gateway import GatewayBuild
from compiler.parse import Doc
from compiler.resolve import Entry, PolicyIndex
from runtime import bundle as b

__all__ = ["Built", "MeshBuilder", "build_mesh", "canon", "json_object"]

canon: Callable[[Any], str] = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False
).encode
"""Canonical JSON as ``runtime.bundle.canonical_json`` writes it, as ``str``."""


def json_object(items: Iterable[tuple[str, str]]) -> str:
    """A JSON object from (key, canonical JSON of the value) pairs, keys sorted like ``canon``."""
    return "{" + ",".join([f"{canon(k)}:{v}" for k, v in sorted(items)]) + "}"


@dataclass
class Built:
    bundles: dict[str, bytes] = field(default_factory=dict)
    provenance: dict[str, list[Doc]] = field(default_factory=dict)


# Outbound kinds in the order of the Destination's keys when sorted (the JSON key order).
_DEST_FIELDS: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            "route": "TrafficRoute",
            "timeout": "Timeout",
            "retry": "Retry",
            "circuit_breaker": "CircuitBreaker",
            "health_check": "HealthCheck",
            "traffic_log": "TrafficLog",
        }.items()
    )
)
_TIMEOUT_DEFAULT = canon(
    {"when": {}, "peer": {}, "conf": b.TimeoutConf().model_dump(mode="json")},
)
_EMPTY_INBOUND = canon(b.Inbound().model_dump(mode="json"))


def _rules(entries: list[Entry], default: str | None = None) -> str:
    """An ordered rule list; ``default`` (a serialized unconditional rule) closes it when needed."""
    parts = [e.rule_json for e in entries]
    if default is not None and (not entries or entries[-1].when or entries[-1].peer):
        parts.append(default)
    return "[" + ",".join(parts) + "]"


class MeshBuilder:
    """Builds the bundles of one mesh, one at a time, as canonical JSON with their provenance."""

    def __init__(
        self,
        mesh: MeshInfo,
        idx: PolicyIndex,
        gateways: list[GatewayBuild],
        logging: tuple[b.LoggingBackend, ...],
    ) -> None:
        self.mesh, self.idx, self.logging = mesh, idx, logging
        self.services: dict[str, ServiceInfo] = dict(sorted(mesh.services.items()))
        self.destinations = [n for n, s in self.services.items() if not s.gateway]
        self.gateways = {g.service: g for g in gateways}
        self._default_route: dict[str, str] = {}

    def bundle_keys(self) -> list[str]:
        """The bundle keys of this mesh: the mesh, then each service and gateway."""
        return [self.mesh.name, *(f"{self.mesh.name}/{n}" for n in self.services)]

    def _route_default(self, dst: str) -> str:
        s = self._default_route.get(dst)
        if s is None:
            conf = convert.default_route(dst).model_dump(mode="json")
            s = self._default_route[dst] = canon({"when": {}, "peer": {}, "conf": conf})
        return s

    def destination(self, src: str, dst: str, used: list[Doc]) -> str:
        idx = self.idx
        keys = [(src, dst), (src, "*"), ("*", dst), ("*", "*")] if src != "*" else [("*", dst), ("*", "*")]
        parts = []
        for name, kind in _DEST_FIELDS:
            entries = idx.ranked(kind, idx.entries(kind, keys)) if kind in idx.by_kind else []
            used.extend([e.doc for e in entries])
            default = None
            if name == "route":
                default = self._route_default(dst)
            elif name == "timeout":
                default = _TIMEOUT_DEFAULT
            parts.append(f'"{name}":{_rules(entries, default)}')
        return "{" + ",".join(parts) + "}"

    def inbound(self, service: str, used: list[Doc]) -> str:
        def entries(kind: str) -> list[Entry]:
            table = self.idx.by_dst.get(kind, {})
            out = [*table.get(service, ()), *table.get("*", ())]
            used.extend([e.doc for e in out])
            return out

        perms = sorted(entries("TrafficPermission"), key=lambda e: (e.when, e.peer))
        seen: set[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = set()
        permissions = []
        for e in perms:
            if (e.when, e.peer) not in seen:
                seen.add((e.when, e.peer))
                permissions.append(e.rule_json)
        rate_limit = _rules(self.idx.ranked("RateLimit", entries("RateLimit")))
        fault = _rules(self.idx.ranked("FaultInjection", entries("FaultInjection")))
        perms_json = "[" + ",".join(permissions) + "]"
        return f'{{"fault_injection":{fault},"permissions":{perms_json},"rate_limit":{rate_limit}}}'

    def mesh_bundle(self) -> tuple[bytes, list[Doc]]:
        mesh = self.mesh
        mtls, passthrough = convert.mesh_settings(mesh.doc.spec if mesh.doc else None)
        used: list[Doc] = [mesh.doc] if mesh.doc else []
        used.extend(s.doc for s in self.services.values())
        services = json_object((n, _catalog_json(s)) for n, s in self.services.items())
        destinations = json_object((d, self.destination("*", d, used)) for d in self.destinations)
        head = canon(
            {
                "format": b.BUNDLE_FORMAT,
                "logging": [x.model_dump(mode="json") for x in self.logging],
                "mesh": mesh.name,
                "mtls": mtls.model_dump(mode="json"),
                "passthrough": passthrough,
                "type": "mesh",
            }
        )
        # {"destinations":…, <head's keys, all sorting between "destinations" and "services">,
        #  "services":…, "type":"mesh"}: keys stay sorted.
        head_items = head[1 : -len(',"type":"mesh"}')]
        text = f'{{"destinations":{destinations},{head_items},"services":{services},"type":"mesh"}}'
        return text.encode(), used

    def service_bundle(self, name: str) -> tuple[bytes, list[Doc]]:
        svc = self.services[name]
        used: list[Doc] = [svc.doc]
        named = self.idx.sources.get(name, {})
        dests = (
            self.destinations
            if "*" in named
            else sorted(d for d in named if d in self.services and not self.services[d].gateway)
        )
        gw = self.gateways.get(name)
        if gw is not None:
            used.extend(gw.docs)
        inbound = self.inbound(name, used) if not svc.gateway else _EMPTY_INBOUND
        outbound = json_object((d, self.destination(name, d, used)) for d in dests)
        gateway = canon(gw.conf.model_dump(mode="json")) if gw is not None else "null"
        text = (
            f'{{"format":{b.BUNDLE_FORMAT},"gateway":{gateway},"inbound":{inbound},'
            f'"mesh":{canon(self.mesh.name)},"outbound":{outbound},"service":{canon(name)},"type":"service"}}'
        )
        return text.encode(), used

    def build(self, key: str) -> tuple[bytes, list[Doc]]:
        if key == self.mesh.name:
            return self.mesh_bundle()
        return self.service_bundle(key[len(self.mesh.name) + 1 :])


_CATALOG_CACHE: dict[tuple[Any, ...], str] = {}


def _catalog_json(s: ServiceInfo) -> str:
    key = (s.port, s.protocol, tuple(tuple(sorted(x.items())) for x in s.subsets), s.gateway)
    out = _CATALOG_CACHE.get(key)
    if out is None:
        model = b.CatalogService(
            port=s.port,
            protocol=s.protocol,
            subsets=tuple(s.subsets),
            gateway=s.gateway,
        )
        out = canon(model.model_dump(mode="json"))
        if len(_CATALOG_CACHE) > 100_000:
            _CATALOG_CACHE.clear()
        _CATALOG_CACHE[key] = out
    return out


def build_mesh(
    mesh: MeshInfo,
    idx: PolicyIndex,
    gateways: list[GatewayBuild],
    logging: tuple[b.LoggingBackend, ...],
    on_bundle: Callable[[str, bytes, list[Doc]], None],
) -> None:
    """Build every bundle of one mesh, handing each to ``on_bundle(key, bytes, docs)``."""
    bld = MeshBuilder(mesh, idx, gateways, logging)
    for key in bld.bundle_keys():
        data, used = bld.build(key)
        on_bundle(key, data, used)
