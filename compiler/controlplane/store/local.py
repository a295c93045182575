"""The state directory as a ``Store``: one replica, always the leader (today's behaviour, the default).

The membership (not the heartbeats) goes to ``registry.json`` on every change, so a restarted
control plane still knows every instance; generations go to ``generation``; the release pointer
to ``release`` (the id, for the operator: the leader recompiles on start). Sync state lives in
memory only. Without a state directory nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.controlplane.generation import Generations
from compiler.controlplane.store.base import (
    ChangeListener,
    Elector,
    LeaderInfo,
    ReplicaInfo,
    StoredRelease,
)

if TYPE_CHECKING:
    from compiler.controlplane.registry import DataPlane

__all__ = ["LocalStore", "SoleElector"]

REGISTRY_EVERY_S = 0.2
"""The registry file is rewritten at most this often (see ``LocalStore._write_registry``)."""

_MEMBERSHIP = (
    "instance",
    "service",
    "mesh",
    "kind",
    "tags",
    "inbound_address",
    "admin_address",
    "pieces",
    "reachable",
    "endpoint_deltas",
    "pieces_formats",
)


def _reachable(value: Any) -> tuple[str, ...] | None:
    return tuple(map(str, value)) if value is not None else None


class SoleElector:
    """The only replica leads, with fencing token 0."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    @property
    def leader(self) -> bool:
        return True

    @property
    def fencing_token(self) -> int | None:
        return 0

    async def run(self) -> None:
        return None

    async def release(self) -> None:
        return None


class LocalStore:
    name = "local"
    shared = False

    def __init__(self, state_dir: Path | None, *, replica: str, replica_url: str) -> None:
        self.state_dir = state_dir
        self.replica = replica
        self.replica_url = replica_url
        self._members: dict[str, dict[str, Any]] = {}
        self._canaries: dict[str, dict[str, Any]] = {}
        self._started_at = time.time()
        self._generations = Generations(state_dir)
        self._written_at = -REGISTRY_EVERY_S
        self._pending: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._pending is not None:
            self._flush_registry()

    def on_change(self, fn: ChangeListener) -> None:
        return None  # nobody else writes here

    # --- registry ---------------------------------------------------------------------------

    def _path(self, name: str) -> Path | None:
        return self.state_dir / name if self.state_dir is not None else None

    async def load_dataplanes(self) -> list[DataPlane]:
        from compiler.controlplane.registry import DataPlane

        path = self._path("registry.json")
        if path is None:
            return []
        try:
            items = json.loads(path.read_text())["dataplanes"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        now = time.time()
        out = []
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
                    endpoint_deltas=bool(item.get("endpoint_deltas", False)),
                    pieces_formats=tuple(map(int, item["pieces_formats"]))
                    if item.get("pieces_formats") is not None
                    else None,
                    reachable=tuple(map(str, item["reachable"]))
                    if item.get("reachable") is not None
                    else None,
                    last_seen=now,
                    restored=True,
                    replica=self.replica,
                )
            except (KeyError, TypeError, ValueError):
                continue
            self._members[dp.instance] = self._member(dp)
            out.append(dp)
        return out

    @staticmethod
    def _member(dp: DataPlane) -> dict[str, Any]:
        doc = {k: getattr(dp, k) for k in _MEMBERSHIP}
        doc.update(registered_at=dp.registered_at, boot_id=dp.boot_id)
        return doc

    def save_dataplane(self, dp: DataPlane, *, membership: bool) -> None:
        if not membership:
            return  # heartbeats are not kept
        doc = self._member(dp)
        if self._members.get(dp.instance) != doc:
            self._members[dp.instance] = doc
            self._write_registry()

    def remove_dataplane(self, instance: str) -> None:
        if self._members.pop(instance, None) is not None:
            self._write_registry()

    def _write_registry(self) -> None:
        """Write the registry file now, or (written less than ``REGISTRY_EVERY_S`` ago) once at
        the end of that interval: the whole file per registration made a storm of 1,000
        registrations write 1,000 files of up to 1,000 entries. A crash loses at most that
        interval's registrations, which the data planes' next heartbeats restore (404, they
        register again)."""
        if self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush_registry()
            return
        wait = self._written_at + REGISTRY_EVERY_S - loop.time()
        if wait <= 0:
            self._flush_registry()
        else:
            self._pending = loop.call_later(wait, self._flush_registry)

    def _flush_registry(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        with contextlib.suppress(RuntimeError):
            self._written_at = asyncio.get_running_loop().time()
        docs = [self._members[k] for k in sorted(self._members)]
        self._write("registry.json", json.dumps({"format": 1, "dataplanes": docs}, indent=1))

    def _write(self, name: str, text: str) -> None:
        path = self._path(name)
        if path is None:
            return
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)

    def save_sync(self, instance: str, slots: dict[str, dict[str, Any]]) -> None:
        return None

    # --- canaries -----------------------------------------------------------------------------

    def save_canary(self, key: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self._canaries.pop(key, None)
        else:
            self._canaries[key] = state
        self._write("canaries.json", json.dumps({"format": 1, "canaries": self._canaries}, sort_keys=True))

    async def load_canaries(self) -> dict[str, dict[str, Any]]:
        path = self._path("canaries.json")
        if path is None:
            return {}
        try:
            got = json.loads(path.read_text())["canaries"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        self._canaries = {str(k): v for k, v in got.items() if isinstance(v, dict)}
        return dict(self._canaries)

    async def load_syncs(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {}

    # --- generations, releases ----------------------------------------------------------------

    def generations(self) -> Generations:
        return self._generations

    async def publish_release(self, release: StoredRelease, holder: str) -> bool:
        self._write("release", release.id + "\n")
        return True

    async def current_release(self) -> StoredRelease | None:
        return None

    # --- security metadata, replicas, leader --------------------------------------------------

    async def check_security(self, meta: dict[str, str], cas: dict[str, str]) -> str | None:
        return None

    async def replicas(self) -> list[ReplicaInfo]:
        return [ReplicaInfo(self.replica, self.replica_url, self._started_at, time.time())]

    async def leader_info(self) -> LeaderInfo | None:
        return LeaderInfo(self.replica, 0, None)

    def elector(self, lease_s: float) -> Elector:
        return SoleElector(self.replica)
