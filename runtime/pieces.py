"""The mesh bundle as content-addressed pieces (DESIGN §4, §5): what a delta push carries.

A mesh bundle is split, deterministically, into

* a **manifest** (``MeshManifest``): the mesh settings and the digests of its catalog chunks; it
  is what a push signs (its sha256 is the ``mesh`` slot's digest), so it pins every piece;
* **catalog chunks** (``CatalogPiece``, ``CATALOG_BUCKETS`` of them at most, by a stable hash of
  the service name): each service's catalog entry and the digest of its destination piece;
* **destination pieces** (``DestinationPiece``): one destination's default outbound config.

Every piece is canonical JSON named by its own sha256, so a change to one destination's
defaults changes that piece, its chunk and the manifest (a few KB) and nothing else, and a
sidecar keeps every piece it holds by digest. A sidecar needs the manifest and every chunk (the
whole catalog: which hosts are mesh services, and passthrough for the rest) but only the
destination pieces it reaches; the others are *pending* and fetched on demand.

On the wire (``PUT /bundle`` with ``HDR_PIECES``, and the control plane's pieces answer) a piece
set is newline-delimited: canonical JSON never holds a raw newline, so each line is one piece's
exact bytes and its digest is the sha256 of the line. The first line of a push is the manifest.

This module imports only pydantic, the standard library and ``runtime.bundle``.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from runtime.bundle import (
    BundleError,
    CatalogService,
    Destination,
    LoggingBackend,
    MeshBundle,
    Mtls,
    TracingBackend,
    bundle_digest,
    canonical_json,
    gc_paused,
)

__all__ = [
    "CATALOG_BUCKETS",
    "CatalogPiece",
    "DestinationPiece",
    "MeshManifest",
    "MeshPieces",
    "MeshSet",
    "MissingPieces",
    "assemble",
    "bucket",
    "join_lines",
    "pieces_json_schema",
    "split_lines",
    "split_mesh",
]

CATALOG_BUCKETS = 64
"""Catalog chunks per mesh: one new service or one changed destination rewrites one chunk."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeshManifest(_Frozen):
    """The signed part of a delta push: mesh settings and the catalog chunks, by digest."""

    format: Literal[1] = 1
    type: Literal["mesh-manifest"] = "mesh-manifest"
    mesh: str
    mtls: Mtls = Mtls()
    passthrough: bool = True
    logging: tuple[LoggingBackend, ...] = ()
    tracing: TracingBackend | None = None
    catalog: tuple[str, ...]
    """sha256 hex of each catalog chunk, in bucket order."""


class CatalogPiece(_Frozen):
    type: Literal["catalog"] = "catalog"
    services: dict[str, CatalogService]
    destinations: dict[str, str]
    """Service -> sha256 hex of its destination piece (gateways have none)."""


class DestinationPiece(_Frozen):
    type: Literal["destination"] = "destination"
    service: str
    destination: Destination


_PIECE: TypeAdapter[CatalogPiece | DestinationPiece] = TypeAdapter(CatalogPiece | DestinationPiece)


class MissingPieces(BundleError):
    """A push names pieces this data plane does not hold and was not sent (NACK 422)."""

    def __init__(self, digests: Collection[str]) -> None:
        self.digests = tuple(sorted(digests))
        super().__init__(f"missing {len(self.digests)} piece(s): {', '.join(d[:12] for d in self.digests)}")


def pieces_json_schema() -> dict[str, Any]:
    """One schema for every line of a delta push: the manifest, a catalog chunk, a destination."""
    adapter: TypeAdapter[MeshManifest | CatalogPiece | DestinationPiece] = TypeAdapter(
        Annotated[MeshManifest | CatalogPiece | DestinationPiece, Field(discriminator="type")]
    )
    return adapter.json_schema()


def bucket(name: str) -> int:
    return zlib.crc32(name.encode()) % CATALOG_BUCKETS


def split_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line]


