"""The endpoint set of a mesh, derived from the registry (Envoy's EDS, kept out of bundles).

Every Online sidecar with an inbound address serves its service: one ``Endpoint`` with its tags.
Every data plane of the mesh gets the endpoints of all the mesh's services (the simplest correct
choice: a data plane only uses those it routes to). The content hash tells when a set changed.
"""

from __future__ import annotations

from compiler.controlplane.registry import Registry
from runtime.protocol import Endpoint, endpoints_digest

__all__ = ["endpoint_services", "endpoints_digest"]


def endpoint_services(registry: Registry, mesh: str) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for dp in registry.in_mesh(mesh):
        if dp.kind != "sidecar" or not dp.inbound_address or not dp.online:
            continue
        out.setdefault(dp.service, []).append(Endpoint(address=dp.inbound_address, tags=dict(dp.tags)))
    for eps in out.values():
        eps.sort(key=lambda e: e.address)
    return dict(sorted(out.items()))
