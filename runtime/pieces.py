"""The mesh bundle as content-addressed pieces (DESIGN §4, §5): what a delta push carries.

A mesh bundle is split, deterministically, into

* a **manifest** (``MeshManifest``): the mesh settings and the digests of the top catalog
  nodes; it is what a push signs (its sha256 is the ``mesh`` slot's digest), so it pins every
  piece;
* a **catalog tree** of small pieces: **catalog chunks** (``CatalogPiece``, the leaves: ~16
  services each, with each service's entry and the digest of its destination piece) under
  **index pieces** (``IndexPiece``: the digests of ~16 nodes of the level below), as many
  levels as it takes for the manifest to name at most ``SHAPE.top`` nodes;
* **destination pieces** (``DestinationPiece``): one destination's default outbound config.

The tree is a prolly tree (a Merkle tree cut by content): services are sorted by name and a
chunk ends after a name whose hash is 0 modulo 16 (or at 64 services), a level-``k`` index
piece after a child whose last name's hash is 0 modulo 16^(k+1) (or at 64 children). The cuts
depend only on the names next to them, not on how many services the mesh has, so a change to
one destination's defaults changes that piece, one chunk, the index pieces above it and the
manifest (a few KB, growing with the log of the mesh, not with the mesh), and a new service
does the same; nothing is re-sent as the mesh grows. A sidecar keeps every piece it holds by
digest. It needs the manifest and the whole tree (the whole catalog: which hosts are mesh
services, and passthrough for the rest) but only the destination pieces it reaches; the others
are *pending* and fetched on demand. It assembles a new set from the one it runs: subtrees it
holds are not parsed again, and only the chunks that changed touch its catalog.

On the wire (``PUT /bundle`` with ``HDR_PIECES``, and the control plane's pieces answer) a piece
set is newline-delimited: canonical JSON never holds a raw newline, so each line is one piece's
exact bytes and its digest is the sha256 of the line. The first line of a push is the manifest.

Formats (``FORMATS``): a format 1 manifest (before the tree) names the catalog chunks, flat; a
format 2 one names the top nodes of the tree. Data planes from before format 2 run format 1 only
(and declare nothing on registration); later ones declare ``Registration.pieces_formats`` and
the control plane serves the newest format both speak. A release's format 1 view
(``MeshPieces.as_format``) is its format 2 tree's chunks under a flat manifest: the same pieces,
so it costs one small manifest, made only when some data plane needs it.

This module imports only pydantic, the standard library and ``runtime.bundle``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import json.scanner
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

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
    "FORMATS",
    "MAX_DEPTH",
    "SHAPE",
    "CatalogPiece",
    "ChunkCache",
    "DestinationPiece",
    "IndexPiece",
    "MeshManifest",
    "MeshPieces",
    "MeshSet",
    "MissingPieces",
    "TreeShape",
    "assemble",
    "catalog_tree",
    "choose_format",
    "join_lines",
    "pieces_json_schema",
    "split_lines",
    "split_mesh",
]


@dataclass(frozen=True)
class TreeShape:
    """How the control plane cuts the catalog tree (a data plane takes any shape)."""

    chunk: int = 16
    """Services per catalog chunk, on average."""
    max_chunk: int = 64
    fanout: int = 16
    """Children per index piece, on average."""
    max_fanout: int = 64
    top: int = 32
    """At most this many nodes named by the manifest."""


SHAPE = TreeShape()
FORMATS: tuple[int, ...] = (1, 2)
"""The manifest formats this version cuts and runs (a data plane declares them on registration)."""
MAX_DEPTH = 12
"""Levels of index pieces a data plane follows at most (16^12 chunks: a bound, never reached)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeshManifest(_Frozen):
    """The signed part of a delta push: mesh settings and the top catalog nodes, by digest."""

    format: Literal[1, 2] = 2
    """2: ``catalog`` names chunks or index pieces; 1 (before the tree): chunks only."""
    type: Literal["mesh-manifest"] = "mesh-manifest"
    mesh: str
    mtls: Mtls = Mtls()
    passthrough: bool = True
    logging: tuple[LoggingBackend, ...] = ()
    tracing: TracingBackend | None = None
    catalog: tuple[str, ...]
    """sha256 hex of each top catalog node (a chunk or an index piece), in name order."""


