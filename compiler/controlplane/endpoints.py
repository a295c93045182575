"""Endpoint sets (Envoy's EDS, kept out of bundles): per mesh from the registry, per data plane
by scope, pushed as deltas.

Every Online sidecar with an inbound address serves its service: one ``Endpoint`` with its tags.
``MeshEndpoints`` is one mesh's set at one moment, content-addressed per service (a service's
digest is reused while its list is unchanged), so what a membership change changed is known
without comparing whole sets.

What a data plane is sent (``EndpointPlans``):

* registered without ``endpoint_deltas`` (older data planes, stubs) or without ``pieces``: the
  whole mesh's set, every time (the body they always got; its digest ``endpoints_digest``);
* a gateway: every service, as a delta over the set it ACKed last;
* a sidecar: the services in its scope only (``scoped``: the pusher's mesh-slot scope, the
  destinations its service bundle names and their split targets, its ``reachable_services``,
  plus those it asked for on demand), as a delta over the set it ACKed last. A request to
  another destination makes it ask (``PieceRequest.endpoints``): they join its scope and the
  answer waits for the ACK of the push that carries them.

So an instance that comes or goes re-sends one service's list, to the data planes whose scope
holds it. A delta names the set it applies to (``base``, the ACKed digest); a data plane that
runs another one answers 422 and gets the whole set.

What a control plane that never pushed to it (another replica after a failover, a restart)
knows of a data plane comes from the data plane, as Envoy's delta xDS client re-sends its
subscriptions and ``initial_resource_versions`` on a new stream: the services it fetched on
demand (``endpoints_on_demand``, every registration and heartbeat) join its scope, and a delta
goes over a set only once its per-service digests are known to make the digest it reports
running: the whole set in its registration (``adopt``), or the set this control plane would
send it now, when its digest is the running one (``rebuild``, after a restart). Otherwise the
next push is whole; a delta is never sent over a set the data plane did not ACK or report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from compiler.controlplane.registry import DataPlane, Registry
from runtime.protocol import (
    Endpoint,
    EndpointSet,
    endpoint_set_digest,
    endpoints_digest,
    service_endpoints_digest,
)

__all__ = [
    "ON_DEMAND_WAIT_S",
    "EndpointPlans",
    "MeshEndpoints",
    "Scope",
    "endpoint_services",
    "endpoints_digest",
]

ON_DEMAND_WAIT_S = 4.0
"""How long an on-demand endpoints request waits for the ACK of the push that carries them:
under the data plane's own wait (``runtime.decide.FETCH_TIMEOUT_S``, 5 s), so it hears why."""

_LIST: TypeAdapter[list[Endpoint]] = TypeAdapter(list[Endpoint])
_SERVICES: TypeAdapter[dict[str, list[Endpoint]]] = TypeAdapter(dict[str, list[Endpoint]])
_EMPTY: tuple[Endpoint, ...] = ()

Scope = frozenset[str] | None
"""The services a data plane holds endpoints of; None: every one (unscoped)."""


def endpoint_services(registry: Registry, mesh: str) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for dp in registry.in_mesh(mesh):
        if dp.kind != "sidecar" or not dp.inbound_address or not dp.online:
            continue
        out.setdefault(dp.service, []).append(Endpoint(address=dp.inbound_address, tags=dict(dp.tags)))
    for eps in out.values():
        eps.sort(key=lambda e: e.address)
    return dict(sorted(out.items()))


