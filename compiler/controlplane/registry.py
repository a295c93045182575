"""The data planes that registered: identity, addresses, heartbeats, Online/Offline.

A data plane is Online from its registration until it misses ``missed`` heartbeats in a row, and
Online again at its next heartbeat. A clean exit deregisters it, which removes it. Every change
goes to the ``Store`` (``compiler.controlplane.store``), so a restarted control plane still knows
every instance and keeps pushing the same endpoints instead of an empty set; restored instances
get a grace period to heartbeat again before they count as Offline.

With replicas, the registry also holds the data planes of the other replicas (``replica`` names
the one a data plane talks to): their endpoints count, but only their own replica takes their
heartbeats and pushes to them. Their changes arrive from the store (``merge``) as ``peer`` events.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.protocol import Heartbeat, Registration

if TYPE_CHECKING:
    from compiler.controlplane.store.base import Store

__all__ = ["DataPlane", "Registry"]


@dataclass
class DataPlane:
    instance: str
    service: str
    mesh: str
    kind: str
    tags: dict[str, str]
    inbound_address: str | None
    admin_address: str
    registered_at: float
    last_seen: float
    online: bool = True
    restored: bool = False
    """Loaded from the state directory after a restart; cleared by its first heartbeat."""
    boot_id: str | None = None
    """The data plane process's boot id (registration): every push to it is signed for it."""
    running: dict[str, str] = field(default_factory=dict)
    """slot (endpoints|mesh|service) -> digest, as its last heartbeat reported."""
    generations: dict[str, int] = field(default_factory=dict)
    """slot -> generation of what it runs, as its last heartbeat reported."""
    endpoints_generation: int | None = None
    """As its last heartbeat reported; None before the first heartbeat."""
    heartbeats: int = 0
    pieces: bool = False
    """It takes its mesh slot as a manifest and pieces (registration)."""
    reachable: tuple[str, ...] | None = None
    """Kuma's reachableServices, as registered."""
    endpoint_deltas: bool = False
    """It takes endpoints per service, scoped and as deltas (registration; ``endpoints``)."""
    on_demand: tuple[str, ...] = ()
    """The services it says it fetched on demand (its last registration or heartbeat): kept in
    its endpoint scope. Not stored: it says so again."""
    pieces_formats: tuple[int, ...] | None = None
    """The mesh manifest formats it runs, as registered; None: it declared none (format 1 only)."""
    replica: str = ""
    """The control plane replica this data plane registered with (and heartbeats to)."""
    observed_at: float = 0.0
    """Another replica's data plane: when (our clock) we last saw its row move."""

    def as_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "service": self.service,
            "mesh": self.mesh,
            "kind": self.kind,
            "tags": self.tags,
            "inbound_address": self.inbound_address,
            "admin_address": self.admin_address,
            "registered_at": self.registered_at,
            "last_seen": self.last_seen,
            "online": self.online,
            "running": self.running,
            "generations": self.generations,
            "endpoints_generation": self.endpoints_generation,
            "pieces": self.pieces,
            "reachable_services": list(self.reachable) if self.reachable is not None else None,
            "endpoint_deltas": self.endpoint_deltas,
            "pieces_formats": list(self.pieces_formats) if self.pieces_formats is not None else None,
            "replica": self.replica,
        }


Listener = Callable[[str, DataPlane], None]
"""Called with an event (``registered``, ``online``, ``offline``, ``deregistered``, ``heartbeat``; ``peer``
when a data plane of another replica appeared, changed, moved there from this one, or went)."""


def _instance_name(reg: Registration) -> str:
    host, _, port = reg.admin_address.rpartition(":")
    if host in ("127.0.0.1", "localhost", "::1", "[::1]") and port.isdigit():
        return f"{reg.service}-{port}"
    h = hashlib.sha256(f"{reg.mesh}\0{reg.service}\0{reg.admin_address}".encode()).hexdigest()
    return f"{reg.service}-{h[:8]}"


