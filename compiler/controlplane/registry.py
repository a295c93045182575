"""The data planes that registered: identity, addresses, heartbeats, Online/Offline.

A data plane is Online from its registration until it misses ``missed`` heartbeats in a row, and
Online again at its next heartbeat. A clean exit deregisters it, which removes it. With a state
directory the membership (not the heartbeats) is saved on every change, so a restarted control
plane still knows every instance and keeps pushing the same endpoints instead of an empty set;
restored instances get a grace period to heartbeat again before they count as Offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.protocol import Heartbeat, Registration

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
        }


Listener = Callable[[str, DataPlane], None]
"""Called with an event (``registered``, ``online``, ``offline``, ``deregistered``, ``heartbeat``)."""


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
        state_dir: Path | None = None,
        restore_grace_s: float = 35.0,
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed = missed
        self.dataplanes: dict[str, DataPlane] = {}
        self._listeners: list[Listener] = []
        self._path = state_dir / "registry.json" if state_dir is not None else None
        self._restore_grace_s = restore_grace_s
        self.restored = self._restore()

    # --- events -----------------------------------------------------------------------------

    def subscribe(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _emit(self, event: str, dp: DataPlane) -> None:
        for fn in self._listeners:
            fn(event, dp)

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
            reachable=tuple(reg.reachable_services) if reg.reachable_services is not None else None,
        )
        self.dataplanes[name] = dp
        self._save()
        self._emit("registered", dp)
        return dp

    def known(self, hb: Heartbeat) -> DataPlane | None:
        """The data plane a heartbeat is from, if it is the process that registered (its boot)."""
        dp = self.dataplanes.get(hb.instance)
        if dp is None or dp.boot_id != hb.boot_id:
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
        dp.heartbeats += 1
        dp.restored = False
        if not dp.online:
            dp.online = True
            self._emit("online", dp)
        self._emit("heartbeat", dp)
        return dp

    def deregister(self, instance: str) -> bool:
        dp = self.dataplanes.pop(instance, None)
        if dp is None:
            return False
        self._save()
        self._emit("deregistered", dp)
        return True

    def sweep(self, now: float | None = None) -> list[DataPlane]:
        """Mark Offline the data planes whose heartbeats stopped; returns them."""
        now = time.time() if now is None else now
        limit = self.heartbeat_interval_s * self.missed
        gone = []
        for dp in self.dataplanes.values():
            allowed = max(limit, self._restore_grace_s) if dp.restored else limit
            if dp.online and now - dp.last_seen > allowed:
                dp.online = False
                gone.append(dp)
        for dp in gone:
            self._emit("offline", dp)
        return gone

    # --- queries ------------------------------------------------------------------------------

    def in_mesh(self, mesh: str) -> list[DataPlane]:
        return [dp for dp in self.dataplanes.values() if dp.mesh == mesh]

    def meshes(self) -> set[str]:
        return {dp.mesh for dp in self.dataplanes.values()}

    # --- persistence --------------------------------------------------------------------------

    def _save(self) -> None:
        if self._path is None:
            return
        doc = [
            {
                "instance": dp.instance,
                "service": dp.service,
                "mesh": dp.mesh,
                "kind": dp.kind,
                "tags": dp.tags,
                "inbound_address": dp.inbound_address,
                "admin_address": dp.admin_address,
                "registered_at": dp.registered_at,
                "boot_id": dp.boot_id,
                "pieces": dp.pieces,
                "reachable": dp.reachable,
            }
            for dp in sorted(self.dataplanes.values(), key=lambda d: d.instance)
        ]
        tmp = self._path.with_name(f".registry.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": 1, "dataplanes": doc}, indent=1))
            os.replace(tmp, self._path)

    def _restore(self) -> int:
        if self._path is None:
            return 0
        try:
            raw = json.loads(self._path.read_text())
            items = raw["dataplanes"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        now = time.time()
        for item in items:
            try:
                dp = DataPlane(
                    instance=str(item["instance"]),
                    service=str(item["service"]),
                    mesh=str(item["mesh"]),
                    kind=str(item["kind"]),
                    tags={str(k): str(v) for k, v in dict(item["tags"]).items()},
                    inbound_address=item.get("inbound_address"),
                    admin_address=str(item["admin_address"]),
                    registered_at=float(item["registered_at"]),
                    boot_id=str(item["boot_id"]) if item.get("boot_id") else None,
                    pieces=bool(item.get("pieces", False)),
                    reachable=tuple(map(str, item["reachable"]))
                    if item.get("reachable") is not None
                    else None,
                    last_seen=now,
                    restored=True,
                )
            except (KeyError, TypeError, ValueError):
                continue
            self.dataplanes[dp.instance] = dp
        return len(self.dataplanes)