def join_lines(parts: Iterable[bytes]) -> bytes:
    return b"\n".join(parts) + b"\n"


# --- the control plane's side: one mesh bundle -> its pieces -------------------------------------


@dataclass(frozen=True)
class MeshPieces:
    """A mesh bundle's pieces (the control plane's view of one release's mesh bundle)."""

    manifest: bytes
    digest: str
    catalog: tuple[str, ...]
    destinations: Mapping[str, str]
    """Service -> its destination piece's digest."""
    pieces: Mapping[str, bytes]
    """Digest -> bytes, of every chunk and destination piece."""

    def wanted(self, names: Collection[str] | None) -> list[str]:
        """The digests a data plane reaching ``names`` (None: every destination) must hold."""
        dests = self.destinations
        picked = dests.values() if names is None else (dests[n] for n in sorted(names) if n in dests)
        return [*self.catalog, *picked]

    def body(self, digests: Iterable[str]) -> bytes:
        """A delta push: the manifest, then the named pieces."""
        return join_lines([self.manifest, *(self.pieces[d] for d in digests)])


def split_mesh(data: bytes) -> MeshPieces:
    """The pieces of a (canonical, already checked) mesh bundle."""
    with gc_paused():
        raw: dict[str, Any] = json.loads(data)
    pieces: dict[str, bytes] = {}
    dest_digest: dict[str, str] = {}
    for name, conf in raw["destinations"].items():
        piece = canonical_json({"destination": conf, "service": name, "type": "destination"})
        d = dest_digest[name] = bundle_digest(piece)
        pieces[d] = piece
    buckets: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
    for name, entry in raw["services"].items():
        svcs, dests = buckets.setdefault(bucket(name), ({}, {}))
        svcs[name] = entry
        if name in dest_digest:
            dests[name] = dest_digest[name]
    catalog = []
    for _, (svcs, dests) in sorted(buckets.items()):
        piece = canonical_json({"destinations": dests, "services": svcs, "type": "catalog"})
        d = bundle_digest(piece)
        pieces[d] = piece
        catalog.append(d)
    # Every mesh setting goes into the manifest: only the catalog and destinations are pieces.
    head = {k: v for k, v in raw.items() if k not in ("services", "destinations", "type")}
    manifest = canonical_json({**head, "catalog": catalog, "type": "mesh-manifest"})
    return MeshPieces(manifest, bundle_digest(manifest), tuple(catalog), dest_digest, pieces)


# --- the data plane's side: a manifest + pieces -> what runs -------------------------------------


@dataclass(frozen=True)
class MeshSet:
    """What a data plane runs for its mesh slot when it came as pieces: one manifest and pieces
    named by it only (never a mix of two manifests); destinations it does not hold are pending."""

    manifest: MeshManifest
    catalog: Mapping[str, CatalogService]
    index: Mapping[str, str]
    """Service -> its destination piece's digest, from the chunks."""
    held: Mapping[str, Destination]
    pieces: Mapping[str, bytes]
    """Digest -> bytes of every piece held (chunks and destinations): the cache."""

    @functools.cached_property
    def pending(self) -> frozenset[str]:
        return frozenset(n for n in self.index if n not in self.held)

    def bundle(self) -> MeshBundle:
        m = self.manifest
        return MeshBundle(
            mesh=m.mesh,
            mtls=m.mtls,
            passthrough=m.passthrough,
            logging=m.logging,
            tracing=m.tracing,
            services=dict(self.catalog),
            destinations=dict(self.held),
        )

    def with_pieces(self, lines: Iterable[bytes]) -> MeshSet:
        """This set with more destination pieces of the same manifest (an on-demand fetch)."""
        held, pieces = dict(self.held), dict(self.pieces)
        by_digest = {d: n for n, d in self.index.items()}
        for line in lines:
            d = bundle_digest(line)
            name = by_digest.get(d)
            if name is None:
                raise BundleError(f"piece {d[:12]} is not named by the running manifest")
            held[name] = _destination(line, name, d)
            pieces[d] = line
        return MeshSet(self.manifest, self.catalog, self.index, held, pieces)