class CatalogPiece(_Frozen):
    type: Literal["catalog"] = "catalog"
    services: dict[str, CatalogService]
    destinations: dict[str, str]
    """Service -> sha256 hex of its destination piece (gateways have none)."""


class IndexPiece(_Frozen):
    type: Literal["index"] = "index"
    catalog: tuple[str, ...]
    """sha256 hex of each node of the level below (chunks or index pieces), in name order."""


class DestinationPiece(_Frozen):
    type: Literal["destination"] = "destination"
    service: str
    destination: Destination


Piece = CatalogPiece | IndexPiece | DestinationPiece
_PIECE: TypeAdapter[Piece] = TypeAdapter(Annotated[Piece, Field(discriminator="type")])


class MissingPieces(BundleError):
    """A push names pieces this data plane does not hold and was not sent (NACK 422)."""

    def __init__(self, digests: Collection[str]) -> None:
        self.digests = tuple(sorted(digests))
        super().__init__(f"missing {len(self.digests)} piece(s): {', '.join(d[:12] for d in self.digests)}")


def pieces_json_schema() -> dict[str, Any]:
    """One schema for every line of a delta push: the manifest, a catalog chunk, an index
    piece, a destination."""
    adapter: TypeAdapter[MeshManifest | Piece] = TypeAdapter(
        Annotated[MeshManifest | CatalogPiece | IndexPiece | DestinationPiece, Field(discriminator="type")]
    )
    return adapter.json_schema()


def choose_format(declared: Collection[int] | None, produced: Collection[int] = FORMATS) -> int | None:
    """The manifest format to serve a data plane that declared ``declared`` (None: from before
    the declaration, which runs format 1 only): the newest both sides speak; None if no format
    is common (the data plane is told so in the control plane's status, and nothing is pushed)."""
    if declared is None:
        return 1 if 1 in produced else None
    common = set(declared) & set(produced)
    return max(common) if common else None


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
    """Every catalog node (index pieces, then chunks), top down."""
    destinations: Mapping[str, str]
    """Service -> its destination piece's digest."""
    pieces: Mapping[str, bytes]
    """Digest -> bytes, of every catalog node and destination piece."""
    children: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Index piece -> the nodes it names."""
    format: int = 2
    """The manifest's format (``FORMATS``)."""
    _since: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)
    _views: dict[int, MeshPieces] = field(default_factory=dict, compare=False, repr=False)

    def as_format(self, fmt: int) -> MeshPieces:
        """These pieces under a manifest of format ``fmt`` (made once, on first use).

        Format 1 (data planes from before the tree) names the tree's chunks, flat, in name
        order: every piece is this release's own, so nothing is split again, a data plane that
        moves between formats keeps its cache, and from one release to the next a format 1 data
        plane is sent the chunks that changed, as a format 2 one is."""
        if fmt == self.format:
            return self
        found = self._views.get(fmt)
        if found is None:
            if (fmt, self.format) != (1, 2):
                raise ValueError(f"no format {fmt} view of a format {self.format} manifest")
            chunks = tuple(d for d in self.catalog if d not in self.children)
            doc = json.loads(self.manifest)
            manifest = canonical_json({**doc, "catalog": list(chunks), "format": 1})
            found = MeshPieces(
                manifest, bundle_digest(manifest), chunks, self.destinations, self.pieces, format=1
            )
            self._views[fmt] = found
        return found

    def views(self) -> list[MeshPieces]:
        """This manifest and the views of other formats made so far."""
        return [self, *self._views.values()]

    def wanted(self, names: Collection[str] | None) -> list[str]:
        """The digests a data plane reaching ``names`` (None: every destination) must hold."""
        dests = self.destinations
        picked = dests.values() if names is None else (dests[n] for n in sorted(names) if n in dests)
        return [*self.catalog, *picked]

    def catalog_since(self, base: MeshPieces | None) -> tuple[str, ...]:
        """The catalog nodes a data plane holding ``base``'s whole tree lacks (computed once per
        base: a thousand data planes on the same release share it)."""
        if base is None:
            return self.catalog
        found = self._since.get(base.digest)
        if found is None:
            held = frozenset(base.catalog)
            found = tuple(d for d in self.catalog if d not in held)
            if len(self._since) > 16:
                self._since.clear()
            self._since[base.digest] = found
        return found

    @functools.cached_property
    def names(self) -> Mapping[str, str]:
        """Destination piece digest -> its service (once per release, for fetches and 422s)."""
        return {d: n for n, d in self.destinations.items()}

    def below(self, digests: Iterable[str]) -> list[str]:
        """These nodes and every node under them (a 422 naming an index piece needs its subtree)."""
        out: dict[str, None] = {}
        todo = list(digests)
        while todo:
            d = todo.pop()
            if d not in out:
                out[d] = None
                todo.extend(self.children.get(d, ()))
        return list(out)

    def body(self, digests: Iterable[str]) -> bytes:
        """A delta push: the manifest, then the named pieces."""
        return join_lines([self.manifest, *(self.pieces[d] for d in digests)])