class MeshEndpoints:
    """One mesh's endpoint set, with each service's digest and JSON made once per change."""

    def __init__(self, services: dict[str, list[Endpoint]], before: MeshEndpoints | None = None) -> None:
        self.services = services
        self.digests: dict[str, str] = {}
        self._json: dict[str, bytes] = {}
        self.changed: set[str] = set()
        """Services whose list differs from ``before`` (added and removed ones included)."""
        prev = before.services if before is not None else {}
        for name, eps in services.items():
            if before is not None and prev.get(name) == eps:
                self.digests[name] = before.digests[name]
                found = before._json.get(name)
                if found is not None:
                    self._json[name] = found
            else:
                self.digests[name] = service_endpoints_digest(name, eps)
                self.changed.add(name)
        self.changed.update(n for n in prev if n not in services)
        self._legacy: tuple[str, bytes] | None = None
        self._selections: dict[Scope, tuple[dict[str, str], str]] = {}
        self._empty = service_endpoints_digest("", ())

    @property
    def legacy_digest(self) -> str:
        """``endpoints_digest`` of the whole set: what data planes without deltas run."""
        return self._legacy_form()[0]

    def legacy_body(self, generation: int) -> bytes:
        """``EndpointSet(generation=..., services=...).model_dump_json()`` of the whole set, from
        the services serialized once (1,000 data planes get the same set)."""
        return b'{"generation":%d,"services":%s}' % (generation, self._legacy_form()[1])

    def _legacy_form(self) -> tuple[str, bytes]:
        if self._legacy is None:
            self._legacy = (endpoints_digest(self.services), _SERVICES.dump_json(self.services))
        return self._legacy

    def digest_of(self, name: str) -> str:
        found = self.digests.get(name)
        return found if found is not None else service_endpoints_digest(name, _EMPTY)

    def list_json(self, name: str) -> bytes:
        found = self._json.get(name)
        if found is None:
            found = self._json[name] = _LIST.dump_json(self.services.get(name, []))
        return found

    def selection(self, scope: Scope) -> tuple[dict[str, str], str]:
        """(service -> digest, the set's digest) of what a data plane with ``scope`` holds;
        cached per scope (the 10 sidecars of one service share theirs)."""
        found = self._selections.get(scope)
        if found is None:
            picked = dict(self.digests) if scope is None else {n: self.digest_of(n) for n in sorted(scope)}
            found = self._selections[scope] = (picked, endpoint_set_digest(picked, scope is not None))
            if len(self._selections) > 4096:
                self._selections.clear()
                self._selections[scope] = found
        return found


@dataclass
class _View:
    """What the control plane knows of one data plane's per-service endpoints."""

    extra: set[str] = field(default_factory=set)
    """Services it asked for on demand: kept in its scope while the instance is known."""
    held: dict[str, str] | None = None
    """Service -> digest of the set it ACKed last (the base of the next delta)."""
    held_digest: str | None = None
    waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = field(default_factory=list)