class Registry:
    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        missed: int = 3,
        store: Store | None = None,
        restore_grace_s: float = 35.0,
        replica: str = "",
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed = missed
        self.dataplanes: dict[str, DataPlane] = {}
        self._listeners: list[Listener] = []
        self._store = store
        self._restore_grace_s = restore_grace_s
        self.replica = store.replica if store is not None else replica
        self.restored = 0
        self.peers_seen_at: float | None = None
        """When the store last told us of every peer (``merge_all``): a peer's data plane ages
        against that, so a store that is down makes no peer Offline (and drops no endpoints)."""

    def restore(self, dps: list[DataPlane]) -> int:
        """Load what the store kept: this replica's data planes are restored (a grace period to
        heartbeat again), the other replicas' are peers."""
        now = time.time()
        for dp in dps:
            dp.observed_at = now
            if dp.replica in ("", self.replica):
                dp.replica, dp.restored, dp.last_seen, dp.online = self.replica, True, now, True
                self.restored += 1
            self.dataplanes[dp.instance] = dp
        return self.restored

    def local(self, dp: DataPlane) -> bool:
        return dp.replica == self.replica

    # --- events -----------------------------------------------------------------------------

    def subscribe(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _emit(self, event: str, dp: DataPlane) -> None:
        for fn in self._listeners:
            fn(event, dp)

    def _save(self, dp: DataPlane, membership: bool = True) -> None:
        if self._store is not None:
            self._store.save_dataplane(dp, membership=membership)

    # --- protocol -----------------------------------------------------------------------------

    def register(self, reg: Registration) -> DataPlane:
        name = reg.instance or _instance_name(reg)
        now = time.time()
        dp = DataPlane(
            instance=name,
            service=reg.service,
            mesh=reg.mesh,
            kind=reg.kind,
            tags=dict(reg.tags),
            inbound_address=reg.inbound_address,
            admin_address=reg.admin_address,
            registered_at=now,
            last_seen=now,
            boot_id=reg.boot_id,
            pieces=reg.pieces,
            endpoint_deltas=reg.endpoint_deltas,
            pieces_formats=tuple(reg.pieces_formats) if reg.pieces_formats is not None else None,
            reachable=tuple(reg.reachable_services) if reg.reachable_services is not None else None,
            on_demand=tuple(reg.endpoints_on_demand),
            replica=self.replica,
        )
        before = self.dataplanes.get(name)
        if before is not None and before.boot_id == reg.boot_id:
            # the same process, from another replica (or re-registering): the generations it runs
            # are the floor of what this replica pushes it
            dp.generations = dict(before.generations)
        self.dataplanes[name] = dp
        self._save(dp)
        self._emit("registered", dp)
        return dp

    def known(self, hb: Heartbeat) -> DataPlane | None:
        """The data plane a heartbeat is from, if it is the process that registered (its boot)
        here: one registered with another replica registers again with this one."""
        dp = self.dataplanes.get(hb.instance)
        if dp is None or dp.boot_id != hb.boot_id or not self.local(dp):
            return None
        return dp

    def heartbeat(self, hb: Heartbeat) -> DataPlane | None:
        dp = self.known(hb)
        if dp is None:
            return None
        dp.last_seen = time.time()
        dp.running = dict(hb.running)
        dp.generations = dict(hb.generations)
        dp.endpoints_generation = hb.endpoints_generation
        dp.on_demand = tuple(hb.endpoints_on_demand)
        dp.heartbeats += 1
        dp.restored = False
        came_back = not dp.online
        dp.online = True
        self._save(dp, membership=came_back)
        if came_back:
            self._emit("online", dp)
        self._emit("heartbeat", dp)
        return dp

    def deregister(self, instance: str) -> bool:
        dp = self.dataplanes.get(instance)
        if dp is None or not self.local(dp):
            return False
        del self.dataplanes[instance]
        if self._store is not None:
            self._store.remove_dataplane(instance)
        self._emit("deregistered", dp)
        return True

    def sweep(self, now: float | None = None) -> list[DataPlane]:
        """Mark Offline the data planes whose heartbeats stopped; returns them. A peer's data
        plane goes Offline here too when its row had stopped moving at the last resync (its
        replica may be gone), later than its own replica would."""
        now = time.time() if now is None else now
        limit = self.heartbeat_interval_s * self.missed
        gone = []
        for dp in self.dataplanes.values():
            allowed = max(limit, self._restore_grace_s) if dp.restored else limit
            age = now - dp.last_seen
            if not self.local(dp):
                allowed = limit + 4 * self.heartbeat_interval_s + 2.0
                age = (self.peers_seen_at or now) - dp.observed_at
            if dp.online and age > allowed:
                dp.online = False
                gone.append(dp)
        for dp in gone:
            if self.local(dp):
                self._save(dp)
            self._emit("offline" if self.local(dp) else "peer", dp)
        return gone

    # --- other replicas -----------------------------------------------------------------------

    def merge(self, instance: str, row: DataPlane | None) -> None:
        """What the store says of ``instance`` now that another replica changed it."""
        mine = self.dataplanes.get(instance)
        if row is None:
            if mine is not None and not self.local(mine):
                del self.dataplanes[instance]
                self._emit("peer", mine)
            return
        if row.replica == self.replica:
            return  # our own row: memory is ahead of it
        if mine is not None and self.local(mine) and mine.registered_at > row.registered_at:
            return  # registered here since: the store catches up from our write
        now = time.time()
        if mine is not None and not self.local(mine) and _same(mine, row):
            if row.last_seen != mine.last_seen:
                mine.observed_at = now
            mine.last_seen, mine.running, mine.generations = row.last_seen, row.running, row.generations
            return
        row.observed_at = now
        self.dataplanes[instance] = row
        self._emit("peer", row)

    def merge_all(self, rows: list[DataPlane]) -> None:
        """Everything the store holds of the other replicas (a resync). After a gap (the store
        was unreachable, their writes are still queued) no row is judged by its silence yet."""
        now = time.time()
        blind = self.peers_seen_at is None or now - self.peers_seen_at > max(
            3.0, 6 * self.heartbeat_interval_s
        )
        self.peers_seen_at = now
        seen = {r.instance for r in rows}
        for dp in [d for d in self.dataplanes.values() if not self.local(d) and d.instance not in seen]:
            self.merge(dp.instance, None)
        for r in rows:
            self.merge(r.instance, r)
        if blind:
            for dp in self.dataplanes.values():
                if not self.local(dp):
                    dp.observed_at = now

    # --- queries ------------------------------------------------------------------------------

    def in_mesh(self, mesh: str) -> list[DataPlane]:
        return [dp for dp in self.dataplanes.values() if dp.mesh == mesh]

    def meshes(self) -> set[str]:
        return {dp.mesh for dp in self.dataplanes.values()}


def _same(a: DataPlane, b: DataPlane) -> bool:
    """Same membership and state (what endpoints and status depend on), heartbeats aside."""
    keys = (
        "service",
        "mesh",
        "kind",
        "tags",
        "inbound_address",
        "admin_address",
        "boot_id",
        "online",
        "replica",
    )
    return all(getattr(a, k) == getattr(b, k) for k in keys) and a.registered_at == b.registered_at
