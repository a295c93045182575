"""The running configuration of a data plane and the only way it changes: a checked push.

``Pushes`` owns the bundle slots, the endpoint set and the instance id, their copy in the state
dir, and the admin API's two writes. A push is parsed and checked (signature, format, schema,
digest, generation), compiled into a new snapshot, written to the state dir, and only then
swapped in; any failure on the way is a NACK that changes nothing. The lifecycle around it
(listeners, registration, drain) is ``runtime.server``'s.

The mesh slot may come as pieces (``runtime.pieces``): a signed manifest and the pieces this
data plane lacks, reusing the ones it holds by digest; the swap is to the whole new set or
nothing. A destination the manifest names but this data plane does not hold is fetched from the
control plane at its first request (``fetch``), checked against the manifest's digest and added
to the same set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from runtime._match import SERVICE_TAG
from runtime.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    MeshBundle,
    ServiceBundle,
    bundle_digest,
    load_bundle,
)
from runtime.decide import FETCH_TIMEOUT_S
from runtime.endpoints import EndpointFetch, EndpointsRefused, apply, running_digest
from runtime.engine import Engine, Snapshot
from runtime.metrics import Metrics
from runtime.pieces import MeshSet, MissingPieces, assemble, split_lines
from runtime.protocol import EndpointSet, PushTarget, SignedEndpoints
from runtime.security import PushTrust
from runtime.state import Slot, StateDir, StoredState

__all__ = ["PieceFetcher", "Pushes", "StartupError"]

PieceFetcher = Callable[[list[str]], Awaitable[list[bytes]]]
"""Asks the control plane for pieces by digest (``POST /api/v1/pieces``)."""


class StartupError(Exception):
    """The data plane cannot start (exit code 2)."""


class Pushes:
    """Bundles and endpoints: loaded at start, replaced by signed pushes, kept on disk."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        state: StateDir | None,
        trust: PushTrust,
        on_install: Callable[[Snapshot], None],
        on_service_bundle: Callable[[], Awaitable[None]],
        *,
        mesh: str = "default",
        registers: bool = False,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.state = state
        self.trust = trust
        self.slots: dict[str, Slot] = {}
        self.endpoints: EndpointSet | None = None
        self.endpoints_signed: SignedEndpoints | None = None
        """The running set as pushed, with its signature (reported when registering again)."""
        self.instance: str | None = None
        self.mesh = mesh
        self.boot_id = secrets.token_hex(16)
        """Drawn at every start and sent at registration: pushes are signed for it (docs/security.md)."""
        self._registers = registers
        self.registered = False
        """Set by the registration of this boot; with a control plane nothing is accepted before."""
        self._on_install = on_install
        self._on_service_bundle = on_service_bundle
        self._lock = asyncio.Lock()
        self.fetcher: PieceFetcher | None = None
        """Set once a control plane is known (``runtime.server``)."""
        self._fetching: dict[str, asyncio.Future[str | None]] = {}
        self.endpoint_fetch = EndpointFetch(engine)
        """Endpoints a scoped set lacks, on demand (``runtime.endpoints``)."""
        self._eps_digests: dict[str, str] | None = None
        self._trim_due = False
        """Per-service digests of the running endpoint set (per-service form), for deltas."""

    def load(self, mesh_file: Path | None, service_file: Path | None, endpoints_file: Path | None) -> None:
        """The last-known-good state (the state dir, then files given at start), compiled and
        installed before a listener is bound; raises ``StartupError``."""
        stored = self.state.load() if self.state else StoredState()
        slots = dict(stored.slots)
        for path in (mesh_file, service_file):
            if path is None:
                continue
            try:
                data = path.read_bytes()
                stem = path.stem
                expected = stem if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None
                bundle = load_bundle(data, expected)
            except (OSError, BundleError) as e:
                raise StartupError(f"cannot load bundle {path}: {e}") from e
            role: str = bundle.type
            # A pushed bundle (generation > 0) in the state dir is newer than a file given at start.
            if role not in slots or slots[role].generation == 0:
                slots[role] = Slot(data, bundle_digest(data), 0, bundle)
        endpoints = stored.endpoints
        if endpoints_file is not None:
            try:
                from_file = EndpointSet.model_validate_json(endpoints_file.read_bytes())
            except (OSError, ValueError) as e:
                raise StartupError(f"cannot load endpoints {endpoints_file}: {e}") from e
            if endpoints is None or from_file.generation >= endpoints.generation:
                endpoints = from_file
        svc = slots.get("service")
        if not self.engine.service:
            if svc is not None:
                assert isinstance(svc.bundle, ServiceBundle)
                self.engine.service = svc.bundle.service
            else:
                raise StartupError("--service is required without a service bundle")
            self.engine.tags[SERVICE_TAG] = self.engine.service
        try:
            snap = self._build(slots, endpoints)
        except BundleError as e:
            raise StartupError(f"stored or given configuration cannot be enforced: {e}") from e
        self.engine.install(snap)
        self._on_install(snap)
        changed = slots != stored.slots or endpoints != stored.endpoints
        self.slots, self.endpoints, self.instance = slots, endpoints, stored.instance
        self.endpoint_fetch.on_demand.update(stored.on_demand)
        for role, slot in slots.items():
            self.metrics.set_bundle(role, slot.digest)
            self.metrics.reloads.labels(role, "loaded").inc()
        if endpoints is not None:
            self.metrics.endpoints_generation.set(endpoints.generation)
        if changed and self.state is not None:
            self.state.save(self.engine.service, self._stored())
        self._stored_pieces()
        if stored.slots.get("mesh") is not None:
            trim_heap()  # a restart read the whole catalog from the state dir

    def target(self) -> PushTarget | None:
        """Who a push must be signed for; None while registration in this boot is pending."""
        if self._registers and not (self.registered and self.instance):
            return None
        return PushTarget(self.mesh, self.engine.service, self.instance or "", self.boot_id)

    def running(self) -> tuple[dict[str, str], dict[str, int]]:
        """(slot -> digest, slot -> generation) of what runs, endpoints included (heartbeats)."""
        digests = {r: s.digest for r, s in self.slots.items()}
        gens = {r: s.generation for r, s in self.slots.items()}
        if self.endpoints is not None:
            digests["endpoints"] = running_digest(self.endpoints)
            gens["endpoints"] = self.endpoints.generation
        return digests, gens

    def _build(self, slots: dict[str, Slot], endpoints: EndpointSet | None) -> Snapshot:
        mesh_slot = slots.get("mesh")
        mesh = mesh_slot.bundle if mesh_slot is not None else None
        svc = slots["service"].bundle if "service" in slots else None
        assert mesh is None or isinstance(mesh, MeshBundle)
        assert svc is None or isinstance(svc, ServiceBundle)
        pending = mesh_slot.pieces.pending if mesh_slot is not None and mesh_slot.pieces else ()
        return self.engine.build(mesh, svc, endpoints, pending)

    def _stored(self) -> StoredState:
        return StoredState(
            dict(self.slots), self.endpoints, self.instance, frozenset(self.endpoint_fetch.on_demand)
        )

    async def persist_quietly(self) -> None:
        """Store the state (a new instance id); a failure waits for the next change."""
        async with self._lock:
            with contextlib.suppress(OSError):
                await self._persist()

    async def _persist(self) -> None:
        if self.state is not None:
            await asyncio.to_thread(self.state.save, self.engine.service, self._stored())
        self._stored_pieces()

    def _stored_pieces(self) -> None:
        """What runs is stored (or there is no state dir to store it in): the mesh set's catalog
        node bytes can go (``MeshSet.stored``)."""
        mesh = self.slots.get("mesh")
        if mesh is not None and mesh.pieces is not None:
            mesh.pieces.stored()

    async def push_bundle(
        self,
        body: bytes,
        digest: str | None,
        generation: int,
        role: str | None,
        signature: str | None = None,
        pieces: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        self.metrics.push_bytes.labels(role if role in ("mesh", "service") else "bundle").inc(len(body))
        if not digest:
            return self.nack("bundle", 400, "missing X-Meshc-Digest header")
        # Only the control plane may change this data plane (DESIGN §6): the signature covers this
        # data plane (mesh, service, instance, boot), the slot, the claimed digest (checked against
        # the body below) and the generation.
        slot = role if role in ("mesh", "service") else _slot_of(body)
        refused = self.trust.check(signature, self.target(), slot, digest, generation)
        if refused is not None:
            why = _reason_label(signature, self.trust.key, self.target())
            self.metrics.push_rejections.labels(role or "bundle", why).inc()
            return self.nack(role or "bundle", 403, refused)
        if role not in (None, "mesh", "service"):
            return self.nack("bundle", 400, f"unknown bundle role {role!r}")
        if pieces:
            if role != "mesh":
                return self.nack(role or "bundle", 400, "pieces fill the mesh slot only")
            return await self._push_pieces(body, digest, generation)
        try:
            bundle = (
                await asyncio.to_thread(load_bundle, body, digest)
                if len(body) > 256 * 1024
                else load_bundle(body, digest)
            )
        except BundleError as e:
            return self.nack(role or "bundle", 413 if len(body) > MAX_BUNDLE_BYTES else 400, str(e))
        kind = bundle.type
        if role is not None and role != kind:
            return self.nack(kind, 400, f"pushed as the {role} bundle but it is a {kind} bundle")
        async with self._lock:
            current = self.slots.get(kind)
            if current is not None and generation < current.generation:
                return self.nack(kind, 409, f"stale generation {generation}; running {current.generation}")
            if current is not None and current.digest == digest:
                return await self._same(kind, current, generation)
            return await self._swap(kind, Slot(body, digest, generation, bundle))

    async def _same(self, kind: str, current: Slot, generation: int) -> tuple[int, dict[str, Any]]:
        """The running digest pushed again: acknowledged, only its generation moves."""
        if generation > current.generation:
            self.slots[kind] = Slot(current.data, current.digest, generation, current.bundle, current.pieces)
            await self._persist()
        return 200, {"ack": current.digest}

    async def _swap(self, kind: str, slot: Slot) -> tuple[int, dict[str, Any]]:
        """Compile, store, then install ``slot`` (under the lock); a NACK on any failure."""
        slots = {**self.slots, kind: slot}
        try:
            snap = self._build(slots, self.endpoints)
        except BundleError as e:
            return self.nack(kind, 400, str(e))
        old = self.slots
        self.slots = slots
        try:
            await self._persist()
        except OSError as e:
            self.slots = old
            return self.nack(kind, 500, f"cannot store the bundle in the state dir: {e}")
        self._install(snap)
        self.metrics.set_bundle(kind, slot.digest)
        self.metrics.reloads.labels(kind, "ack").inc()
        if kind == "service":
            await self._on_service_bundle()
        return 200, {"ack": slot.digest}

    async def _push_pieces(self, body: bytes, digest: str, generation: int) -> tuple[int, dict[str, Any]]:
        """A delta push of the mesh slot: the manifest (whose digest the signature covered) and
        the pieces this data plane lacks; the new set keeps every destination held now."""
        lines = split_lines(body)
        if not lines or bundle_digest(lines[0]) != digest:
            got = bundle_digest(lines[0]) if lines else "nothing"
            return self.nack("mesh", 400, f"digest mismatch: the manifest hashes to {got}, not {digest}")
        async with self._lock:
            current = self.slots.get("mesh")
            if current is not None and generation < current.generation:
                return self.nack("mesh", 409, f"stale generation {generation}; running {current.generation}")
            held = current.pieces if current is not None else None
            if current is not None and current.digest == digest and len(lines) == 1:
                return await self._same("mesh", current, generation)
            cache = held.pieces if held is not None else {}
            keep = tuple(held.held) if held is not None else ()
            try:
                # Incremental from the running set: only what changed is parsed and applied.
                ms = (
                    await asyncio.to_thread(assemble, lines[0], lines[1:], cache, keep, held)
                    if len(body) > 256 * 1024
                    else assemble(lines[0], lines[1:], cache, keep, held)
                )
            except MissingPieces as e:
                self.metrics.pieces.labels("pushed", "failed").inc()
                status, reply = self.nack("mesh", 422, str(e))
                return status, {**reply, "missing": list(e.digests)}
            except BundleError as e:
                self.metrics.pieces.labels("pushed", "failed").inc()
                return self.nack("mesh", 400, str(e))
            self.metrics.pieces.labels("pushed", "ok").inc(len(lines) - 1)
            done = await self._swap("mesh", Slot(lines[0], digest, generation, ms.bundle(), ms))
        if len(body) > 1_000_000:
            trim_heap()
        return done

    # --- on demand ------------------------------------------------------------------------

    async def fetch(self, service: str) -> str | None:
        """Hold ``service``'s destination piece and the endpoints it routes to (fetched from the
        control plane, each bounded by ``FETCH_TIMEOUT_S``): None once held, else why not."""
        why = await self._fetch_piece_of(service)
        return why if why is not None else await self.endpoint_fetch.ensure(service)

    async def _fetch_piece_of(self, service: str) -> str | None:
        """Hold ``service``'s destination piece: one fetch per piece at a time, however many
        requests wait for it."""
        for _ in range(2):  # a push may swap the manifest while a fetch is on its way
            slot = self.slots.get("mesh")
            ms = slot.pieces if slot is not None else None
            if ms is None or service not in ms.pending:
                return None
            if self.fetcher is None:
                return "no control plane to fetch it from"
            digest = ms.index[service]
            fut = self._fetching.get(digest)
            if fut is None:
                self.endpoint_fetch.on_demand.add(service)  # its endpoints come with its piece
                fut = self._fetching[digest] = asyncio.ensure_future(self._fetch(service, digest))
                fut.add_done_callback(self._fetched)
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S):
                    why = await asyncio.shield(fut)
            except TimeoutError:
                return f"no answer from the control plane in {FETCH_TIMEOUT_S:.0f}s"
            if why is not None:
                return why
        return None

    def _fetched(self, fut: asyncio.Future[str | None]) -> None:
        for d, f in list(self._fetching.items()):
            if f is fut:
                del self._fetching[d]

    async def _fetch(self, service: str, digest: str) -> str | None:
        assert self.fetcher is not None
        try:
            lines = [line for line in await self.fetcher([digest]) if bundle_digest(line) == digest]
        except (OSError, TimeoutError, ValueError) as e:
            self.metrics.pieces.labels("fetched", "failed").inc()
            return f"control plane: {e}"
        if not lines:
            self.metrics.pieces.labels("fetched", "failed").inc()
            return f"the control plane did not send piece {digest[:12]}"
        async with self._lock:
            slot = self.slots.get("mesh")
            ms = slot.pieces if slot is not None else None
            if slot is None or ms is None or ms.index.get(service) != digest or service not in ms.pending:
                return None  # swapped meanwhile: the caller looks again
            try:
                grown: MeshSet = ms.with_pieces(lines[:1])
                slots = {
                    **self.slots,
                    "mesh": Slot(slot.data, slot.digest, slot.generation, grown.bundle(), grown),
                }
                snap = self._build(slots, self.endpoints)
            except BundleError as e:
                self.metrics.pieces.labels("fetched", "failed").inc()
                return str(e)
            self.slots = slots
            with contextlib.suppress(OSError):  # kept in memory; stored with the next change
                await self._persist()
            self._install(snap)
            self.metrics.pieces.labels("fetched", "ok").inc()
        return None

    async def push_endpoints(
        self, body: bytes, generation: int | None = None, signature: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        self.metrics.push_bytes.labels("endpoints").inc(len(body))
        if not self.trust.insecure:
            if generation is None:
                return self.nack("endpoints", 400, "missing X-Meshc-Generation header")
            refused = self.trust.check(
                signature, self.target(), "endpoints", hashlib.sha256(body).hexdigest(), generation
            )
            if refused is not None:
                why = _reason_label(signature, self.trust.key, self.target())
                self.metrics.push_rejections.labels("endpoints", why).inc()
                return self.nack("endpoints", 403, refused)
        try:
            endpoints = EndpointSet.model_validate_json(body)
        except ValueError as e:
            return self.nack("endpoints", 400, f"endpoint set does not match the schema: {e}")
        if generation is not None and endpoints.generation != generation and not self.trust.insecure:
            return self.nack(
                "endpoints", 400, f"X-Meshc-Generation {generation} is not the body's {endpoints.generation}"
            )
        async with self._lock:
            current = self.endpoints
            if current is not None and endpoints.generation < current.generation:
                return self.nack(
                    "endpoints", 409, f"stale generation {endpoints.generation}; running {current.generation}"
                )
            try:
                whole, digests = apply(current, self._eps_digests, endpoints)
                snap = self._build(self.slots, whole)
            except EndpointsRefused as e:
                return self.nack("endpoints", e.status, str(e))
            except BundleError as e:
                return self.nack("endpoints", 400, str(e))
            # The set and the signed push that made it change together: a registration made
            # while the state is being saved reports both, and a control plane that took an
            # older signed set with the newer digest sent deltas over a base it does not run.
            signed_before = self.endpoints_signed
            self.endpoints = whole
            self.endpoints_signed = (
                SignedEndpoints(
                    body=body.decode(),
                    signature=signature,
                    assembled=whole.model_dump_json() if endpoints.base else None,
                )
                if signature is not None
                else None
            )
            try:
                await self._persist()
            except OSError as e:
                self.endpoints, self.endpoints_signed = current, signed_before
                return self.nack("endpoints", 500, f"cannot store the endpoints in the state dir: {e}")
            self._eps_digests = digests
            self._install(snap)
            self.metrics.endpoints_generation.set(whole.generation)
            self.metrics.reloads.labels("endpoints", "ack").inc()
            return 200, {"ack": hashlib.sha256(body).hexdigest()}

    def _install(self, snap: Snapshot) -> None:
        self.engine.install(snap)
        self._on_install(snap)
        self._trim_due = True

    def settle(self) -> None:
        """Called when nothing is being installed (each heartbeat): after an install, give the
        C heap's free pages back once. Trimming right after a push is too early: the state
        save, the swap and the first requests on the new snapshot free more (a 10,000-service
        scoped sidecar held 2.3 MB free that a later ``malloc_trim`` returned)."""
        if self._trim_due and not self._lock.locked():
            self._trim_due = False
            trim_heap()

    def nack(self, kind: str, status: int, reason: str) -> tuple[int, dict[str, Any]]:
        self.metrics.reloads.labels(kind, "nack").inc()
        print(f"meshc: NACK {kind}: {reason}", file=sys.stderr, flush=True)
        return status, {"nack": reason}


def trim_heap() -> None:
    """Give the C heap's free pages back after a large push (glibc keeps them): parsing a
    10,000-service catalog leaves ~2.5 MB of a sidecar's RSS free but held (issue 11 item 4)."""
    global _LIBC
    if _LIBC is None:
        import ctypes  # here, not at start-up: ctypes costs an idle sidecar ~0.5 MB it rarely needs

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _slot_of(body: bytes) -> str:
    """The slot a bundle pushed without a role fills (its ``type``), read before it is verified
    only to name what the signature must cover; an unreadable body names none."""
    try:
        kind = json.loads(body).get("type")
    except (ValueError, AttributeError):
        return "bundle"
    return kind if kind in ("mesh", "service") else "bundle"


def _reason_label(signature: str | None, key: str | None, target: PushTarget | None) -> str:
    if key is None:
        return "untrusted"
    if target is None:
        return "unregistered"
    return "unsigned" if not signature else "bad_signature"
