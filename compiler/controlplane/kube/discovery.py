"""Endpoints from EndpointSlices: the Kubernetes source of what self-registration tells otherwise.

``KubeEndpoints.endpoint_services(mesh)`` has the shape of ``endpoints.endpoint_services``: mesh
service (Kuma's ``<name>_<namespace>_svc_<port>``) -> its instances. An instance is a meshed Pod
(it runs the meshc sidecar) that an EndpointSlice of the Service lists; its address is the pod IP
at the sidecar's inbound port, its tags the pod's labels, healthy as the slice's ``ready``
condition says. EndpointSlices, Pods and Services are each list+watched (``ListWatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client

from compiler.controlplane.kube.listwatch import ListWatch
from compiler.kube.derive import MESH_KEY, service_name
from compiler.kube.inject import INBOUND_PORT, SIDECAR
from runtime.protocol import Endpoint

__all__ = ["KubeEndpoints", "slice_endpoints"]

SERVICE_LABEL = "kubernetes.io/service-name"
_RESERVED = {"kuma.io/service", "kuma.io/protocol"}


def _meshed(pod: dict[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return any(
        c.get("name") == SIDECAR
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    )


def _mesh(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(
        (meta.get("labels") or {}).get(MESH_KEY) or (meta.get("annotations") or {}).get(MESH_KEY) or "default"
    )


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def slice_endpoints(
    slices: dict[tuple[str, str], dict[str, Any]],
    pods: dict[tuple[str, str], dict[str, Any]],
    services: dict[tuple[str, str], dict[str, Any]],
    mesh: str,
) -> dict[str, list[Endpoint]]:
    """The endpoint set of one mesh from the three caches (a pure function)."""
    out: dict[str, dict[str, Endpoint]] = {}
    for (ns, _), sl in slices.items():
        svc_name = ((sl.get("metadata") or {}).get("labels") or {}).get(SERVICE_LABEL)
        svc = services.get((ns, svc_name or ""))
        if svc is None:
            continue
        ports = (svc.get("spec") or {}).get("ports") or []
        names = []
        for sp in sl.get("ports") or []:
            for p in ports:
                if (p.get("name") or "") == (sp.get("name") or "") and p.get("protocol", "TCP") != "UDP":
                    names.append(service_name(svc_name or "", ns, int(p["port"])))
        for ep in sl.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            pod = (
                pods.get((ref.get("namespace") or ns, ref.get("name") or ""))
                if ref.get("kind") == "Pod"
                else None
            )
            if pod is None or not _meshed(pod) or _mesh(pod) != mesh or not ep.get("addresses"):
                continue
            labels = (pod.get("metadata") or {}).get("labels") or {}
            tags = {k: str(v) for k, v in sorted(labels.items()) if k not in _RESERVED}
            ready = (ep.get("conditions") or {}).get("ready")
            e = Endpoint(
                address=_address(ep["addresses"][0], INBOUND_PORT), tags=tags, healthy=ready is not False
            )
            for name in names:
                out.setdefault(name, {})[e.address] = e
    return {name: [eps[a] for a in sorted(eps)] for name, eps in sorted(out.items())}


class KubeEndpoints:
    """The three caches, kept current; ``on_change`` runs after every change (push the new set)."""

    def __init__(
        self, api: client.ApiClient, on_change: Callable[[], None] = lambda: None, **kw: Any
    ) -> None:
        core, disco = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        self.slices = ListWatch(disco.list_endpoint_slice_for_all_namespaces, on_change, **kw)
        self.pods = ListWatch(core.list_pod_for_all_namespaces, on_change, **kw)
        self.services = ListWatch(core.list_service_for_all_namespaces, on_change, **kw)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(w.run()) for w in (self.services, self.pods, self.slices)]

    async def synced(self) -> None:
        for w in (self.services, self.pods, self.slices):
            await w.synced.wait()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    def endpoint_services(self, mesh: str) -> dict[str, list[Endpoint]]:
        return slice_endpoints(self.slices.items, self.pods.items, self.services.items, mesh)
