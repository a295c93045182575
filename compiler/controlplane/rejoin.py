"""The live endpoint set right after a start without a registry (first start, lost state dir).

Data planes come back within ``REJOIN_INTERVALS`` heartbeat intervals; until then the registry
alone would give a partial set, and pushing it would drop every service not back yet. Holding the
pushes instead (what meshc did) leaves a blind spot: an upstream that stops in that window keeps
getting traffic until it ends. So the control plane learns the mesh's last live set from the
data planes themselves: each re-registration carries the endpoint set that data plane runs, with
the push signature it arrived with (``runtime.protocol.SignedEndpoints``). Only a set this
control plane's key signed for that very data plane (mesh, service, instance, boot) is taken,
the newest generation per mesh winning; so a data plane cannot make others route to addresses of
its choosing.

Until the window ends an endpoint set is the registry's live sidecars plus the learned endpoints
whose address has not registered again (the registry speaks for those that have), minus those
found dead: every pending learned address is probed with a TCP connect twice per heartbeat
interval: one that refuses is dropped at once, one that does not answer (within half an interval,
at least 1 s) at two probes in a row.
A stopped upstream thus leaves every endpoint set within one heartbeat interval, registry or
not. When the window ends the learned entries go: who is not back by then is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable

from compiler.controlplane.endpoints import endpoint_services
from compiler.controlplane.registry import DataPlane, Registry
from runtime.protocol import (
    Endpoint,
    EndpointSet,
    PushTarget,
    SignedEndpoints,
    endpoint_set_digest,
    service_endpoints_digest,
)

__all__ = ["Rejoin"]

Verify = Callable[[PushTarget, str, str, int, str], bool]
"""``(target, slot, digest, generation, signature) -> signed by this control plane``."""


class Rejoin:
    def __init__(self, registry: Registry, window_s: float, verify: Verify) -> None:
        self._registry = registry
        self.window_s = window_s
        self.until = time.time() + window_s
        self._verify = verify
        self._learned: dict[str, EndpointSet] = {}  # mesh -> the newest signed set reported
        self._seen: dict[tuple[str, str], int] = {}  # (mesh, service) -> generation learned from
        self._back: set[str] = set()  # addresses a sidecar registered with since this start
        self.dead: set[str] = set()
        self._slow: set[str] = set()  # no answer at the last probe
        self.last_found: dict[str, str] = {}
        """The addresses the last probe found dead, and why (``refused`` or ``slow``)."""
        registry.subscribe(self._on_registry)

    def begin(self) -> None:
        """The API listens: the window runs from now."""
        self.until = time.time() + self.window_s

    @property
    def open(self) -> bool:
        return time.time() < self.until

    def _on_registry(self, event: str, dp: DataPlane) -> None:
        if event == "registered" and dp.inbound_address:
            self._back.add(dp.inbound_address)

    def learn(self, dp: DataPlane, signed: SignedEndpoints) -> bool:
        """Take the set ``dp`` runs if this control plane signed it for ``dp`` and it is newer
        than the one known for its mesh; True when the mesh's set changed. A scoped set (a
        sidecar's, ``endpoints``) speaks for the services it names only, each kept from the
        newest set that names it; a delta's whole set must make the digest the delta signed."""
        if not self.open or dp.boot_id is None:
            return False
        try:
            got = EndpointSet.model_validate_json(signed.body)
            whole = got if got.base is None else EndpointSet.model_validate_json(signed.assembled or "")
        except (ValueError, TypeError):
            return False
        have = self._learned.get(dp.mesh)
        if have is not None and have.generation >= got.generation and not got.scoped:
            return False
        target = PushTarget(dp.mesh, dp.service, dp.instance, dp.boot_id)
        digest = hashlib.sha256(signed.body.encode()).hexdigest()
        if not self._verify(target, "endpoints", digest, got.generation, signed.signature):
            return False
        if got.base is not None:
            made = {n: service_endpoints_digest(n, eps) for n, eps in whole.services.items()}
            if endpoint_set_digest(made, got.scoped) != got.digest:
                return False
        if not got.scoped:
            self._learned[dp.mesh] = whole
            self._seen.update({(dp.mesh, n): got.generation for n in whole.services})
            return True
        merged = dict(have.services) if have is not None else {}
        changed = False
        for name, eps in whole.services.items():
            if self._seen.get((dp.mesh, name), -1) < got.generation:
                self._seen[(dp.mesh, name)] = got.generation
                merged[name] = eps
                changed = True
        if changed:
            gen = max(got.generation, have.generation if have is not None else 0)
            self._learned[dp.mesh] = EndpointSet(generation=gen, services=merged)
        return changed

    def learned(self, mesh: str) -> dict[str, list[Endpoint]]:
        """The endpoints learned for ``mesh`` (the log says what a start took on trust)."""
        found = self._learned.get(mesh)
        return dict(found.services) if found is not None else {}

    def pending(self) -> set[str]:
        """Learned addresses not registered again and not found dead: the ones to probe."""
        if not self.open:
            return set()
        out = {e.address for s in self._learned.values() for eps in s.services.values() for e in eps}
        return out - self._back - self.dead

    def services(self, mesh: str) -> dict[str, list[Endpoint]]:
        """The mesh's endpoint set (the pusher's ``endpoint_source`` while the window is open)."""
        live = endpoint_services(self._registry, mesh)
        learned = self._learned.get(mesh)
        if learned is None or not self.open:
            return live
        skip = self._back | self.dead
        for service, eps in learned.services.items():
            keep = [e for e in eps if e.address not in skip]
            if keep:
                have = live.setdefault(service, [])
                known = {e.address for e in have}
                have.extend(e for e in keep if e.address not in known)
                have.sort(key=lambda e: e.address)
        return dict(sorted(live.items()))

    async def probe(self, timeout_s: float) -> bool:
        """Connect to every pending address once; True when one was found dead. A refused
        connection is dead at once; one that does not answer in time only after two probes in a
        row (a busy host is not a stopped upstream)."""
        addrs = sorted(self.pending())
        results = await asyncio.gather(*(_connects(a, max(timeout_s, 1.0)) for a in addrs))
        found = set()
        for a, result in zip(addrs, results, strict=True):
            if result == "slow" and a not in self._slow:
                self._slow.add(a)
            elif result != "ok":
                found.add(a)
            else:
                self._slow.discard(a)
        self.dead |= found
        self.last_found = {a: r for a, r in zip(addrs, results, strict=True) if a in found}
        return bool(found)


async def _connects(address: str, timeout_s: float) -> str:
    """``ok``, ``refused`` (or unreachable) or ``slow`` (no answer within ``timeout_s``)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
    except TimeoutError:
        return "slow"
    except (OSError, ValueError):
        return "refused"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "ok"
