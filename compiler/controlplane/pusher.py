"""Pushing to data planes: per data plane reconciliation of three slots, in make-before-break order.

Each data plane has three slots, pushed in this order so that nothing ever routes to what the data
plane does not know yet: ``endpoints`` (the mesh's endpoint set, ``PUT /endpoints``), ``mesh`` (the
mesh bundle, catalog and default routes) and ``service`` (its own service or gateway bundle, the
routes that use them; both ``PUT /bundle``). A slot is pushed only when its desired digest differs
from the one the data plane acknowledged, so a commit that changes one service's bundle sends one
bundle to that service's data planes and nothing to the others.

One task per data plane waits for its slots to become dirty and reconciles them; a semaphore bounds
the pushes in flight across all data planes, over keep-alive connections. A transport error is
retried with capped exponential backoff, and so is a NACK that refuses the moment, not the
content (403: this boot has not registered yet, say a push that overtook the registration's
answer; 409: an older generation), until an ACK or the data plane goes Offline. A NACK of the
content (400, 413) is recorded and the same bytes are not sent again (they would be refused
again), and the later slots wait, since they may depend on what was refused. Heartbeats report what a
data plane runs (every slot's digest and generation, endpoints included): a slot that runs
something else than what was acknowledged (a replay, a restart from older state) shows STALE with
its running digest and is pushed again, and one that already runs the desired digest (a control
plane restart) counts as SYNCED without a push.

A data plane that registered with ``pieces`` gets its mesh slot as a delta push
(``runtime.pieces``): the manifest (its digest is the slot's desired digest) and only the pieces
it is believed to lack, of those in its scope: every catalog chunk, and the destinations its
service bundle names (and their split targets), its ``reachable_services`` and those it asked
for on demand or named as missing in a 422. A gateway gets every destination. The manifest is
of the newest format both it (``pieces_formats``; none declared: format 1, a data plane from
before format 2) and this control plane speak; the format 1 view of a release is made only when
some data plane needs it, from the same pieces (``MeshPieces.as_format``). A data plane with no
format in common is pushed nothing for its mesh slot, and its status says why. A 422 NACK
(pieces it lacks) is answered at once by a push that carries them; every body's bytes are
counted (``meshc_controlplane_push_bytes``, and per rollout).

The endpoints slot is planned by ``compiler.controlplane.endpoints``: a data plane that takes
per-service endpoints gets those of its scope (the mesh slot's, plus those it asked for or
declares it fetched on demand), as deltas over what it ACKed or reported running; the others
the whole mesh's set, as before.

A data plane restored from the store (this control plane restarted) is pushed nothing before
its first heartbeat here: what it runs, and what it fetched on demand, come with that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from compiler.controlplane.endpoints import EndpointPlans, MeshEndpoints, Scope, endpoint_services
from compiler.controlplane.generation import Generations
from compiler.controlplane.metrics import ControlPlaneMetrics
from compiler.controlplane.pieces import PieceStore
from compiler.controlplane.registry import DataPlane, Registry
from compiler.controlplane.release import Release, ReleaseState
from runtime.pieces import FORMATS, MeshPieces, choose_format
from runtime.protocol import (
    HDR_BUNDLE_ROLE,
    HDR_DIGEST,
    HDR_GENERATION,
    HDR_PIECES,
    HDR_SIGNATURE,
    Endpoint,
    EndpointSet,
    PushTarget,
    SignedEndpoints,
)

__all__ = ["SLOTS", "DataPlaneSync", "Pusher", "Rollout", "SlotState"]

SLOTS = ("endpoints", "mesh", "service")
ENDPOINTS_WINDOW_S = 0.05
ENDPOINTS_WINDOW_MAX_S = 1.0
_TRANSIENT = ("403:", "409:")
"""NACKs that do not say the content is bad: the same digest is pushed again (backing off)."""
Result = Literal["ack", "nack", "error"]


def _same(data: bytes) -> bytes:
    return data


@dataclass
class SlotState:
    desired: str | None = None
    desired_since: float | None = None
    """When the change that made ``desired`` was seen; set only for policy changes (measured)."""
    changed_at: float | None = None
    """When ``desired`` last changed (any cause): the lag of a slot not synced yet."""
    last_lag_s: float | None = None
    """Change (or first push) to ACK, for the last ACK."""
    inflight: str | None = None
    sent: str | None = None
    acked: str | None = None
    generation: int | None = None
    """Generation of the last push of this slot."""
    acked_generation: int | None = None
    """Generation of the last ACKed push: a heartbeat reporting an older one predates that ACK."""
    running: str | None = None
    """What the data plane's last heartbeat said it runs (None: not reported yet)."""
    last_ack_at: float | None = None
    nack: str | None = None
    nack_digest: str | None = None
    last_nack_at: float | None = None
    error: str | None = None
    mismatches: int = 0

    @property
    def status(self) -> str:
        if self.desired is None:
            return "-"
        if self.acked == self.desired:
            return "SYNCED"
        if self.sent == self.desired:
            return "STALE"
        return "NOT SENT"

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "desired": self.desired,
            "acked": self.acked,
            "running": self.running,
            "sent": self.sent,
            "inflight": self.inflight is not None,
            "generation": self.generation,
            "last_ack_at": self.last_ack_at,
            "nack": self.nack,
            "last_nack_at": self.last_nack_at,
            "error": self.error,
            "lag_s": self.lag(time.time()),
            "last_lag_s": self.last_lag_s,
        }

    def lag(self, now: float) -> float | None:
        """Seconds since the desired digest changed, while it is not acknowledged; else None."""
        if self.desired is None or self.acked == self.desired or self.changed_at is None:
            return None
        return round(max(0.0, now - self.changed_at), 3)


