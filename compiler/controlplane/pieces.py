"""The control plane's side of delta pushes: each release's mesh bundle as pieces, and scopes.

``runtime.pieces`` defines the split; this keeps the last few mesh bundles' pieces (a data plane
that lags one release behind still finds what it asks for) and, per service bundle, the
destinations its policies name: what a scoped data plane gets pushed ahead (the others on
demand).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from runtime.pieces import MeshPieces, split_mesh

__all__ = ["PieceStore", "named_destinations"]


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


class PieceStore:
    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._meshes: OrderedDict[str, MeshPieces] = OrderedDict()
        self._named: OrderedDict[str, frozenset[str]] = OrderedDict()

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
        return next((mp for mp in reversed(self._meshes.values()) if mp.digest == digest), None)

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
