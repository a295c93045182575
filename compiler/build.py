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

from pydantic import BaseModel

from compiler.catalog import MeshInfo, ServiceInfo
from compiler.gateway import GatewayBuild
from compiler.kinds import REGISTRY, KindDef
from compiler.kinds.mesh import mesh_settings, tracing_backend
from compiler.parse import Doc
from compiler.resolve import TARGETREF_INBOUND, Entry, PolicyIndex
from runtime import bundle as b

__all__ = ["Built", "MeshBuilder", "MeshParts", "build_mesh", "canon", "json_key", "json_object"]

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


def _fields(direction: str) -> tuple[KindDef, ...]:
    """The compiled kinds of one direction in the order of their bundle fields (the JSON key order)."""
    kinds = [d for d in REGISTRY.values() if d.indexed and d.direction == direction]
    return tuple(sorted(kinds, key=lambda d: d.bundle_field or ""))


_OUTBOUND = _fields("outbound")
_INBOUND = _fields("inbound")


def _default_rule(conf: BaseModel) -> str:
    return canon({"when": {}, "peer": {}, "conf": conf.model_dump(mode="json")})


_CONST_DEFAULTS = {d.kind: _default_rule(d.default) for d in _OUTBOUND if isinstance(d.default, BaseModel)}
"""The closing rule of kinds whose default does not depend on the destination, serialized once."""
_EMPTY_INBOUND = canon(b.Inbound().model_dump(mode="json"))


def _rules(entries: list[Entry], default: str | None = None) -> str:
    """An ordered rule list; ``default`` (a serialized unconditional rule) closes it when needed."""
    parts = [e.rule_json for e in entries]
    if default is not None and (not entries or entries[-1].when or entries[-1].peer):
        parts.append(default)
    return "[" + ",".join(parts) + "]"


def _used(used: list[Doc], entries: list[Entry]) -> None:
    """The documents behind these entries, for provenance (a merged targetRef rule has several)."""
    used.extend([e.doc for e in entries])
    for e in entries:
        if e.also:
            used.extend(e.also)