@dataclass
class DataPlaneSync:
    instance: str
    slots: dict[str, SlotState] = field(default_factory=lambda: {s: SlotState() for s in SLOTS})
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    base: str | None = None
    """The manifest whose whole catalog tree it is believed to hold (its last ACKed one)."""
    dests: dict[str, str] = field(default_factory=dict)
    """Destination -> the piece digest it is believed to hold (from its ACKs and fetches); a 422
    corrects the belief."""
    extra: set[str] = field(default_factory=set)
    """Destinations it holds beyond its scope (fetched on demand, or named in a 422)."""


@dataclass
class Rollout:
    """One compiled change and the ACKs it needs (for the propagation benchmark and the GUI)."""

    release: str
    seen_at: float
    changed: tuple[str, ...]
    targets: int
    pending: set[tuple[str, str]]
    acked: int = 0
    nacked: int = 0
    completed_at: float | None = None
    bytes: int = 0
    """Bytes of the push bodies sent for it (retries and 422 re-sends included)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "seen_at": self.seen_at,
            "changed": list(self.changed),
            "targets": self.targets,
            "acked": self.acked,
            "nacked": self.nacked,
            "bytes": self.bytes,
            "pending": len(self.pending),
            "completed_at": self.completed_at,
            "duration_s": None if self.completed_at is None else self.completed_at - self.seen_at,
        }


class Pusher:
    def __init__(
        self,
        registry: Registry,
        releases: ReleaseState,
        metrics: ControlPlaneMetrics,
        generations: Generations,
        *,
        concurrency: int = 32,
        timeout_s: float = 10.0,
        max_backoff_s: float = 5.0,
        endpoints_hold_s: float = 0.0,
    ) -> None:
        self.registry = registry
        self.releases = releases
        self.metrics = metrics
        self.generations = generations
        self.syncs: dict[str, DataPlaneSync] = {}
        self.rollouts: deque[Rollout] = deque(maxlen=100)
        self._sem = asyncio.Semaphore(concurrency)
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(2.0, timeout_s))
        self._max_backoff_s = max_backoff_s
        self._hold_until = time.time() + endpoints_hold_s
        self._eps: dict[str, MeshEndpoints] = {}
        self.eps = EndpointPlans()
        """What each data plane gets of its mesh's endpoint set (``endpoints``)."""
        self._eps_stale: set[str] = set()
        """Meshes whose membership changed since their endpoint set was computed."""
        self._eps_timer: asyncio.TimerHandle | None = None
        self._eps_flushed_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._concurrency = concurrency
        self.signer: Callable[[PushTarget, str, str, int], str] | None = None
        """Signs every push (DESIGN §6); set by the control plane."""
        self.endpoint_source: Callable[[str], dict[str, list[Endpoint]]] | None = None
        """Where endpoint sets come from instead of the registry (Kubernetes EndpointSlices)."""
        self.pieces = PieceStore()
        registry.subscribe(self._on_registry)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            # Keep-alive to every data plane (the semaphore bounds the pushes in flight): a pool
            # of 32 connections shared by 1,000 admin APIs opened a new connection per push.
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=2, force_close=False, keepalive_timeout=120.0
            ),
            trust_env=False,
        )
        for dp in list(self.registry.dataplanes.values()):
            if self.registry.local(dp):  # another replica's data planes are pushed by it
                self._track(dp, push=not dp.restored)

    async def close(self) -> None:
        if self._eps_timer is not None:
            self._eps_timer.cancel()
            self._eps_timer = None
        tasks = [s.task for s in self.syncs.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:  # bounded: a stop while 1,000 pushes are in flight must not wait for them
            await asyncio.wait(tasks, timeout=1.0)
        if self._session is not None:
            await self._session.close()

    # --- desired state ------------------------------------------------------------------------

    def mesh_endpoints(self, mesh: str, before: MeshEndpoints | None = None) -> MeshEndpoints:
        """The mesh's current endpoint set (computed once per membership change)."""
        cached = self._eps.get(mesh)
        if cached is None:
            src = self.endpoint_source
            services = src(mesh) if src is not None else endpoint_services(self.registry, mesh)
            cached = self._eps[mesh] = MeshEndpoints(services, before)
        return cached

    def _mesh_endpoints(self, mesh: str) -> tuple[dict[str, list[Endpoint]], str]:
        """(services, ``endpoints_digest``) of the mesh's whole set."""
        eps = self.mesh_endpoints(mesh)
        return eps.services, eps.legacy_digest

    def _eps_scope(self, dp: DataPlane, sync: DataPlaneSync | None) -> Scope:
        if not self.eps.per_service(dp):
            return None
        return self.eps.scope(dp, self.scope(dp, sync))

    def _eps_desired(self, dp: DataPlane, sync: DataPlaneSync | None) -> str:
        return self.eps.desired(dp, self.mesh_endpoints(dp.mesh), self._eps_scope(dp, sync))

    def mesh_pieces(self, rel: Release | None, mesh: str) -> MeshPieces | None:
        """The current release's mesh bundle of ``mesh`` as pieces."""
        data = rel.bundles.get(mesh) if rel else None
        digest = rel.digests.get(mesh) if rel else None
        return self.pieces.mesh(digest, data) if rel and data is not None and digest else None

    @staticmethod
    def view(dp: DataPlane, mp: MeshPieces) -> MeshPieces | None:
        """``mp`` as the manifest format ``dp`` is served; None: it runs no format made here."""
        fmt = choose_format(dp.pieces_formats)
        return mp.as_format(fmt) if fmt is not None else None

    def _desired(self, dp: DataPlane) -> dict[str, str | None]:
        rel = self.releases.current
        digests = rel.digests if rel else {}
        mesh = digests.get(dp.mesh)
        if mesh is not None and dp.pieces:
            mp = self.mesh_pieces(rel, dp.mesh)
            view = self.view(dp, mp) if mp is not None else None
            # no format in common: the newest manifest stays desired (and is never sent)
            mesh = (view or mp).digest if mp is not None else None
        return {
            "endpoints": self._eps_desired(dp, self.syncs.get(dp.instance)),
            "mesh": mesh,
            "service": digests.get(f"{dp.mesh}/{dp.service}"),
        }

    def scope(self, dp: DataPlane, sync: DataPlaneSync | None) -> set[str] | None:
        """The destinations a data plane gets pushed ahead; None: every one (a gateway). Those
        it fetched on demand stay in it: asked of this control plane (``sync.extra``) or
        declared by the data plane (``on_demand``), so that a control plane that restarted
        knows it holds them and sends their changes with the next push, not after a 422."""
        if dp.kind == "gateway":
            return None
        rel = self.releases.current
        key = f"{dp.mesh}/{dp.service}"
        data = rel.bundles.get(key) if rel else None
        digest = rel.digests.get(key) if rel else None
        names = set(self.pieces.named(digest, data)) if data is not None and digest else set()
        names.update(dp.reachable or ())
        names.update(dp.on_demand)
        if sync is not None:
            names |= sync.extra
        return names

    def pieces_for(self, dp: DataPlane, digests: list[str]) -> list[bytes]:
        """An on-demand fetch: the pieces asked for; their destinations join its scope."""
        found = self.pieces.find(digests)
        sync = self.syncs.get(dp.instance)
        mp = self.mesh_pieces(self.releases.current, dp.mesh)
        if sync is not None and mp is not None:
            for name, d in self._names_of(mp, found).items():
                sync.extra.add(name)
                sync.dests[name] = d
        self.metrics.push_bytes.labels("fetched").inc(sum(len(p) + 1 for p in found.values()))
        if sync is not None and mp is not None:
            # its endpoints come with it (pushed now, ahead of the request that waits for them)
            by_digest = {d: n for n, d in mp.destinations.items()}
            if self.eps.extend(dp, [by_digest[d] for d in found if d in by_digest]):
                self._refresh(sync, dp, None)
        return list(found.values())

    async def endpoints_for(self, dp: DataPlane, names: list[str], timeout_s: float) -> bool:
        """On demand: ``names`` join ``dp``'s endpoint scope; True once it ACKed a set holding
        them, False when that took longer than ``timeout_s``."""
        sync = self.syncs.get(dp.instance)
        if sync is not None and self.eps.extend(dp, names):
            self._refresh(sync, dp, None)
        return await self.eps.wait(dp, names, timeout_s)

    def _refresh(self, sync: DataPlaneSync, dp: DataPlane, seen_at: float | None) -> list[str]:
        changed = []
        for slot, want in self._desired(dp).items():
            st = sync.slots[slot]
            if st.desired != want:
                st.desired = want
                st.desired_since = seen_at if slot != "endpoints" else None
                st.changed_at = seen_at or time.time()
                changed.append(slot)
        if changed:
            sync.dirty.set()
        return changed

    def _track(self, dp: DataPlane, push: bool = True) -> DataPlaneSync:
        sync = self.syncs.get(dp.instance)
        if sync is None:
            sync = self.syncs[dp.instance] = DataPlaneSync(dp.instance)
            sync.task = asyncio.ensure_future(self._worker(sync))
        self._refresh(sync, dp, None)
        if not push:
            sync.dirty.clear()
        return sync

    def on_release(self, changed: set[str], seen_at: float) -> None:
        """A new release is current: refresh every data plane's desired digests."""
        rel = self.releases.current
        if rel is None:
            return
        pending: set[tuple[str, str]] = set()
        for sync in self.syncs.values():
            dp = self.registry.dataplanes.get(sync.instance)
            if dp is None:
                continue
            for slot in self._refresh(sync, dp, seen_at):
                if dp.online and slot != "endpoints":
                    pending.add((dp.instance, slot))
        ro = Rollout(rel.id, seen_at, tuple(sorted(changed)), len(pending), pending)
        if not pending:
            ro.completed_at = time.time()
        self.rollouts.append(ro)

    def rolling_out(self, within_s: float = 60.0) -> bool:
        """A rollout begun in the last ``within_s`` still waits for ACKs (one whose data plane
        went away stays pending for good, hence the bound)."""
        now = time.time()
        return any(ro.completed_at is None and now - ro.seen_at < within_s for ro in self.rollouts)

    def endpoints_changed(self) -> None:
        """The endpoint source changed: refresh the data planes whose mesh's set is different now."""
        self._hold_until = 0.0  # an authoritative source needs no wait for re-registrations
        before, self._eps = self._eps, {}
        for sync in self.syncs.values():
            dp = self.registry.dataplanes.get(sync.instance)
            if dp is None:
                continue
            old = before.get(dp.mesh)
            if old is None or self.mesh_endpoints(dp.mesh, old).changed:
                self._refresh(sync, dp, None)

    def _endpoints_window(self) -> float:
        """How long membership changes are gathered into one endpoint set: each new set goes to
        every data plane of the mesh (a push of O(N) bytes to each of N), so a registration storm
        of 1,000 data planes must not make 1,000 sets. 50 ms, growing with the data planes to
        1 s (Kuma refreshes data plane configuration once a second)."""
        return min(ENDPOINTS_WINDOW_MAX_S, ENDPOINTS_WINDOW_S + len(self.syncs) / 1000)

    def _schedule_endpoints(self) -> None:
        """Recompute the changed meshes' endpoint sets now if none was computed within the
        window (a lone change goes at once), else once at the window's end."""
        if self._eps_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_endpoints()
            return
        wait = self._eps_flushed_at + self._endpoints_window() - loop.time()
        if wait <= 0:
            self.flush_endpoints()
        else:
            self._eps_timer = loop.call_later(wait, self.flush_endpoints)

    def flush_endpoints(self) -> None:
        """Recompute the endpoint sets whose membership changed; data planes whose mesh has a
        new set are refreshed (their workers push it)."""
        if self._eps_timer is not None:
            self._eps_timer.cancel()
            self._eps_timer = None
        with contextlib.suppress(RuntimeError):
            self._eps_flushed_at = asyncio.get_running_loop().time()
        stale, self._eps_stale = self._eps_stale, set()
        changed = set()
        for mesh in stale:
            before = self._eps.pop(mesh, None)
            after = self.mesh_endpoints(mesh, before)
            if before is None or after.changed:
                changed.add(mesh)
        if not changed:
            return
        for sync in self.syncs.values():
            other = self.registry.dataplanes.get(sync.instance)
            if other is not None and other.mesh in changed:
                self._refresh(sync, other, None)

    def endpoints_body(self, mesh: str, generation: int) -> bytes:
        """``EndpointSet(generation=..., services=...).model_dump_json()`` of the mesh's current
        set, from its services serialized once (the same bytes: a test holds them to it)."""
        return self.mesh_endpoints(mesh).legacy_body(generation)

    def _on_registry(self, event: str, dp: DataPlane) -> None:
        if event == "heartbeat":
            self._on_heartbeat(dp)
            return
        if event in ("registered", "online", "offline", "deregistered", "peer"):
            self._eps_stale.add(dp.mesh)
            self._schedule_endpoints()
        if event == "deregistered" or (event == "peer" and not self.registry.local(dp)):
            self.eps.forget(dp.instance)
            gone = self.syncs.pop(dp.instance, None)
            if gone is not None and gone.task is not None:
                gone.task.cancel()
            return
        if event == "registered":
            self.eps.registered(dp)
            old = self.syncs.pop(dp.instance, None)
            if old is not None and old.task is not None:
                old.task.cancel()
            self._track(dp)
        elif event == "online":
            sync = self._track(dp)
            sync.dirty.set()

    def _on_heartbeat(self, dp: DataPlane) -> None:
        """What the data plane says it runs is the truth: a slot that runs another digest than the
        one acknowledged (a replay, a restart from older state, an ACK we missed) is taken as what
        runs, shows STALE when that is not the desired digest, and is pushed again."""
        sync = self.syncs.get(dp.instance)
        if sync is None:
            sync = self._track(dp)
        if dp.on_demand and self.eps.extend(dp, dp.on_demand):
            self._refresh(sync, dp, None)  # a control plane that did not see it ask keeps them
        if dp.pieces and sync.base is None and sync.slots["mesh"].inflight is None:
            self._infer_pieces(sync, dp)
        for slot in SLOTS:
            st = sync.slots[slot]
            running = dp.running.get(slot)
            gen = dp.generations.get(slot)
            if st.inflight is not None:
                continue
            if gen is not None and st.acked_generation is not None and gen < st.acked_generation:
                continue  # built before the last ACK arrived
            st.running = running
            if running is None:
                if slot == "endpoints" and dp.endpoints_generation == 0 and st.acked is not None:
                    st.acked = None  # restarted without endpoints
                continue
            if running == st.acked:
                st.mismatches = 0
                continue
            if gen is None:  # an older data plane without generations: two in a row
                st.mismatches += 1
                if st.acked is not None and st.mismatches < 2:
                    continue
            st.mismatches = 0
            st.acked = running
            st.acked_generation = gen
            if running == st.desired:
                st.last_ack_at = time.time()
                st.error = None
                self._rollout_done(dp.instance, slot, ok=True)
        self._rebuild_endpoints(sync, dp)
        if any(s.desired is not None and s.acked != s.desired for s in sync.slots.values()):
            sync.dirty.set()

    def _rebuild_endpoints(self, sync: DataPlaneSync, dp: DataPlane) -> None:
        """Its running endpoint set is the base of the next delta once its per-service digests
        are known (``EndpointPlans.rebuild``): a control plane that restarted sends deltas again
        at once, not a whole set to every data plane at the next membership change."""
        running = dp.running.get("endpoints")
        st = sync.slots["endpoints"]
        if running is None or st.inflight is not None or running != st.acked:
            return
        if self.eps.per_service(dp) and not self.eps.based_on(dp, running):
            self.eps.rebuild(dp, self.mesh_endpoints(dp.mesh), self._eps_scope(dp, sync), running)

    def adopt_endpoints(self, dp: DataPlane, running: SignedEndpoints | None, reported: str | None) -> None:
        """A registration said which endpoint set it runs (Envoy's initial resource versions):
        the set itself (``running``, as it was pushed in this boot) or its digest (``reported``,
        a set loaded from its state dir). Taken as what it runs, as a heartbeat's would be, and
        as the base of the next delta when its per-service digests are known: the set's own
        when they make its digest, else the set this control plane would send it, when its
        digest is the reported one. A data plane that moved here from another replica, or
        restarted from its state dir, then gets nothing or a delta instead of its whole set."""
        sync = self.syncs.get(dp.instance)
        if sync is None or not self.eps.per_service(dp):
            return
        st = sync.slots["endpoints"]
        if st.inflight is not None or st.acked is not None:
            return
        digest, generation = None, None
        if running is not None:
            with contextlib.suppress(ValueError):
                whole = EndpointSet.model_validate_json(running.assembled or running.body)
                digest, generation = self.eps.adopt(dp, whole), whole.generation
        if digest is None and reported is not None:
            digest, generation = reported, None
            self.eps.rebuild(dp, self.mesh_endpoints(dp.mesh), self._eps_scope(dp, sync), reported)
        if digest is None:
            return
        st.running = st.acked = digest
        st.acked_generation = generation
        if digest == st.desired:
            st.last_ack_at = time.time()

    def _infer_pieces(self, sync: DataPlaneSync, dp: DataPlane) -> None:
        """A data plane we know nothing of (this control plane restarted, or it did) that runs a
        manifest we still hold has its catalog and its scope of it, so the next push need not
        carry them; anything else it held shows up in a 422."""
        running = dp.running.get("mesh")
        mp = self.pieces.by_manifest(running) if running else None
        if mp is not None:
            sync.base = mp.digest
            scope = self.scope(dp, sync)
            names = mp.destinations.keys() if scope is None else scope
            sync.dests = {n: mp.destinations[n] for n in names if n in mp.destinations}

    # --- pushing ------------------------------------------------------------------------------

    async def _worker(self, sync: DataPlaneSync) -> None:
        backoff = 0.1
        while True:
            await sync.dirty.wait()
            sync.dirty.clear()
            dp = self.registry.dataplanes.get(sync.instance)
            if dp is None or not self.registry.local(dp):
                return
            if not dp.online or dp.restored:
                continue  # a restored one: its first heartbeat says what it runs (and wakes this)
            retry_in = await self._reconcile(sync, dp)
            if retry_in is None:
                backoff = 0.1
                continue
            wait = backoff if retry_in <= 0 else retry_in
            if retry_in <= 0:
                backoff = min(backoff * 2, self._max_backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sync.dirty.wait(), wait)
            sync.dirty.set()

    async def _reconcile(self, sync: DataPlaneSync, dp: DataPlane) -> float | None:
        """Push what differs; None when done, else seconds to wait (0: backoff) before retrying."""
        self._refresh(sync, dp, None)
        sync.dirty.clear()
        hold_retry: float | None = None
        for slot in SLOTS:
            st = sync.slots[slot]
            want = st.desired
            if want is None or want == st.acked:
                continue
            if want == st.nack_digest and not (st.nack or "").startswith("409"):
                # refused: the later slots may depend on it; wait for a new digest. A 409 (an
                # older generation than it runs, pushed before its first heartbeat here reported
                # its generations) is retried once a heartbeat has.
                return None
            if slot == "endpoints":
                now = time.time()
                if now < self._hold_until and not dp.restored and dp.endpoints_generation != 0:
                    # Just (re)started without a saved registry, the set is still filling up as
                    # data planes re-register: one that already runs endpoints keeps them until
                    # the hold ends (its bundles still go); one that has not said yet (no
                    # heartbeat so far) gets nothing before it does, since routes must not arrive
                    # before the endpoints they use. A heartbeat or the hold's end wakes this up.
                    if dp.endpoints_generation is None:
                        return self._hold_until - now
                    hold_retry = self._hold_until - now
                    continue
                if dp.mesh in self._eps_stale and self._eps_timer is not None:
                    # its membership changed and the new set is due at the window's end: push
                    # that one, not this (the flush refreshes every data plane of the mesh)
                    return max(0.01, self._eps_timer.when() - asyncio.get_running_loop().time())
                if self._eps_desired(dp, sync) != want:
                    sync.dirty.set()
                    return None
                gen = self._generation(dp)
                result, reason = await self._push_endpoints(sync, dp, st, want, gen)
            elif slot == "mesh" and dp.pieces:
                mp = self.mesh_pieces(self.releases.current, dp.mesh)
                view = self.view(dp, mp) if mp is not None else None
                if mp is None or (view or mp).digest != want:
                    sync.dirty.set()
                    return None
                if view is None:
                    self._no_common_format(dp, st, want)
                    return None
                gen = self._generation(dp)
                result, reason = await self._push_pieces(sync, dp, view, st, gen)
            else:
                rel = self.releases.current
                key = dp.mesh if slot == "mesh" else f"{dp.mesh}/{dp.service}"
                data = rel.bundles.get(key) if rel else None
                if rel is None or data is None or rel.digests.get(key) != want:
                    sync.dirty.set()
                    return None
                gen = self._generation(dp)
                headers = {HDR_DIGEST: want, HDR_GENERATION: str(gen), HDR_BUNDLE_ROLE: slot}
                result, reason, _ = await self._put(
                    dp, "/bundle", functools.partial(_same, data), headers, st, want, gen
                )
            self.metrics.pushes.labels(slot, result).inc()
            now = time.time()
            if result == "ack":
                st.acked = want
                st.acked_generation = gen
                st.running = want
                st.last_ack_at = now
                st.error = None
                st.mismatches = 0
                if st.changed_at is not None:
                    st.last_lag_s = round(max(0.0, now - st.changed_at), 3)
                if st.desired_since is not None and slot != "endpoints":
                    self.metrics.propagation.labels(slot).observe(max(0.0, now - st.desired_since))
                    st.desired_since = None
                self._rollout_done(dp.instance, slot, ok=True)
            elif result == "nack" and reason.startswith(_TRANSIENT):
                # Not the content: not registered in this boot yet (a push that overtook the
                # registration's answer), or an older generation. Pushed again, with a new
                # generation, backing off, until it ACKs or goes Offline.
                st.nack, st.last_nack_at, st.error = reason, now, reason
                return 0.0
            elif result == "nack":
                st.nack, st.nack_digest, st.last_nack_at = reason, want, now
                print(f"meshc: {dp.instance} NACKed the {slot} push {want[:12]}: {reason}", flush=True)
                self._rollout_done(dp.instance, slot, ok=False)
                return None
            else:
                st.error = reason
                return 0.0
            if st.desired != want:
                return 0.0
        return hold_retry

    def _no_common_format(self, dp: DataPlane, st: SlotState, want: str) -> None:
        """A data plane that runs no manifest format made here: nothing is pushed to its mesh
        slot (nor, after it, to its service slot), and its status says why until it registers
        with a format this control plane makes (or the control plane is upgraded)."""
        declared = list(dp.pieces_formats or ())
        reason = (
            f"no mesh manifest format in common: the data plane runs formats {declared}, "
            f"this control plane makes {list(FORMATS)}; upgrade one of them"
        )
        if st.nack != reason:
            print(f"meshc: {dp.instance}: {reason}", flush=True)
        st.nack, st.nack_digest, st.last_nack_at, st.error = reason, want, time.time(), reason
        self._rollout_done(dp.instance, "mesh", ok=False)

    async def _push_endpoints(
        self, sync: DataPlaneSync, dp: DataPlane, st: SlotState, want: str, gen: int
    ) -> tuple[Result, str]:
        """The endpoints slot: the whole mesh's set, or (per-service data planes) its scope's, as
        a delta over what it ACKed; a 422 (it runs another base) is answered with the whole set."""
        eps = self.mesh_endpoints(dp.mesh)
        scope = self._eps_scope(dp, sync)
        made: list[dict[str, str] | None] = []

        def body() -> bytes:
            data, picked = self.eps.body(dp, eps, scope, gen, st.acked)
            made.append(picked)
            return data

        for _ in range(2):
            made.clear()
            result, reason, _ = await self._put(
                dp, "/endpoints", body, {HDR_GENERATION: str(gen)}, st, want, gen
            )
            if result == "nack" and reason.startswith("422"):
                self.eps.unbased(dp)
                st.acked = None  # it does not run what we believed
                continue
            break
        if result == "ack" and made:
            self.eps.acked(dp, made[-1], want)
        return result, reason

    async def _push_pieces(
        self, sync: DataPlaneSync, dp: DataPlane, mp: MeshPieces, st: SlotState, gen: int
    ) -> tuple[Result, str]:
        """The manifest and the pieces of its scope it lacks: the catalog nodes that are new since
        the manifest it holds (computed once per pair of releases, shared by every data plane on
        the same one) and the destinations of its scope whose piece it does not hold. A 422 is
        answered with what it names, index pieces with their subtrees (twice at most: then it is
        a NACK like any other)."""
        scope = self.scope(dp, sync)
        names = mp.destinations.keys() if scope is None else scope
        base = self.pieces.by_manifest(sync.base) if sync.base is not None else None
        # What it holds beyond its scope now (a route since removed) it keeps: sent too when changed.
        dests = {n: mp.destinations[n] for n in (*names, *sync.dests) if n in mp.destinations}
        send = [
            *mp.catalog_since(base),
            *(d for n, d in sorted(dests.items()) if sync.dests.get(n) != d),
        ]
        headers = {HDR_DIGEST: mp.digest, HDR_GENERATION: str(gen), HDR_BUNDLE_ROLE: "mesh", HDR_PIECES: "1"}
        for _ in range(3):
            result, reason, missing = await self._put(
                dp, "/bundle", functools.partial(mp.body, list(send)), headers, st, mp.digest, gen
            )
            if result != "nack" or not missing:
                break
            known = [d for d in missing if d in mp.pieces]
            if not known or set(known) <= set(send):
                break  # it asks for what it was sent, or for what no release has: a real NACK
            for name, d in self._names_of(mp, known).items():
                sync.extra.add(name)
                sync.dests.pop(name, None)
                dests[name] = d
            if any(d not in mp.names for d in known):
                sync.base = None  # it lacked part of a tree it was believed to hold
            send = list(dict.fromkeys([*send, *mp.below(known)]))
        if result == "ack":
            held = {n: mp.destinations[n] for n in sync.dests if n in mp.destinations}
            sync.base, sync.dests = mp.digest, {**held, **dests}
        return result, reason

    @staticmethod
    def _names_of(mp: MeshPieces, digests: Iterable[str]) -> dict[str, str]:
        """Destination -> digest, for those of ``digests`` that are destination pieces of ``mp``."""
        return {mp.names[d]: d for d in digests if d in mp.names}

    def _generation(self, dp: DataPlane) -> int:
        """The next generation, above any the data plane reported running: one that moved here
        from another replica holds that replica's generations."""
        return max(self.generations.next(), max(dp.generations.values(), default=0) + 1)

    async def _put(
        self,
        dp: DataPlane,
        path: str,
        make_body: Callable[[], bytes],
        headers: dict[str, str],
        st: SlotState,
        want: str,
        gen: int,
    ) -> tuple[Result, str, list[str]]:
        """One push: (ack|nack|error, reason, the piece digests a 422 names).

        The body is made only once a push slot (the semaphore) is free: 1,000 data planes
        waiting for one each held their own copy of a 1.6 MB catalog (1.6 GB) before."""
        assert self._session is not None
        st.inflight = st.sent = want
        st.generation = gen
        slot = "endpoints" if path == "/endpoints" else headers[HDR_BUNDLE_ROLE]
        try:
            async with self._sem:
                body = make_body()
                self.metrics.push_bytes.labels(slot).inc(len(body))
                for ro in self.rollouts:
                    if (dp.instance, slot) in ro.pending:
                        ro.bytes += len(body)
                if self.signer is not None:
                    # DESIGN §6: for this mesh, service, instance and boot; for endpoints, the body's digest.
                    digest = headers.get(HDR_DIGEST) or hashlib.sha256(body).hexdigest()
                    target = PushTarget(dp.mesh, dp.service, dp.instance, dp.boot_id or "")
                    headers = {**headers, HDR_SIGNATURE: self.signer(target, slot, digest, gen)}
                async with self._session.put(
                    f"http://{dp.admin_address}{path}",
                    data=body,
                    headers={"Content-Type": "application/json", **headers},
                    timeout=self._push_timeout(len(body)),
                ) as resp:
                    del body
                    raw = await resp.read()
                    status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return "error", f"{type(e).__name__}: {e}"[:300], []
        finally:
            st.inflight = None
        if status == 200:
            return "ack", "", []
        if 400 <= status < 500:
            reason = raw.decode(errors="replace")[:500]
            missing: list[str] = []
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                doc = json.loads(raw)
                reason = str(doc.get("nack", reason))
                if status == 422 and isinstance(doc.get("missing"), list):
                    missing = [str(d) for d in doc["missing"]]
            return "nack", f"{status}: {reason}", missing
        return "error", f"HTTP {status}: {raw[:200].decode(errors='replace')}", []

    def _push_timeout(self, size: int) -> aiohttp.ClientTimeout:
        """The base timeout plus 10 s per MB: a data plane parses and compiles what it is sent
        before it answers, and many of them on one busy host take their time."""
        total = self._timeout_s + 10.0 * size / 1_000_000
        return aiohttp.ClientTimeout(total=total, connect=min(2.0, self._timeout_s))

    def _rollout_done(self, instance: str, slot: str, *, ok: bool) -> None:
        """An ACK (or a NACK, which also stops the later slots of that data plane)."""
        now = time.time()
        for ro in self.rollouts:
            if (instance, slot) in ro.pending:
                ro.pending.discard((instance, slot))
                if ok:
                    ro.acked += 1
                else:
                    ro.nacked += 1
                    ro.pending -= {(instance, s) for s in SLOTS}
                if not ro.pending and ro.completed_at is None:
                    ro.completed_at = now

    def forget_offline(self, dp: DataPlane) -> None:
        """An Offline or deregistered data plane no longer holds up a rollout."""
        for ro in self.rollouts:
            for slot in SLOTS:
                if (dp.instance, slot) in ro.pending:
                    ro.pending.discard((dp.instance, slot))
                    if not ro.pending and ro.completed_at is None:
                        ro.completed_at = time.time()