_PARSED: dict[str, CatalogPiece | DestinationPiece] = {}
"""Digest -> parsed piece: content-addressed, so a piece held across pushes is parsed once."""


def _parse(line: bytes, digest: str | None = None) -> CatalogPiece | DestinationPiece:
    d = digest or bundle_digest(line)
    found = _PARSED.get(d)
    if found is not None:
        return found
    try:
        piece = _PIECE.validate_json(line)
    except ValueError as e:
        raise BundleError(f"piece {d[:12]} does not match the schema: {e}") from e
    if isinstance(piece, CatalogPiece):
        _share_entries(piece)
    if len(_PARSED) > 50_000:
        _PARSED.clear()
    _PARSED[d] = piece
    return piece


_ENTRIES: dict[tuple[Any, ...], CatalogService] = {}
"""One instance per distinct catalog entry: 10,000 services share a few hundred (ports, the same
subsets), and a model each was 11 MB of a scoped sidecar's 10,000-service catalog."""


def _share_entries(piece: CatalogPiece) -> None:
    if len(_ENTRIES) > 100_000:
        _ENTRIES.clear()
    services = piece.services
    for name, entry in services.items():
        key = (entry.port, entry.protocol, entry.gateway, *(tuple(sorted(t.items())) for t in entry.subsets))
        services[name] = _ENTRIES.setdefault(key, entry)


def _destination(line: bytes, name: str, digest: str | None = None) -> Destination:
    piece = _parse(line, digest)
    if not isinstance(piece, DestinationPiece) or piece.service != name:
        raise BundleError(f"piece {bundle_digest(line)[:12]} is not the destination piece of {name!r}")
    return piece.destination


def assemble(
    manifest_bytes: bytes,
    carried: Iterable[bytes],
    cache: Mapping[str, bytes],
    keep: Collection[str] | None,
) -> MeshSet:
    """A new set from a manifest, the pieces that came with it and the ones held before.

    ``keep`` names the destinations the data plane holds now: they must be held under the new
    manifest too (or ``MissingPieces`` names their digests), so a swap never drops a
    destination silently. Every carried piece must be named by the manifest (a forged or
    mismatched piece is a ``BundleError``). ``keep=None`` (a restart from the state dir) holds
    every destination whose piece is at hand and refuses none.
    """
    try:
        manifest = MeshManifest.model_validate_json(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"mesh manifest does not match the schema: {e}") from e
    sent = {bundle_digest(line): line for line in carried}
    have = {**cache, **sent}
    missing = [d for d in manifest.catalog if d not in have]
    if missing:
        raise MissingPieces(missing)
    catalog: dict[str, CatalogService] = {}
    index: dict[str, str] = {}
    for d in manifest.catalog:
        chunk = _parse(have[d], d)
        if not isinstance(chunk, CatalogPiece):
            raise BundleError(f"piece {d[:12]} named as a catalog chunk is a destination piece")
        catalog.update(chunk.services)
        index.update(chunk.destinations)
    named = set(manifest.catalog) | set(index.values())
    forged = [d for d in sent if d not in named]
    if forged:
        raise BundleError(
            f"piece {forged[0][:12]} is not named by the manifest (forged, or for another release)"
        )
    by_digest = {d: n for n, d in index.items()}
    if keep is None:
        want = {d for d in by_digest if d in have}
    else:
        want = {index[n] for n in keep if n in index} | {d for d in sent if d in by_digest}
    lacking = [d for d in want if d not in have]
    if lacking:
        raise MissingPieces(lacking)
    held: dict[str, Destination] = {}
    pieces = {d: have[d] for d in manifest.catalog}
    for d in want:
        if d in have:
            held[by_digest[d]] = _destination(have[d], by_digest[d], d)
            pieces[d] = have[d]
    return MeshSet(manifest, catalog, index, held, pieces)