def _additive(entries: list[Entry]) -> str:
    """Rules that add up: one per distinct (when, peer), in that order."""
    seen: set[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = set()
    parts = []
    for e in sorted(entries, key=lambda e: (e.when, e.peer)):
        if (e.when, e.peer) not in seen:
            seen.add((e.when, e.peer))
            parts.append(e.rule_json)
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
        self._defaults: dict[tuple[str, str], str] = {}

    def bundle_keys(self) -> list[str]:
        """The bundle keys of this mesh: the mesh, then each service and gateway."""
        return [self.mesh.name, *(f"{self.mesh.name}/{n}" for n in self.services)]

    def _default(self, kdef: KindDef, dst: str) -> str | None:
        """The serialized unconditional rule closing ``dst``'s list of ``kdef``, if it has one."""
        const = _CONST_DEFAULTS.get(kdef.kind)
        if const is not None or kdef.default is None or isinstance(kdef.default, BaseModel):
            return const
        s = self._defaults.get((kdef.kind, dst))
        if s is None:
            s = self._defaults[(kdef.kind, dst)] = _default_rule(kdef.default(dst))
        return s

    def destination(self, src: str, dst: str, used: list[Doc]) -> str:
        idx = self.idx
        keys = [(src, dst), (src, "*"), ("*", dst), ("*", "*")] if src != "*" else [("*", dst), ("*", "*")]
        parts = []
        for kdef in _OUTBOUND:
            kind = kdef.kind
            entries = idx.ranked(kind, idx.entries(kind, keys)) if kind in idx.by_kind else []
            _used(used, entries)
            parts.append(f'"{kdef.bundle_field}":{_rules(entries, self._default(kdef, dst))}')
        return "{" + ",".join(parts) + "}"

    def inbound(self, service: str, used: list[Doc]) -> str:
        parts = []
        for kdef in _INBOUND:
            table = self.idx.by_dst.get(kdef.kind, {})
            entries = [*table.get(service, ()), *table.get("*", ())]
            _used(used, entries)
            rules = _additive(entries) if kdef.additive else _rules(self.idx.ranked(kdef.kind, entries))
            parts.append((kdef.bundle_field or "", rules))
        for field_name, kind in TARGETREF_INBOUND.items():
            table = self.idx.by_dst.get(kind, {})
            entries = [*table.get(service, ()), *table.get("*", ())]
            if not entries:
                continue  # left out while empty, as ``runtime.bundle.Inbound`` serializes it
            _used(used, entries)
            if field_name == "traffic_log":  # every matching rule logs: all of them, in a fixed order
                rules = "[" + ",".join(sorted(e.rule_json for e in entries)) + "]"
            else:
                rules = _rules(self.idx.ranked(kind, entries))
            parts.append((field_name, rules))
        return json_object(parts)

    def mesh_bundle(self) -> tuple[bytes, list[Doc]]:
        parts = self.mesh_parts()
        return parts.data(), parts.used()

    def mesh_parts(self, prev: MeshParts | None = None, dirty: Iterable[str] | None = None) -> MeshParts:
        """The mesh bundle as parts. With ``prev`` (this builder's last parts) only the ``dirty``
        destinations are rendered again (None: every one); the catalog is kept as it was."""
        mesh = self.mesh
        mtls, passthrough = mesh_settings(mesh.doc.spec if mesh.doc else None)
        base: list[Doc] = [mesh.doc] if mesh.doc else []
        base.extend(s.doc for s in self.services.values())
        if prev is None:
            services = {n: _catalog_json(s) for n, s in self.services.items()}
            destinations: dict[str, str] = {}
            dest_used: dict[str, list[Doc]] = {}
            conflicts: dict[str, dict[frozenset[int], tuple[Entry, Entry]]] = {}
            todo: Iterable[str] = self.destinations
        else:
            services, destinations, dest_used = prev.services, prev.destinations, prev.dest_used
            conflicts = prev.conflicts
            todo = self.destinations if dirty is None else sorted(d for d in dirty if d in destinations)
        outer = self.idx.conflicts  # what a whole build accumulates, first conflict found kept
        try:
            for d in todo:
                used: list[Doc] = []
                self.idx.conflicts = {}
                destinations[d] = self.destination("*", d, used)
                dest_used[d] = used
                if self.idx.conflicts:
                    conflicts[d] = self.idx.conflicts
                    for k, v in self.idx.conflicts.items():
                        outer.setdefault(k, v)
                else:
                    conflicts.pop(d, None)
        finally:
            self.idx.conflicts = outer
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
        resolved = self.idx.tracing
        tail: list[Doc] = []
        if resolved is not None:
            tracing = resolved.mesh
            tail.extend(resolved.mesh_docs)
        else:
            tracing = tracing_backend(mesh.doc.spec if mesh.doc else None)
        trace = canon(tracing.model_dump(mode="json")) if tracing is not None else "null"
        # {"destinations":…, <head's keys, all sorting between "destinations" and "services">,
        #  "services":…, "type":"mesh"}: keys stay sorted.
        return MeshParts(
            head[1 : -len(',"type":"mesh"}')], services, destinations, trace, base, dest_used, tail, conflicts
        )

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
        traced = self.idx.tracing.services.get(name) if self.idx.tracing is not None else None
        tracing = ""  # left out unless set (ServiceBundle._OPTIONAL): the bytes older data planes take
        if traced is not None:
            tracing = f'"tracing":{canon(traced[0].model_dump(mode="json"))},'
            used.extend(traced[1])
        text = (
            f'{{"format":{b.BUNDLE_FORMAT},"gateway":{gateway},"inbound":{inbound},'
            f'"mesh":{canon(self.mesh.name)},"outbound":{outbound},"service":{canon(name)},'
            f'{tracing}"type":"service"}}'
        )
        return text.encode(), used

    def build(self, key: str) -> tuple[bytes, list[Doc]]:
        if key == self.mesh.name:
            return self.mesh_bundle()
        return self.service_bundle(key[len(self.mesh.name) + 1 :])


@dataclass
class MeshParts:
    """A mesh bundle in parts (canonical JSON fragments): what the incremental compiler keeps to
    re-render only the destinations a change reaches, and what the control plane re-splits into
    pieces (``compiler.controlplane.pieces``) without parsing the bundle again."""

    head: str
    """The canonical items between ``destinations`` and ``services`` (no braces)."""
    services: dict[str, str]
    """Service -> its catalog entry (sorted by name)."""
    destinations: dict[str, str]
    """Destination -> its default outbound config (in ``MeshBuilder.destinations`` order once
    built whole; re-rendered entries keep their place)."""
    tracing: str
    base_used: list[Doc]
    dest_used: dict[str, list[Doc]]
    tail_used: list[Doc]
    conflicts: dict[str, dict[frozenset[int], tuple[Entry, Entry]]] = field(default_factory=dict)
    """Destination -> the conflicts rendering it found (only those with some)."""

    def all_conflicts(self) -> dict[frozenset[int], tuple[Entry, Entry]]:
        """The conflicts of the whole bundle, as a whole build records them (first one kept)."""
        out: dict[frozenset[int], tuple[Entry, Entry]] = {}
        found = self.conflicts
        for d in self.destinations:
            if d in found:
                for k, v in found[d].items():
                    out.setdefault(k, v)
        return out

    def data(self) -> bytes:
        # Both dicts are in name order (built from the sorted services; re-rendered entries keep
        # their place), which is the order ``canon`` sorts keys in.
        destinations = "{" + ",".join([f"{json_key(k)}:{v}" for k, v in self.destinations.items()]) + "}"
        services = "{" + ",".join([f"{json_key(k)}:{v}" for k, v in self.services.items()]) + "}"
        return (
            f'{{"destinations":{destinations},{self.head},"services":{services},'
            f'"tracing":{self.tracing},"type":"mesh"}}'
        ).encode()

    def used(self) -> list[Doc]:
        """The documents that shaped the bundle, in the order a whole build finds them."""
        out = list(self.base_used)
        for used in self.dest_used.values():
            out.extend(used)
        out.extend(self.tail_used)
        return out


_KEYS: dict[str, str] = {}


def json_key(name: str) -> str:
    """``canon(name)``, remembered (a mesh bundle names every service twice per build)."""
    out = _KEYS.get(name)
    if out is None:
        if len(_KEYS) > 200_000:
            _KEYS.clear()
        out = _KEYS[name] = canon(name)
    return out


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
