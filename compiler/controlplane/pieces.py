"""The control plane's side of delta pushes: each release's mesh bundle as pieces, and scopes.

``runtime.pieces`` defines the split; this keeps the last few mesh bundles' pieces (a data plane
that lags one release behind still finds what it asks for) and, per service bundle, the
destinations its policies name: what a scoped data plane gets pushed ahead (the others on
demand).

A mesh bundle the compiler hands over in parts (``compiler.build.MeshParts``) is split
incrementally (``split_parts``): only the destinations whose fragment changed since the last
split are serialized and hashed again, and only the catalog chunks holding them (the index
pieces above them are cheap: a few dozen at 10,000 services); the pieces are
byte for byte those ``runtime.pieces.split_mesh`` cuts from the whole bundle (a test holds them
to it). At 10,000 services that is a few milliseconds instead of a parse of the 6 MB bundle.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from compiler.build import MeshParts, json_key
from runtime.bundle import bundle_digest, canonical_json, gc_paused
from runtime.pieces import ChunkCache, MeshPieces, catalog_tree, split_mesh

__all__ = ["PieceStore", "SplitState", "named_destinations", "split_parts"]


def named_destinations(service_bundle: bytes) -> frozenset[str]:
    """The destinations a service bundle configures, and every service their splits go to."""
    raw: dict[str, Any] = json.loads(service_bundle)
    names = set(raw.get("outbound") or {})
    for dest in (raw.get("outbound") or {}).values():
        for rule in dest.get("route", ()):
            conf = rule.get("conf") or {}
            splits = [*conf.get("split", ()), *(s for h in conf.get("http", ()) for s in h.get("split", ()))]
            names.update(s["service"] for s in splits if "service" in s)
    gw = raw.get("gateway") or {}
    for listener in gw.get("listeners", ()):
        backends = [*listener.get("tcp_backends", ())]
        for rule in listener.get("rules", ()):
            backends += rule.get("backends", ())
            backends += [f["mirror"] for f in rule.get("filters", ()) if f.get("mirror")]
        names.update(b["service"] for b in backends if "service" in b)
    return frozenset(names)


@dataclass
class SplitState:
    """What the last split of one mesh's parts left, for the next to reuse."""

    dests: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    """Destination -> (its fragment, its piece's digest, the piece)."""
    chunks: ChunkCache = field(default_factory=dict)
    """Catalog chunks by their members (``runtime.pieces.catalog_tree``)."""


def split_parts(parts: MeshParts, prev: SplitState | None = None) -> tuple[MeshPieces, SplitState]:
    """``split_mesh(parts.data())``, re-serializing only what changed since ``prev``."""
    with gc_paused():
        return _split_parts(parts, prev)


def _split_parts(parts: MeshParts, prev: SplitState | None) -> tuple[MeshPieces, SplitState]:
    old = prev.dests if prev is not None else {}
    state = SplitState()
    pieces: dict[str, bytes] = {}
    dest_digest: dict[str, str] = {}
    for name, frag in parts.destinations.items():
        hit = old.get(name)
        if hit is None or (hit[0] is not frag and hit[0] != frag):
            piece = f'{{"destination":{frag},"service":{json_key(name)},"type":"destination"}}'.encode()
            hit = (frag, bundle_digest(piece), piece)
        state.dests[name] = hit
        dest_digest[name] = hit[1]
        pieces[hit[1]] = hit[2]
    entries = {name: (json_key(name), entry) for name, entry in parts.services.items()}
    tree, top, children = catalog_tree(
        sorted(entries),
        entries,
        dest_digest,
        pieces,
        reuse=prev.chunks if prev is not None else None,
        keep=state.chunks,
    )
    head = json.loads(f'{{{parts.head},"tracing":{parts.tracing}}}')
    settings = {k: v for k, v in head.items() if k not in ("type", "format")}
    manifest = canonical_json({**settings, "catalog": top, "format": 2, "type": "mesh-manifest"})
    return MeshPieces(manifest, bundle_digest(manifest), tree, dest_digest, pieces, children), state


class PieceStore:
    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._meshes: OrderedDict[str, MeshPieces] = OrderedDict()
        self._named: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._split: dict[str, SplitState] = {}
        """Mesh name -> what its last split from parts left."""

    def split_parts(self, mesh: str, parts: MeshParts) -> MeshPieces:
        """The pieces of a mesh bundle from the compiler's parts of it, split incrementally
        against this mesh's last split. Safe off the event loop (it touches only the split
        state, which one compile at a time uses); ``add`` the result on the loop."""
        pieces, self._split[mesh] = split_parts(parts, self._split.get(mesh))
        return pieces

    def mesh(self, digest: str, data: bytes) -> MeshPieces:
        """The pieces of the mesh bundle ``digest`` (split once)."""
        found = self._meshes.get(digest)
        if found is None:
            found = self._meshes[digest] = split_mesh(data)
            while len(self._meshes) > self._keep:
                self._meshes.popitem(last=False)
        else:
            self._meshes.move_to_end(digest)
        return found

    def has(self, digest: str) -> bool:
        return digest in self._meshes

    def add(self, digest: str, pieces: MeshPieces) -> None:
        """Pieces split elsewhere (off the event loop: a 10,000-service mesh bundle takes ~1 s)."""
        self._meshes[digest] = pieces
        self._meshes.move_to_end(digest)
        while len(self._meshes) > self._keep:
            self._meshes.popitem(last=False)

    def by_manifest(self, digest: str) -> MeshPieces | None:
        """The pieces whose manifest (of any format made so far) is ``digest``."""
        for mp in reversed(self._meshes.values()):
            for view in mp.views():
                if view.digest == digest:
                    return view
        return None

    def named(self, digest: str, data: bytes) -> frozenset[str]:
        found = self._named.get(digest)
        if found is None:
            found = self._named[digest] = named_destinations(data)
            while len(self._named) > 4096:
                self._named.popitem(last=False)
        return found

    def find(self, digests: Iterable[str]) -> dict[str, bytes]:
        """The pieces held for these digests, newest mesh bundle first."""
        out: dict[str, bytes] = {}
        for d in digests:
            for mp in reversed(self._meshes.values()):
                piece = mp.pieces.get(d)
                if piece is not None:
                    out[d] = piece
                    break
        return out
