"""Last-known-good state on disk, so a restarted data plane serves before anything else answers.

Layout of ``--state-dir``::

    bundles/<sha256>.json   the exact bytes of each accepted bundle or mesh manifest (written once)
    pieces/<sha256>.json    the mesh pieces held (``runtime.pieces``), each named by its hash
    state.json              {"format": 1, "service": ..., "slots": {"mesh"|"service":
                             {"digest", "generation", "pieces"?: true}}, "endpoints":
                             EndpointSet | null, "instance": registered instance name | null,
                             "on_demand"?: [services whose endpoints it fetched on demand]}

A mesh slot that came as pieces is its manifest in ``bundles/`` and its pieces in ``pieces/``;
on load it holds every destination whose piece is there and intact (a partial cache is fine: the
rest is pending and fetched or pushed again), and needs every catalog chunk.

Every file is written to a temporary name, fsynced and renamed over the old one, bundles before
``state.json``, so a crash at any point leaves the previous or the new state, never a mix.
Bundle and piece files no longer named by ``state.json`` are removed afterwards.

A stored endpoint set of the per-service form (``digest``) is checked on load like a push: its
services must make its digest, and it must be a whole set (no ``base``); one that does not is
refused with a warning and the data plane starts without endpoints (routing to none rather than
to addresses nobody pushed) until the control plane pushes a set.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.bundle import BundleError, MeshBundle, ServiceBundle, bundle_digest, load_bundle
from runtime.pieces import MeshSet, assemble
from runtime.protocol import EndpointSet, endpoint_set_digest, service_endpoints_digest

__all__ = ["STATE_FORMAT", "Slot", "StateDir", "StoredState", "endpoints_refusal"]

STATE_FORMAT = 1


@dataclass(frozen=True)
class Slot:
    """An accepted bundle: its exact bytes, digest, push generation and parsed model."""

    data: bytes
    digest: str
    generation: int
    bundle: MeshBundle | ServiceBundle
    pieces: MeshSet | None = None
    """For a mesh slot pushed as pieces: the set (``data`` is then its manifest)."""


@dataclass
class StoredState:
    slots: dict[str, Slot] = field(default_factory=dict)
    endpoints: EndpointSet | None = None
    instance: str | None = None
    on_demand: frozenset[str] = frozenset()
    """Services whose endpoints it fetched on demand (declared to the control plane)."""


def endpoints_refusal(eps: EndpointSet) -> str | None:
    """Why a stored endpoint set cannot be what a control plane pushed; None when it can."""
    if eps.base is not None or eps.removed:
        return "it is a delta, not a whole set"
    if eps.digest is None:
        return "a scoped set without its digest" if eps.scoped else None
    digests = {n: service_endpoints_digest(n, lst) for n, lst in eps.services.items()}
    got = endpoint_set_digest(digests, eps.scoped)
    if got != eps.digest:
        return f"its services make {got[:12]}, not the digest it names ({eps.digest[:12]}): altered"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bundles = path / "bundles"
        self.pieces = path / "pieces"
        self._on_disk: set[str] | None = None
        """Digests of the piece files known to be written whole (None: not listed yet): a save
        writes and removes only the difference, not ~700 ``stat`` calls for a 10,000-service
        catalog at every push."""

    def load(self) -> StoredState:
        """Read the last accepted state; anything unreadable is skipped with a warning."""
        out = StoredState()
        try:
            raw = json.loads((self.path / "state.json").read_bytes())
        except FileNotFoundError:
            return out
        except (OSError, ValueError) as e:
            _warn(f"ignoring unreadable {self.path / 'state.json'}: {e}")
            return out
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            _warn(f"ignoring {self.path / 'state.json'}: unknown format")
            return out
        for role, info in (raw.get("slots") or {}).items():
            try:
                digest = str(info["digest"])
                data = (self.bundles / f"{digest}.json").read_bytes()
                generation = int(info.get("generation", 0))
                if info.get("pieces"):
                    if bundle_digest(data) != digest:
                        raise BundleError(f"manifest {digest[:12]} is damaged")
                    ms = assemble(data, (), self._read_pieces(), None)
                    out.slots[role] = Slot(data, digest, generation, ms.bundle(), ms)
                else:
                    out.slots[role] = Slot(data, digest, generation, load_bundle(data, digest))
            except (OSError, KeyError, TypeError, ValueError, BundleError) as e:
                _warn(f"ignoring stored {role} bundle: {e}")
        if raw.get("endpoints") is not None:
            try:
                eps = EndpointSet.model_validate(raw["endpoints"])
            except ValueError as e:
                _warn(f"ignoring stored endpoints: {e}")
            else:
                why = endpoints_refusal(eps)
                if why is None:
                    out.endpoints = eps
                else:
                    _warn(f"refusing the stored endpoint set in {self.path / 'state.json'}: {why}")
        on_demand = raw.get("on_demand")
        if isinstance(on_demand, list):
            out.on_demand = frozenset(n for n in on_demand if isinstance(n, str))
        instance = raw.get("instance")
        out.instance = instance if isinstance(instance, str) else None
        return out

    def _read_pieces(self) -> dict[str, bytes]:
        """The intact pieces on disk; a damaged one is removed (so it is written again)."""
        out: dict[str, bytes] = {}
        for path in self.pieces.glob("*.json"):
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                if bundle_digest(data) == path.stem:
                    out[path.stem] = data
                else:
                    _warn(f"removing damaged piece {path}")
                    path.unlink()
        self._on_disk = set(out)
        return out

    def _pieces_on_disk(self) -> set[str]:
        if self._on_disk is None:
            self._on_disk = {p.stem for p in self.pieces.glob("*.json")} if self.pieces.is_dir() else set()
        return self._on_disk

    def save(self, service: str, state: StoredState) -> None:
        """Persist ``state`` atomically (blocking: call it from a worker thread)."""
        self.bundles.mkdir(parents=True, exist_ok=True)
        for slot in state.slots.values():
            path = self.bundles / f"{slot.digest}.json"
            if not path.exists():
                _write_atomic(path, slot.data)
        held = {
            d: p for s in state.slots.values() if s.pieces is not None for d, p in s.pieces.pieces.items()
        }
        # Catalog nodes whose bytes were dropped once stored (``MeshSet.stored``) stay on disk.
        nodes = [s.pieces.nodes for s in state.slots.values() if s.pieces is not None]
        named = held.keys() | {d for n in nodes for d in n}
        on_disk = self._pieces_on_disk()
        new = [d for d in held if d not in on_disk]
        if new:
            self.pieces.mkdir(exist_ok=True)
            for digest in new:
                _write_atomic(self.pieces / f"{digest}.json", held[digest])
                on_disk.add(digest)
            _fsync_dir(self.pieces)
        _fsync_dir(self.bundles)
        doc: dict[str, Any] = {
            "format": STATE_FORMAT,
            "service": service,
            "slots": {
                r: {"digest": s.digest, "generation": s.generation, **({"pieces": True} if s.pieces else {})}
                for r, s in sorted(state.slots.items())
            },
            "endpoints": state.endpoints.model_dump(mode="json") if state.endpoints else None,
            "instance": state.instance,
        }
        if state.on_demand:
            doc["on_demand"] = sorted(state.on_demand)
        _write_atomic(self.path / "state.json", json.dumps(doc, sort_keys=True).encode())
        _fsync_dir(self.path)
        keep = {f"{s.digest}.json" for s in state.slots.values()}
        for old in self.bundles.glob("*.json"):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()
        for digest in [d for d in on_disk if d not in named]:
            on_disk.discard(digest)
            with contextlib.suppress(OSError):
                (self.pieces / f"{digest}.json").unlink()


def _warn(message: str) -> None:
    print(f"meshc: {message}", file=sys.stderr, flush=True)
