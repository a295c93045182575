"""One leader among the control plane replicas, by a ``coordination.k8s.io/v1`` Lease.

client-go's algorithm: read the Lease; create it when absent; take it when it is ours or its
holder has not renewed for ``lease_duration_s`` as *we* observed it (our own monotonic clock, so
clock skew between nodes does not matter); write with the resourceVersion we read, so of two
replicas racing, the API server accepts one and answers 409 Conflict to the other. Every replica
serves sidecars; only the leader does the singleton work.

It is an ``Elector`` (``compiler.controlplane.store.base``): its fencing token is the Lease's
``leaseTransitions`` as of our last successful write (it grows with every change of holder). The
API server does not check it on other writes; with ``--store postgres://`` the PostgreSQL lock
row is the elector, and the database checks the token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

__all__ = ["LeaseElector"]

log = logging.getLogger("meshc.kube")


class LeaseElector:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: int = 15,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s = lease_duration_s
        self.retry_s = retry_s
        self._clock = clock
        self._observed: tuple[str | None, str | None] | None = None
        """(holder, renewTime) of the last record read, and when we saw it change."""
        self._observed_at = 0.0
        self.leader = False
        self.conflicts = 0
        self._token: int | None = None

    @property
    def fencing_token(self) -> int | None:
        return self._token if self.leader else None

    async def release(self) -> None:
        """A clean stop does not hand the Lease over early: the next holder waits for expiry."""
        self._set(False)

    def _now_micro(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def try_acquire_or_renew(self) -> bool:
        """One round; whether we hold the Lease after it."""
        now = self._now_micro()
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_duration_s,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                await self._api.create_namespaced_lease(self.namespace, body)
            except ApiException as e2:
                if e2.status != 409:
                    raise
                self.conflicts += 1
                return self._set(False)
            self._token = 0
            return self._set(True)
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity, str(spec.renew_time))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        duration = spec.lease_duration_seconds or self.lease_duration_s
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and self._observed_at + duration > self._clock():
            return self._set(False)
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_duration_s
        lease.spec = spec
        try:
            await self._api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            if e.status != 409:
                raise
            self.conflicts += 1  # another replica wrote first: it leads this round
            return self._set(False)
        self._token = spec.lease_transitions or 0
        return self._set(True)

    def _set(self, leader: bool) -> bool:
        if leader != self.leader:
            log.info(
                "%s %s the lease %s/%s",
                self.identity,
                "holds" if leader else "lost",
                self.namespace,
                self.name,
            )
        self.leader = leader
        return leader

    async def run(self) -> None:
        """Renew (or try to take) the Lease every ``retry_s`` until cancelled."""
        while True:
            try:
                await self.try_acquire_or_renew()
            except (TimeoutError, ApiException, OSError) as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                self._set(False)
            await asyncio.sleep(self.retry_s)