def _cut_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


_T = TypeVar("_T")


def _groups(items: Sequence[_T], last: Callable[[_T], int], modulus: int, most: int) -> list[list[_T]]:
    """Consecutive runs of ``items``, each ending after an item whose hash is 0 mod ``modulus``
    (or at ``most`` items): where a cut falls depends on the items next to it only."""
    out: list[list[_T]] = []
    run: list[_T] = []
    for item in items:
        run.append(item)
        if last(item) % modulus == 0 or len(run) >= most:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
"""json's own (C) scanner: one value at an index, and where it ends."""


def _members(s: str, i: int) -> tuple[list[tuple[str, str, int, int]], int]:
    """The members of the compact JSON object at ``s[i]``: (key, the key as written, where its
    value starts, where it ends), and the index after the object; values are scanned, not kept."""
    scan = _SCAN
    if s[i] != "{":
        raise ValueError(f"no object at {i}")
    i += 1
    out: list[tuple[str, str, int, int]] = []
    if s[i] == "}":
        return out, i + 1
    while True:
        key, colon = scan(s, i)
        if not isinstance(key, str) or s[colon] != ":":
            raise ValueError(f"no member at {i}")
        _, end = scan(s, colon + 1)
        out.append((key, s[i:colon], colon + 1, end))
        if s[end] == "}":
            return out, end + 1
        if s[end] != ",":
            raise ValueError(f"no comma at {end}")
        i = end + 1


