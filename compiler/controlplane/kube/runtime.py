"""``meshc controlplane --kubernetes``: discovery, identity and the leader wired into a control plane.

Endpoints pushed to data planes come from ``KubeEndpoints`` instead of the registry; a bootstrap
with a projected service-account token (a JWT) is checked by ``TokenReviewer``; meshc bootstrap
tokens and certificates keep working as before. ``LeaseElector`` runs beside, so ``leader`` tells
which replica does the singleton work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any

from compiler.controlplane.kube.client import api_client
from compiler.controlplane.kube.discovery import KubeEndpoints
from compiler.controlplane.kube.identity import PodIdentity, TokenReviewer
from compiler.controlplane.kube.leader import LeaseElector
from runtime.protocol import Endpoint, Registration

if TYPE_CHECKING:
    from kubernetes_asyncio import client

    from compiler.controlplane.server import ControlPlane

__all__ = ["IN_CLUSTER", "KubeControlPlane", "is_service_account_token"]

IN_CLUSTER = "in-cluster"
LEASE_NAME = "meshc-control-plane-leader"


def is_service_account_token(token: str) -> bool:
    """A Kubernetes token is a JWT (three base64url parts, a JSON header); meshc's are not."""
    return token.startswith("eyJ") and token.count(".") == 2


class KubeControlPlane:
    def __init__(self, api: client.ApiClient, cp: ControlPlane, *, watch_timeout_s: int = 300) -> None:
        self.api = api
        self.endpoints = KubeEndpoints(api, cp.pusher.endpoints_changed, watch_timeout_s=watch_timeout_s)
        self.reviewer = TokenReviewer(api, self._services)
        namespace = os.environ.get("MESHC_POD_NAMESPACE", "meshc-system")
        identity = os.environ.get("MESHC_POD_NAME") or socket.gethostname()
        self.elector = LeaseElector(api, namespace, LEASE_NAME, identity)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls, cp: ControlPlane, where: str, token: str | None = None, **kw: Any
    ) -> KubeControlPlane:
        api = await api_client(None if where == IN_CLUSTER else where, token)
        self = cls(api, cp, **kw)
        self.endpoints.start()
        await self.endpoints.synced()
        cp.pusher.endpoint_source = self.endpoints.endpoint_services
        cp.pusher.endpoints_changed()
        self._tasks.append(asyncio.create_task(self.elector.run()))
        return self

    def _services(self, namespace: str) -> list[dict[str, Any]]:
        return [s for (ns, _), s in self.endpoints.services.items.items() if ns == namespace]

    is_service_account_token = staticmethod(is_service_account_token)

    @property
    def leader(self) -> bool:
        return self.elector.leader

    def endpoint_services(self, mesh: str) -> dict[str, list[Endpoint]]:
        return self.endpoints.endpoint_services(mesh)

    async def authorize(self, token: str, reg: Registration) -> PodIdentity:
        return await self.reviewer.authorize(token, reg)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.endpoints.stop()
        await self.api.close()