class EndpointPlans:
    """Per data plane: which endpoints it gets (scope), the body of its next push, and on-demand
    requests waiting for an ACK. The pusher owns the pushing."""

    def __init__(self) -> None:
        self._views: dict[str, _View] = {}

    def _view(self, instance: str) -> _View:
        view = self._views.get(instance)
        if view is None:
            view = self._views[instance] = _View()
        return view

    @staticmethod
    def per_service(dp: DataPlane) -> bool:
        return dp.endpoint_deltas and dp.pieces

    def scope(self, dp: DataPlane, mesh_scope: Collection[str] | None) -> Scope:
        """The services ``dp`` holds endpoints of: ``mesh_scope`` (the pusher's, None for a
        gateway) and what it asked for on demand."""
        if mesh_scope is None:
            return None
        view = self._views.get(dp.instance)
        return frozenset(mesh_scope) | frozenset(view.extra if view is not None else ())

    def desired(self, dp: DataPlane, eps: MeshEndpoints, scope: Scope) -> str:
        if not self.per_service(dp):
            return eps.legacy_digest
        return eps.selection(scope)[1]

    def body(
        self, dp: DataPlane, eps: MeshEndpoints, scope: Scope, generation: int, acked: str | None
    ) -> tuple[bytes, dict[str, str] | None]:
        """The push body, and (per-service data planes) the set it makes, for ``acked``."""
        if not self.per_service(dp):
            return eps.legacy_body(generation), None
        picked, digest = eps.selection(scope)
        view = self._view(dp.instance)
        head = b'"digest":"%s","generation":%d,"scoped":%s' % (
            digest.encode(),
            generation,
            b"true" if scope is not None else b"false",
        )
        held = view.held if acked is not None and view.held_digest == acked else None
        if held is None:
            names = list(picked)
        else:
            names = [n for n, d in picked.items() if held.get(n) != d]
            removed = [n for n in held if n not in picked]
            head += b',"base":"%s"' % acked.encode()  # type: ignore[union-attr]
            if removed:
                head += b',"removed":' + json.dumps(removed).encode()
        services = b",".join(json.dumps(n).encode() + b":" + eps.list_json(n) for n in names)
        return b"{" + head + b',"services":{' + services + b"}}", picked

    def acked(self, dp: DataPlane, picked: dict[str, str] | None, digest: str) -> None:
        """``dp`` ACKed the push that made ``picked``: the next delta goes over it."""
        if picked is None:
            return
        view = self._view(dp.instance)
        view.held, view.held_digest = picked, digest
        still = []
        for names, fut in view.waiters:
            if names <= picked.keys():
                if not fut.done():
                    fut.set_result(None)
            elif not fut.done():
                still.append((names, fut))
        view.waiters = still

    def unbased(self, dp: DataPlane) -> None:
        """It does not run the set believed (a 422, a restart): the next push is whole."""
        view = self._views.get(dp.instance)
        if view is not None:
            view.held = view.held_digest = None

    def extend(self, dp: DataPlane, names: Collection[str]) -> bool:
        """Add ``names`` to what ``dp`` gets (on demand); True when its scope grew."""
        if not self.per_service(dp) or dp.kind == "gateway":
            return False
        view = self._view(dp.instance)
        new = set(names) - view.extra
        view.extra |= new
        return bool(new)

    def holds(self, dp: DataPlane, names: Collection[str]) -> bool:
        view = self._views.get(dp.instance)
        if not self.per_service(dp) or dp.kind == "gateway":
            return True  # it holds every service already
        return view is not None and view.held is not None and set(names) <= view.held.keys()

    async def wait(self, dp: DataPlane, names: Collection[str], timeout_s: float) -> bool:
        """Until ``dp`` ACKed a set holding ``names`` (True) or ``timeout_s`` passed."""
        if self.holds(dp, names):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (frozenset(names), fut)
        view = self._view(dp.instance)
        view.waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                view.waiters.remove(entry)

    def registered(self, dp: DataPlane) -> None:
        """A new boot of ``dp``: what it holds is unknown (its scope's extras stay, and those
        it declares join them)."""
        self.unbased(dp)
        self.extend(dp, dp.on_demand)

    def based_on(self, dp: DataPlane, digest: str) -> bool:
        """Whether the next delta to ``dp`` can go over ``digest`` (its per-service digests known)."""
        view = self._views.get(dp.instance)
        return view is not None and view.held is not None and view.held_digest == digest

    def adopt(self, dp: DataPlane, running: EndpointSet) -> str | None:
        """``dp`` reported the whole set it runs (its registration): the base of the next delta
        when its services make the digest it names; that digest, or None."""
        if not self.per_service(dp) or running.digest is None or running.base is not None:
            return None
        digests = {n: service_endpoints_digest(n, lst) for n, lst in running.services.items()}
        if endpoint_set_digest(digests, running.scoped) != running.digest:
            return None
        self.acked(dp, digests, running.digest)
        return running.digest

    def rebuild(self, dp: DataPlane, eps: MeshEndpoints, scope: Scope, running: str) -> bool:
        """``dp`` reports running ``running`` and its per-service digests are unknown (this
        control plane restarted): when the set it would get now has that digest, it is that set
        (the digest covers every service's), so the next delta can go over it."""
        if not self.per_service(dp) or self.based_on(dp, running):
            return False
        picked, digest = eps.selection(scope)
        if digest != running:
            return False
        self.acked(dp, picked, digest)
        return True

    def forget(self, instance: str) -> None:
        view = self._views.pop(instance, None)
        if view is not None:
            for _, fut in view.waiters:
                if not fut.done():
                    fut.cancel()

    def held_for(self, instance: str) -> Mapping[str, str] | None:
        view = self._views.get(instance)
        return view.held if view is not None else None