def _sections(text: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """A canonical mesh bundle as (its mesh settings, service -> (key as written, destination's
    JSON), service -> (key as written, catalog entry's JSON)): the pieces are cut from the bundle's
    own bytes (already canonical JSON), not parsed and encoded again (~0.3 s at 10,000 services)."""
    scan = _SCAN
    head: dict[str, Any] = {}
    found: dict[str, dict[str, tuple[str, str]]] = {}
    if text[0] != "{":
        raise ValueError("not an object")
    i = 1
    while text[i] != "}":
        key, colon = scan(text, i)
        if not isinstance(key, str) or text[colon] != ":":
            raise ValueError(f"no member at {i}")
        if key in ("destinations", "services"):
            members, end = _members(text, colon + 1)
            found[key] = {k: (raw, text[a:b]) for k, raw, a, b in members}
        else:
            head[key], end = scan(text, colon + 1)
        if text[end] == ",":
            end += 1
        elif text[end] != "}":
            raise ValueError(f"no comma at {end}")
        i = end
    return head, found["destinations"], found["services"]


ChunkCache = dict[tuple[tuple[str, str, str | None], ...], tuple[str, bytes]]
"""A catalog chunk by its members (key as written, catalog entry JSON, destination digest)."""


def catalog_tree(
    names: Sequence[str],
    entries: Mapping[str, tuple[str, str]],
    dest_digest: Mapping[str, str],
    pieces: dict[str, bytes],
    shape: TreeShape = SHAPE,
    reuse: ChunkCache | None = None,
    keep: ChunkCache | None = None,
) -> tuple[tuple[str, ...], list[str], dict[str, tuple[str, ...]]]:
    """The catalog as a tree of pieces (added to ``pieces``): every node top down, the top
    nodes, each index piece's children. ``entries`` maps a name (in sorted ``names``) to its key
    as written and its catalog entry's JSON; a chunk whose members are in ``reuse`` is not
    serialised again, and every chunk goes into ``keep`` (the control plane's incremental split)."""
    cut = {n: _cut_hash(n) for n in names}
    # A node is (the hash of the last name under it, its digest); level 0 are the chunks.
    level: list[tuple[int, str]] = []
    for run in _groups(names, cut.__getitem__, shape.chunk, shape.max_chunk):
        sig = tuple((entries[n][0], entries[n][1], dest_digest.get(n)) for n in run)
        found = reuse.get(sig) if reuse is not None else None
        if found is None:
            dests = ",".join(f'{k}:"{d}"' for k, _, d in sig if d is not None)
            svcs = ",".join(f"{k}:{e}" for k, e, _ in sig)
            piece = f'{{"destinations":{{{dests}}},"services":{{{svcs}}},"type":"catalog"}}'.encode()
            found = (bundle_digest(piece), piece)
        if keep is not None:
            keep[sig] = found
        pieces[found[0]] = found[1]
        level.append((cut[run[-1]], found[0]))
    levels = [[d for _, d in level]]
    children: dict[str, tuple[str, ...]] = {}
    modulus = shape.chunk
    while len(level) > shape.top:
        modulus *= shape.fanout
        runs = _groups(level, lambda node: node[0], modulus, shape.max_fanout)
        if len(runs) >= len(level):  # no cut made progress (never with a real hash): fixed runs
            runs = [level[i : i + shape.max_fanout] for i in range(0, len(level), shape.max_fanout)]
        level = []
        for group in runs:
            kids = tuple(d for _, d in group)
            piece = canonical_json({"catalog": list(kids), "type": "index"})
            d = bundle_digest(piece)
            pieces[d] = piece
            children[d] = kids
            level.append((group[-1][0], d))
        levels.append([d for _, d in level])
    tree = tuple(d for lv in reversed(levels) for d in lv)
    return tree, [d for _, d in level], children


def split_mesh(data: bytes, shape: TreeShape = SHAPE) -> MeshPieces:
    """The pieces of a (canonical, already checked) mesh bundle."""
    with gc_paused():
        try:
            head, dest_json, svc_json = _sections(data.decode())
        except (ValueError, KeyError, IndexError, StopIteration):
            # Not compact JSON (whitespace, say): made canonical first, then cut the same way.
            head, dest_json, svc_json = _sections(canonical_json(json.loads(data)).decode())
    pieces: dict[str, bytes] = {}
    dest_digest: dict[str, str] = {}
    for name, (raw, conf) in dest_json.items():
        piece = f'{{"destination":{conf},"service":{raw},"type":"destination"}}'.encode()
        d = dest_digest[name] = bundle_digest(piece)
        pieces[d] = piece
    tree, top, children = catalog_tree(sorted(svc_json), svc_json, dest_digest, pieces, shape)
    # Every mesh setting goes into the manifest: only the catalog and destinations are pieces.
    settings = {k: v for k, v in head.items() if k not in ("type", "format")}
    manifest = canonical_json({**settings, "catalog": top, "format": 2, "type": "mesh-manifest"})
    return MeshPieces(manifest, bundle_digest(manifest), tree, dest_digest, pieces, children)


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
    """Digest -> bytes of the pieces held (destinations, and catalog nodes until ``stored``)."""
    nodes: Mapping[str, CatalogPiece | IndexPiece] = field(default_factory=dict)
    """Every node of the catalog tree, parsed: what the next set reuses."""
    chunks: frozenset[str] = frozenset()
    """The leaves of the tree: the chunks whose services make ``catalog``."""

    @functools.cached_property
    def pending(self) -> frozenset[str]:
        return frozenset(self.index.keys() - self.held.keys())

    def bundle(self) -> MeshBundle:
        """The set as a mesh bundle. Every part was validated when its piece was parsed, and a
        set's maps are never changed once made, so the bundle shares them instead of copying
        10,000 catalog entries once more."""
        m = self.manifest
        return MeshBundle.model_construct(
            mesh=m.mesh,
            mtls=m.mtls,
            passthrough=m.passthrough,
            logging=m.logging,
            tracing=m.tracing,
            services=self.catalog if isinstance(self.catalog, dict) else dict(self.catalog),
            destinations=self.held if isinstance(self.held, dict) else dict(self.held),
        )

    def stored(self) -> None:
        """The state dir holds this set's pieces now: drop the bytes of its catalog nodes. The
        parsed ``nodes`` are what the next set is diffed against, and a restart reads the bytes
        back from the state dir; kept, they were 3.4 MB of a scoped sidecar at 10,000 services.
        Destination pieces keep their bytes (few, and ``with_pieces`` re-checks them)."""
        pieces = self.pieces
        if isinstance(pieces, dict):
            for d in self.nodes:
                pieces.pop(d, None)

    def with_pieces(self, lines: Iterable[bytes]) -> MeshSet:
        """This set with more destination pieces of the same manifest (an on-demand fetch)."""
        held, pieces = dict(self.held), dict(self.pieces)
        for line in lines:
            d = bundle_digest(line)
            piece = _parse(line, d)
            if not isinstance(piece, DestinationPiece) or self.index.get(piece.service) != d:
                raise BundleError(f"piece {d[:12]} is not named by the running manifest")
            held[piece.service] = piece.destination
            pieces[d] = line
        return dataclasses.replace(self, held=held, pieces=pieces)


_PARSED: weakref.WeakValueDictionary[str, Piece] = weakref.WeakValueDictionary()
"""Digest -> parsed piece while some set holds it: content-addressed, so a piece held across
pushes (or by many data planes in one process) is parsed once, and one no set holds any more
is not kept (a dict bounded at 50,000 kept every chunk a sidecar had run since it started)."""


def _parse(line: bytes, digest: str | None = None) -> Piece:
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
    # The chunk's two maps name the same services: one string object per name, not two.
    dests = piece.destinations
    names = {n: n for n in services}
    shared = {names.get(n, n): d for n, d in dests.items()}
    dests.clear()
    dests.update(shared)


def _destination(line: bytes, name: str, digest: str | None = None) -> Destination:
    piece = _parse(line, digest)
    if not isinstance(piece, DestinationPiece) or piece.service != name:
        raise BundleError(f"piece {bundle_digest(line)[:12]} is not the destination piece of {name!r}")
    return piece.destination


def _walk(
    manifest: MeshManifest, have: Mapping[str, bytes], known: Mapping[str, CatalogPiece | IndexPiece]
) -> tuple[dict[str, CatalogPiece | IndexPiece], list[str]]:
    """Every node of the manifest's tree and its chunks, level by level; ``known`` nodes are not
    parsed again. Raises ``MissingPieces`` naming every node it reaches but lacks."""
    nodes: dict[str, CatalogPiece | IndexPiece] = {}
    chunks: list[str] = []
    missing: list[str] = []
    level = list(manifest.catalog)
    depth = 0
    while level:
        if depth > MAX_DEPTH:
            raise BundleError(f"the catalog tree is deeper than {MAX_DEPTH} levels")
        below: list[str] = []
        for d in level:
            if d in nodes:
                continue
            node = known.get(d)
            if node is None:
                line = have.get(d)
                if line is None:
                    missing.append(d)
                    continue
                parsed = _parse(line, d)
                if isinstance(parsed, DestinationPiece):
                    raise BundleError(f"piece {d[:12]} named as a catalog node is a destination piece")
                if isinstance(parsed, IndexPiece) and manifest.format == 1:
                    raise BundleError(f"piece {d[:12]} is an index piece in a format 1 manifest")
                node = parsed
            nodes[d] = node
            if isinstance(node, IndexPiece):
                below.extend(node.catalog)
            else:
                chunks.append(d)
        level = below
        depth += 1
    if missing:
        raise MissingPieces(missing)
    return nodes, chunks


def _node(d: str, have: Mapping[str, bytes], manifest: MeshManifest) -> CatalogPiece | IndexPiece:
    parsed = _parse(have[d], d)
    if isinstance(parsed, DestinationPiece):
        raise BundleError(f"piece {d[:12]} named as a catalog node is a destination piece")
    if isinstance(parsed, IndexPiece) and manifest.format == 1:
        raise BundleError(f"piece {d[:12]} is an index piece in a format 1 manifest")
    return parsed


def _diff(
    manifest: MeshManifest, have: Mapping[str, bytes], prev: MeshSet
) -> tuple[dict[str, CatalogPiece | IndexPiece], list[str], list[str], list[str]]:
    """The new tree against ``prev``'s, as a Merkle diff: both frontiers start at the manifests'
    top nodes, nodes in both are dropped (the same digest is the same subtree), the rest are
    opened one level down, until only chunks are left. Returns the new tree's nodes, the chunks
    that left and came, and every node that left or came; touches only the paths that changed."""
    known = prev.nodes
    old = set(prev.manifest.catalog)
    new = set(manifest.catalog)
    opened_old: list[str] = []
    seen_new: set[str] = set()
    came: dict[str, CatalogPiece | IndexPiece] = {}
    missing: list[str] = []
    for _ in range(MAX_DEPTH + 2):
        both = old & new
        old -= both
        new -= both
        leaves_old: set[str] = set()
        below_old: set[str] = set()
        for d in old:
            node = known[d]
            if isinstance(node, IndexPiece):
                opened_old.append(d)
                below_old.update(node.catalog)
            else:
                leaves_old.add(d)
        leaves_new: set[str] = set()
        below_new: set[str] = set()
        for d in new:
            seen_new.add(d)
            found = known.get(d) or came.get(d)
            if found is None:
                if d not in have:
                    missing.append(d)
                    continue
                found = came[d] = _node(d, have, manifest)
            if isinstance(found, IndexPiece):
                below_new.update(found.catalog)
            else:
                leaves_new.add(d)
        # Chunks stay on their side; index pieces are replaced by what they name.
        old, new = leaves_old | below_old, leaves_new | below_new
        if not below_old and not below_new:
            break
    else:
        raise BundleError(f"the catalog tree is deeper than {MAX_DEPTH} levels")
    if missing:
        raise MissingPieces(missing)
    nodes = _copy(known)
    dropped = [d for d in [*opened_old, *old] if d not in seen_new]
    for d in dropped:
        nodes.pop(d, None)
    nodes.update(came)
    return nodes, sorted(old), sorted(new), [*dropped, *came]


_K = TypeVar("_K")
_V = TypeVar("_V")


def _copy(m: Mapping[_K, _V]) -> dict[_K, _V]:
    """A copy of a set's map: ``dict.copy`` stays fast on a dict with deleted entries, where
    ``dict(m)`` re-inserts all 10,000 (0.2 ms, times a thousand stubs in one process)."""
    return m.copy() if isinstance(m, dict) else dict(m)


def assemble(
    manifest_bytes: bytes,
    carried: Iterable[bytes],
    cache: Mapping[str, bytes],
    keep: Collection[str] | None,
    prev: MeshSet | None = None,
) -> MeshSet:
    """A new set from a manifest, the pieces that came with it and the ones held before.

    ``keep`` names the destinations the data plane holds now: they must be held under the new
    manifest too (or ``MissingPieces`` names their digests), so a swap never drops a
    destination silently. Every carried piece must be named by the manifest (a forged or
    mismatched piece is a ``BundleError``). ``keep=None`` (a restart from the state dir) holds
    every destination whose piece is at hand and refuses none. With ``prev`` (the set running
    now) the work grows with what changed, not with the mesh: a Merkle diff of the two trees,
    then ``prev``'s catalog copied with the chunks that left and came applied (the same set as
    without it: a property test holds it to that).
    """
    try:
        manifest = MeshManifest.model_validate_json(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"mesh manifest does not match the schema: {e}") from e
    sent = {bundle_digest(line): line for line in carried}
    have = {**cache, **sent} if sent else cache
    catalog: dict[str, CatalogService]
    index: dict[str, str]
    changed: list[str] | None = None
    if prev is not None and prev.nodes:
        nodes, gone, fresh, changed = _diff(manifest, have, prev)
        catalog, index = _copy(prev.catalog), _copy(prev.index)
        expected = len(catalog)
        for d in gone:
            old = prev.nodes[d]
            assert isinstance(old, CatalogPiece)
            expected -= len(old.services)
            for name in old.services:
                catalog.pop(name, None)
                index.pop(name, None)
        chunks = (prev.chunks - set(gone)) | set(fresh)
    else:
        nodes, chunk_list = _walk(manifest, have, {})
        catalog, index, expected, fresh = {}, {}, 0, chunk_list
        chunks = frozenset(chunk_list)
    for d in fresh:
        chunk = nodes[d]
        assert isinstance(chunk, CatalogPiece)
        expected += len(chunk.services)
        catalog.update(chunk.services)
        index.update(chunk.destinations)
    if expected != len(catalog):
        raise BundleError("a service is in more than one catalog chunk")
    # Carried destination pieces: each must be the one the new index names for its service.
    sent_dests: dict[str, str] = {}
    for d, line in sent.items():
        if d in nodes:
            continue
        piece = _parse(line, d)
        if not isinstance(piece, DestinationPiece) or index.get(piece.service) != d:
            raise BundleError(f"piece {d[:12]} is not named by the manifest (forged, or for another release)")
        sent_dests[piece.service] = d
    want: dict[str, str]
    if keep is None:
        want = {n: d for n, d in index.items() if d in have}
    else:
        want = {n: index[n] for n in keep if n in index}
        want.update(sent_dests)
    lacking = [d for d in want.values() if d not in have]
    if lacking:
        raise MissingPieces(lacking)
    held: dict[str, Destination] = {}
    before_held = prev.held if prev is not None else {}
    before_index = prev.index if prev is not None else {}
    if prev is not None and changed is not None:
        # The cache of the set before, less the nodes that left and the destination pieces it
        # no longer holds, plus the nodes that came (the destinations held are added below).
        pieces = _copy(prev.pieces)
        for d in changed:
            pieces.pop(d, None)
        for name in before_held:
            was = before_index.get(name)
            if was is not None and want.get(name) != was:
                pieces.pop(was, None)
        for d in changed:
            if d in nodes:
                pieces[d] = have[d]
    else:
        pieces = {d: have[d] for d in nodes}
    for name, d in want.items():
        reuse = before_held.get(name)
        held[name] = (
            reuse if reuse is not None and before_index.get(name) == d else _destination(have[d], name, d)
        )
        pieces[d] = have[d]
    return MeshSet(manifest, catalog, index, held, pieces, nodes, chunks)
