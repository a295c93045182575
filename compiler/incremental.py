"""Incremental compile (issue 3 item 5): a compiler that keeps state between compiles.

``IncrementalCompiler.update(source_set)`` gives the same ``CompileResult`` a cold
``compile_sources(source_set)`` gives, byte for byte (a hypothesis test holds it to that), while
doing only the work the change needs:

* files are re-parsed only when their Git blob id changed (``ParseCache`` also keeps parsed data
  across runs of the CLI);
* documents that parse equal to before (same content, same line) keep their identity, so an edit
  to one document of a file touches only that document;
* a changed policy document is taken out of and put back into the per-mesh ``PolicyIndex``, and
  only the bundles its (source, destination) pairs reach are rebuilt: the source's service
  bundle, or for a wildcard source the mesh bundle and every service bundle that names the
  destination; inbound kinds reach their destination's bundle;
* a change to the catalog itself (a ``Mesh``, ``Service`` or ``MeshGateway`` document) rebuilds
  every bundle of the compile (still without re-parsing), since it can change any bundle's
  destinations and every check against the catalog;
* checks of a document against the catalog are cached per document while the catalog is
  unchanged; conflicts are kept per bundle and merged in the cold compile's order;
* with ``out``, only bundles whose bytes are not yet in the output directory are written, then
  the release.

``Update.changed`` lists the bundle keys whose digest differs from the last error-free result
(what a control plane must push), ``Update.removed`` the keys that are gone, ``Update.rebuilt``
the bundles this update rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.build import MeshBuilder, MeshParts, canon
from compiler.canary import BuildMesh, canary_findings
from compiler.catalog import Catalog, MeshInfo, build_catalog
from compiler.checks import check_doc, check_permissions
from compiler.denied import SHAPING_KINDS, allowed_pairs, doc_denied, enforced
from compiler.diagnostics import Diagnostic
from compiler.gateway import GatewayBuild, build_gateways
from compiler.kinds.mesh import logging_backends
from compiler.kube.derive import KubeExpander, is_kube
from compiler.parse import Declared, Doc, end_batch
from compiler.pipeline import (
    ParsedFile,
    add_canaries,
    build_one_mesh,
    compile_parsed,
    compile_sources,
    declared_of,
    doc_lines,
    finish,
    locate_all,
    no_gc,
    parse_files,
    parsed_from,
)
from compiler.resolve import INBOUND, OUTBOUND, Entry, PolicyIndex, conflict_diagnostics
from compiler.resolve_targetref import RESOLVED_KINDS, index_targetref, legacy_shadowed
from compiler.result import CompileResult
from compiler.source import SourceFile, SourceSet
from compiler.yamlload import Positions
from runtime import bundle as b

__all__ = ["CACHE_FORMAT", "IncrementalCompiler", "ParseCache", "Update", "compile_cached", "parse_cached"]

_CATALOG_KINDS = frozenset({"Mesh", "Service", "MeshGateway"})
_DENIED_INPUTS = SHAPING_KINDS | {"TrafficPermission"}


@dataclass
class Update:
    """What one ``IncrementalCompiler.update`` did."""

    result: CompileResult
    changed: list[str] = field(default_factory=list)
    """Bundle keys added or whose bytes changed since the last error-free result (sorted)."""
    removed: list[str] = field(default_factory=list)
    """Bundle keys of the last error-free result that are gone."""
    rebuilt: list[str] = field(default_factory=list)
    """Bundles rebuilt by this update (a superset of ``changed`` that exist)."""
    parsed: int = 0
    """Files parsed by this update (the others were reused by blob id)."""
    written: int = 0
    """Bundle files written to ``out`` (those whose bytes were not there yet)."""
    full: bool = False
    release_bytes: bytes = b""
    """The release as ``write_release`` writes it (canonical JSON and a newline), when error-free;
    assembled from per-bundle fragments kept between updates."""
    """Whether every bundle was rebuilt (first compile, or the catalog changed)."""


def _reindex_all(d: Doc) -> bool:
    """A document whose change rebuilds every bundle: the catalog, Kubernetes objects, and the
    targetRef policies (merged across documents, so not indexed one document at a time)."""
    return d.kind in _CATALOG_KINDS or d.kind in RESOLVED_KINDS or is_kube(d)


_ProvKey = tuple[str, str, str, int]


@dataclass
class _Mesh:
    info: MeshInfo
    idx: PolicyIndex
    logging: tuple[b.LoggingBackend, ...]
    gateways: list[GatewayBuild]
    gw_findings: list[Diagnostic]
    builder: MeshBuilder
    keys: list[str] = field(default_factory=list)
    """The bundle keys of the mesh in the cold compile's order."""
    tr_findings: list[Diagnostic] = field(default_factory=list)
    """What resolving its targetRef policies found (recomputed on every full rebuild)."""
    parts: MeshParts | None = None
    """The mesh bundle's parts as last built (re-rendered per destination)."""
    dirty: set[str] = field(default_factory=set)
    """Destinations of the mesh bundle a change reached (``ALL``: every one)."""
    prov_keys: dict[str, list[_ProvKey]] = field(default_factory=dict)
    """Destination -> the provenance keys of the documents that shaped it."""
    prov_base: list[_ProvKey] = field(default_factory=list)
    prov_count: dict[_ProvKey, int] = field(default_factory=dict)
    """The mesh bundle's provenance as a multiset: a re-rendered destination moves it by its
    own keys, and the sorted list is made again only when a key comes or goes."""


ALL = "*"


class IncrementalCompiler:
    """Keeps parsed files, the policy index and built bundles between compiles.

    ``update(src)`` compiles a new ``SourceSet`` (a whole policy directory, as
    ``read_policy_dir`` reads it) and returns an ``Update``; ``update(src).result`` equals
    ``compile_sources(src)``. With ``out`` it also writes the new bundles and the release, as
    ``write_release`` would. Not thread-safe: call it from one thread (or under a lock).
    """

    def __init__(
        self, out: str | Path | None = None, *, cache: ParseCache | None = None, jobs: int | None = None
    ) -> None:
        self.out = Path(out) if out is not None else None
        self.cache = cache
        self.jobs = jobs
        self.result: CompileResult | None = None
        self._files: dict[str, ParsedFile] = {}
        self._lines: dict[str, list[int]] = {}
        self._positions: dict[tuple[str, str], Positions | None] = {}
        self._catalog: Catalog | None = None
        self._meshes: dict[str, _Mesh] = {}
        self._checks: dict[int, list[Diagnostic]] = {}
        self._bundles: dict[str, bytes] = {}
        self._digests: dict[str, str] = {}
        self._prov: dict[str, list[dict[str, Any]]] = {}
        self._prov_json: dict[str, str] = {}
        self._prov_item: dict[_ProvKey, dict[str, Any]] = {}
        self._key_json: dict[str, str] = {}
        self._conflicts: dict[str, dict[frozenset[int], tuple[Entry, Entry]]] = {}
        self._published: dict[str, str] = {}
        self._commit: str | None = None
        self._cat_findings: list[Diagnostic] | None = None
        self._perm_findings: list[Diagnostic] | None = None
        self._denied_ctx: dict[str, tuple[MeshInfo, set[tuple[str, str]], list[Doc]]] | None = None
        self._denied: dict[int, list[Diagnostic]] = {}
        """id(doc) -> its W2003 findings (only documents with some)."""
        self._used: dict[str, list[Doc]] = {}
        """Bundle key -> the documents that shaped it as last built (for reusing provenance)."""
        self._declared: list[Declared] = []
        self._kube = KubeExpander()
        self._kube_findings: list[Diagnostic] = []

    # --- public ---------------------------------------------------------------------------------

    def update(self, src: SourceSet) -> Update:
        with no_gc():
            return self._update(src)

    def pack_sources(self) -> int:
        """Compress the bytes of the files kept (``SourceFile.pack``); returns how many were
        packed. Safe from another thread during an update (it packs the last update's files)."""
        n = 0
        for p in list(self._files.values()):
            if not p.file.packed:
                p.file.pack()
                n += 1
        return n

    def mesh_parts(self, mesh: str) -> MeshParts | None:
        """The parts of the mesh bundle ``mesh`` as last built (``self.result.bundles[mesh]`` is
        their ``data()`` after an error-free update), for splitting it without parsing it."""
        m = self._meshes.get(mesh)
        return m.parts if m is not None else None

    # --- files and documents --------------------------------------------------------------------

    def _parse(self, files: list[SourceFile]) -> list[ParsedFile]:
        if self.cache is None:
            return parse_files(files, self.jobs)
        return parse_cached(files, self.cache, self.jobs)

    def _update(self, src: SourceSet) -> Update:
        old_files = self._files
        new_files: dict[str, ParsedFile] = {}
        todo: list[SourceFile] = []
        for f in src.files:
            p = old_files.get(f.path)
            if p is not None and p.file.blob == f.blob:
                new_files[f.path] = p
            else:
                todo.append(f)
        added: list[Doc] = []
        removed: list[Doc] = []
        for f, p in zip(todo, self._parse(todo), strict=True):
            lines = doc_lines(f.data)
            old = old_files.get(f.path)
            if old is not None:
                p = self._keep_equal(old, p, self._lines.get(f.path, []), lines, removed, added)
            else:
                added.extend(p.docs)
            new_files[f.path] = p
            self._lines[f.path] = lines
        for path, p in old_files.items():
            if path not in new_files:
                removed.extend(p.docs)
                self._lines.pop(path, None)
        self._files = new_files
        parsed = [new_files[f.path] for f in src.files]
        unchanged = not todo and len(new_files) == len(old_files)
        if unchanged and self.result is not None and src.commit == self._commit:
            # made again (a join of cached fragments), not kept: 7 MB at 10,000 services
            release = self._release_bytes(self.result) if not self.result.errors else b""
            return Update(self.result, release_bytes=release)
        self._commit = src.commit
        declared = declared_of(parsed)
        full = (
            self._catalog is None
            or declared != self._declared
            or any(
                d.kind in _CATALOG_KINDS or d.kind in RESOLVED_KINDS or is_kube(d) for d in (*added, *removed)
            )
        )
        self._declared = declared
        docs, self._kube_findings = self._kube.expand([d for p in parsed for d in p.docs])
        rebuilt = self._rebuild_all(docs) if full else self._rebuild_some(docs, added, removed)
        # Catalog findings (duplicate names, unknown meshes) depend on each document's identity
        # only: an edit in place (same kind, mesh, name and position) keeps them.
        if full or self._cat_findings is None or _identities(added) != _identities(removed):
            self._cat_findings = build_catalog(docs, declared)[1]
        if (
            full
            or self._perm_findings is None
            or any(d.kind == "TrafficPermission" for d in (*added, *removed))
        ):
            assert self._catalog is not None
            perms = [d for d in docs if d.kind in ("TrafficPermission", "MeshTrafficPermission")]
            self._perm_findings = list(check_permissions(perms, self._catalog))
        self._update_denied(docs, added, removed, full)
        return self._result(src, parsed, docs, rebuilt, full, len(todo))

    def _update_denied(self, docs: list[Doc], added: list[Doc], removed: list[Doc], full: bool) -> None:
        """W2003 per document: all again when the permissions (or the catalog) changed, else only
        the documents this update added."""
        cat = self._catalog
        assert cat is not None
        if full or self._denied_ctx is None or any(d.kind == "TrafficPermission" for d in (*added, *removed)):
            ctx = {}
            for name, mesh in cat.meshes.items():
                if enforced(mesh):
                    perms = [d for d in docs if d.kind == "TrafficPermission" and d.mesh == name]
                    ctx[name] = (mesh, allowed_pairs(perms), perms)
            self._denied_ctx, self._denied = ctx, {}
            todo = docs
        else:
            ctx = self._denied_ctx
            for d in removed:
                self._denied.pop(id(d), None)
            todo = added
        for d in todo:
            if d.kind in SHAPING_KINDS and d.mesh in ctx:
                found = list(doc_denied(d, *ctx[d.mesh]))
                if found:
                    self._denied[id(d)] = found

    @staticmethod
    def _keep_equal(
        old: ParsedFile,
        new: ParsedFile,
        old_lines: list[int],
        new_lines: list[int],
        removed: list[Doc],
        added: list[Doc],
    ) -> ParsedFile:
        """Keep the old ``Doc`` objects that parse equal and sit on the same line."""
        before = {(d.index, _line(old_lines, d.index)): d for d in old.docs}
        docs = []
        for d in new.docs:
            prev = before.get((d.index, _line(new_lines, d.index)))
            if prev is not None and prev == d:
                docs.append(prev)
                del before[(d.index, _line(new_lines, d.index))]
            else:
                docs.append(d)
                added.append(d)
        removed.extend(before.values())
        return ParsedFile(new.file, docs, new.findings, new.documents, new.positions, new.declared)

    # --- building -------------------------------------------------------------------------------

    def _rebuild_all(self, docs: list[Doc]) -> list[str]:
        cat, _ = build_catalog(docs, self._declared)
        self._catalog = cat
        self._checks = {}
        for d in docs:
            found = list(check_doc(d, cat))
            if found:
                self._checks[id(d)] = found
        self._meshes = {}
        self._conflicts = {}
        self._prov_json = {}
        self._used = {}
        bundles: dict[str, bytes] = {}
        prov: dict[str, list[dict[str, Any]]] = {}
        digests: dict[str, str] = {}
        rebuilt = []
        for mesh in cat.meshes.values():
            mesh_docs = [d for d in docs if d.mesh == mesh.name]
            logging = logging_backends(mesh.doc.spec if mesh.doc else None)
            idx = PolicyIndex()
            for d in mesh_docs:
                idx.add(d, {mesh.name: logging})
            gateways, gw_findings = build_gateways(cat, mesh.name, mesh_docs)
            tr_findings = index_targetref(idx, mesh_docs)
            m = _Mesh(mesh, idx, logging, gateways, gw_findings, MeshBuilder(mesh, idx, gateways, logging))
            m.tr_findings = tr_findings
            self._meshes[mesh.name] = m
            m.keys = m.builder.bundle_keys()
            for key in m.keys:
                data = self._build(m, key, prov)
                bundles[key] = data
                digests[key] = self._digests[key] if self._bundles.get(key) == data else b.bundle_digest(data)
                rebuilt.append(key)
        self._prov = prov
        self._bundles = bundles
        self._digests = digests
        return rebuilt

    def _build(self, m: _Mesh, key: str, prov: dict[str, list[dict[str, Any]]]) -> bytes:
        if key == m.info.name:
            return self._build_mesh(m, prov)
        m.idx.conflicts = {}
        data, used = m.builder.build(key)
        self._conflicts[key] = m.idx.conflicts
        old = self._used.get(key)
        if old is None or len(old) != len(used) or not all(map(operator.is_, old, used)) or key not in prov:
            # the same document objects at the same lines: the same provenance
            prov[key] = self._prov_items(sorted({_prov_key(d, self._lines) for d in used}))
            self._prov_json[key] = canon(prov[key])
        self._used[key] = used
        return data

    def _build_mesh(self, m: _Mesh, prov: dict[str, list[dict[str, Any]]]) -> bytes:
        """The mesh bundle, re-rendering only its dirty destinations (all on a first build), its
        provenance kept as a multiset of keys so that it is sorted again only when it changes."""
        key = m.info.name
        dirty = None if m.parts is None or ALL in m.dirty else m.dirty
        m.idx.conflicts = {}
        parts = m.parts = m.builder.mesh_parts(m.parts, dirty)
        m.dirty = set()
        m.idx.conflicts = {}
        self._conflicts[key] = parts.all_conflicts()
        lines = self._lines
        moved = dirty is None
        if dirty is None:
            m.prov_base = [_prov_key(d, lines) for d in (*parts.base_used, *parts.tail_used)]
            m.prov_keys = {d: [_prov_key(x, lines) for x in used] for d, used in parts.dest_used.items()}
            count: dict[_ProvKey, int] = {}
            for k in m.prov_base:
                count[k] = count.get(k, 0) + 1
            for keys in m.prov_keys.values():
                for k in keys:
                    count[k] = count.get(k, 0) + 1
            m.prov_count = count
        else:
            count = m.prov_count
            for d in dirty:
                if d not in parts.dest_used:
                    continue
                # the new keys first: a key that stays (the usual edit) never drops to zero
                keys = [_prov_key(x, lines) for x in parts.dest_used[d]]
                for k in keys:
                    n = count.get(k, 0)
                    count[k] = n + 1
                    moved = moved or not n
                for k in m.prov_keys.get(d, ()):
                    n = count[k] - 1
                    if n:
                        count[k] = n
                    else:
                        del count[k]
                        moved = True
                m.prov_keys[d] = keys
        if moved or key not in prov:
            prov[key] = self._prov_items(sorted(count))
            self._prov_json[key] = canon(prov[key])
        return parts.data()

    def _prov_items(self, keys: list[_ProvKey]) -> list[dict[str, Any]]:
        """Provenance entries, one dict per document shared by every bundle it shaped (the mesh
        bundle and each service bundle list most documents twice: ~4 MB at 10,000 services)."""
        items = self._prov_item
        if len(items) > 4 * max(1024, len(self._lines) * 8):
            items.clear()
        out = []
        for k in keys:
            item = items.get(k)
            if item is None:
                item = items[k] = {"kind": k[0], "name": k[1], "file": k[2], "line": k[3]}
            out.append(item)
        return out

    def _rebuild_some(self, docs: list[Doc], added: list[Doc], removed: list[Doc]) -> list[str]:
        cat = self._catalog
        assert cat is not None
        for d in removed:
            self._checks.pop(id(d), None)
        for d in added:
            found = list(check_doc(d, cat))
            if found:
                self._checks[id(d)] = found
        affected: dict[str, set[str]] = {}
        for d in removed:
            m = self._meshes.get(d.mesh)
            if m is not None:
                entries = m.idx.by_doc.get(id(d), (d, []))[1]
                affected.setdefault(d.mesh, set()).update(self._reach(m, entries, m.dirty))
                m.idx.remove(d)
        for d in added:
            m = self._meshes.get(d.mesh)
            if m is not None:
                entries = m.idx.add(d, {d.mesh: m.logging})
                affected.setdefault(d.mesh, set()).update(self._reach(m, entries, m.dirty))
        for name in {d.mesh for d in (*added, *removed) if d.kind == "MeshGatewayRoute"}:
            m = self._meshes.get(name)
            if m is None:
                continue
            mesh_docs = [d for d in docs if d.mesh == name]
            m.gateways, m.gw_findings = build_gateways(cat, name, mesh_docs)
            m.builder = MeshBuilder(m.info, m.idx, m.gateways, m.logging)
            m.parts = None
            affected.setdefault(name, set()).update(f"{name}/{g}" for g in m.builder.gateways)
        rebuilt = []
        for name, keys in affected.items():
            m = self._meshes[name]
            for key in keys:
                data = self._build(m, key, self._prov)
                if self._bundles.get(key) != data:
                    self._bundles[key] = data
                    self._digests[key] = b.bundle_digest(data)
                rebuilt.append(key)
        return sorted(rebuilt)

    @staticmethod
    def _reach(m: _Mesh, entries: Iterable[Entry], dirty: set[str] | None = None) -> set[str]:
        """The bundle keys whose content these entries can change; ``dirty`` receives the mesh
        bundle's destinations they can change (``ALL``: every one)."""
        mesh = m.info.name
        services = m.builder.services
        out: set[str] = set()
        for e in entries:
            if e.doc.kind in OUTBOUND:
                if e.src != "*":
                    if e.src in services:
                        out.add(f"{mesh}/{e.src}")
                    continue
                out.add(mesh)
                if dirty is not None:
                    dirty.add(ALL if e.dst == "*" else e.dst)
                if e.dst == "*":
                    out.update(f"{mesh}/{s}" for s in services)
                else:
                    out.update(
                        f"{mesh}/{s}"
                        for s, named in m.idx.sources.items()
                        if s in services and (e.dst in named or "*" in named)
                    )
            elif e.doc.kind in INBOUND:
                if e.dst == "*":
                    out.update(f"{mesh}/{s}" for s, info in services.items() if not info.gateway)
                elif e.dst in services:
                    out.add(f"{mesh}/{e.dst}")
        return out

    # --- the result -----------------------------------------------------------------------------

    def _result(
        self,
        src: SourceSet,
        parsed: list[ParsedFile],
        docs: list[Doc],
        rebuilt: list[str],
        full: bool,
        n_parsed: int,
    ) -> Update:
        cat = self._catalog
        assert cat is not None
        findings = [d for p in parsed for d in p.findings]
        findings.extend(self._kube_findings)
        findings.extend(self._cat_findings or ())
        checks, denied = self._checks, self._denied
        for d in docs:
            found = checks.get(id(d))
            if found:
                findings.extend(found)
        findings.extend(self._perm_findings or ())
        for d in docs:
            found = denied.get(id(d))
            if found:
                findings.extend(found)
        findings.extend(canary_findings(docs))
        for m in self._meshes.values():
            findings.extend(m.gw_findings)
            findings.extend(m.tr_findings)
            findings.extend(legacy_shadowed(m.idx))
            merged: dict[frozenset[int], tuple[Entry, Entry]] = {}
            for key in m.keys:
                for k, v in self._conflicts.get(key, {}).items():
                    merged.setdefault(k, v)
            m.idx.conflicts = merged
            findings.extend(conflict_diagnostics(m.idx))
        live = {(p.file.path, p.file.blob) for p in parsed}
        for gone in [k for k in self._positions if k not in live]:
            del self._positions[gone]
        diagnostics = locate_all(parsed, findings, self._positions)
        result = CompileResult(
            diagnostics, len(src.files), sum(p.documents for p in parsed), commit=src.commit
        )
        upd = Update(result, rebuilt=rebuilt, parsed=n_parsed, full=full)
        if not result.errors:
            finish(result, self._bundles, self._digests, self._prov)
            add_canaries(result, cat, docs, self._step_build(cat))
            new = result.digests
            upd.changed = sorted(k for k, v in new.items() if self._published.get(k) != v)
            upd.removed = sorted(k for k in self._published if k not in new)
            self._published = new
            upd.release_bytes = self._release_bytes(result)
            if self.out is not None:
                upd.written = self._write(result, upd.changed, upd.release_bytes)
        self.result = result
        return upd

    def _step_build(self, cat: Catalog) -> BuildMesh:
        """A Canary step's bundles, rebuilt like an edit of its route: the route's entries swapped
        in the mesh's index for the step's, only the bundles they reach built, the route put back
        (a targetRef route is resolved over the whole mesh: that mesh is built again)."""

        def build(mesh: str, route: Doc, changed: Doc, mesh_docs: list[Doc]) -> dict[str, bytes]:
            m = self._meshes.get(mesh)
            if m is None or route.kind in RESOLVED_KINDS or id(route) not in m.idx.by_doc:
                return build_one_mesh(cat, cat.meshes[mesh], mesh_docs).bundles
            keys = self._reach(m, m.idx.remove(route))
            try:
                keys |= self._reach(m, m.idx.add(changed, {mesh: m.logging}))
                out = {}
                for key in sorted(keys):
                    m.idx.conflicts = {}
                    out[key] = m.builder.build(key)[0]
                return out
            finally:
                m.idx.remove(changed)
                m.idx.add(route, {mesh: m.logging})

        return build

    def _release_bytes(self, result: CompileResult) -> bytes:
        """``canonical_json(result.release) + b"\\n"``, from cached fragments (keys sorted)."""
        kj = self._key_json
        for k in result.bundles:
            if k not in kj:
                kj[k] = canon(k)
        digests = ",".join([f'{kj[k]}:"{d}"' for k, d in result.release["bundles"].items()])
        prov = ",".join([f"{kj[k]}:{self._prov_json[k]}" for k in result.bundles])
        canaries = result.release.get("canaries")
        steps = f'"canaries":{b.canonical_json(canaries).decode()},' if canaries is not None else ""
        text = (
            f'{{"bundles":{{{digests}}},{steps}"commit":{canon(result.commit)},'
            f'"format":{result.release["format"]},"provenance":{{{prov}}}}}\n'
        )
        return text.encode()

    def _write(self, result: CompileResult, keys: list[str], release: bytes) -> int:
        from compiler.output import write_bundles

        return write_bundles(result, self.out or Path("."), keys, release)


def parse_cached(files: list[SourceFile], cache: ParseCache, jobs: int | None = None) -> list[ParsedFile]:
    """``parse_files`` with the YAML loader's output taken from (and added to) ``cache``."""
    out: dict[int, ParsedFile] = {}
    missing: list[tuple[int, SourceFile]] = []
    for i, f in enumerate(files):
        data = cache.get(f.blob)
        if data is None:
            missing.append((i, f))
        else:
            out[i] = parsed_from(f, data)
    loaded: list[list[Any] | None] = []
    fresh = parse_files([f for _, f in missing], jobs, loaded)
    for (i, f), p, data in zip(missing, fresh, loaded, strict=True):
        out[i] = p
        cache.put(f.blob, data)
    end_batch()
    return [out[i] for i in range(len(files))]


def compile_cached(src: SourceSet, policy_dir: str | Path) -> CompileResult:
    """``compile_sources`` for the CLI, reusing parsed files across runs through the user's cache
    directory (``MESHC_NO_CACHE=1`` turns it off; ``MESHC_CACHE_DIR`` moves it)."""
    if os.environ.get("MESHC_NO_CACHE"):
        return compile_sources(src)
    cache = ParseCache.for_dir(policy_dir)
    with no_gc():
        result = compile_parsed(src, parse_cached(list(src.files), cache))
    cache.save()
    return result


def _prov_key(d: Doc, lines: dict[str, list[int]]) -> _ProvKey:
    ls = lines.get(d.file, [1])
    return (d.kind, d.name, d.file, ls[d.index] if d.index < len(ls) else ls[-1])


def _identities(docs: list[Doc]) -> list[tuple[str, str, str, str, int, tuple[str | int, ...]]]:
    return sorted((d.kind, d.mesh, d.name, d.file, d.index, d.prefix) for d in docs)


def _line(lines: list[int], index: int) -> int:
    return lines[index] if index < len(lines) else (lines[-1] if lines else 1)


# --- the CLI's parse cache ----------------------------------------------------------------------

CACHE_FORMAT = "meshc-parse-cache/1"


def _loader_fingerprint() -> str:
    """What the cached data depends on: this format and the YAML loader's source."""
    import compiler.yamlload as y

    h = hashlib.sha256(CACHE_FORMAT.encode())
    try:
        h.update(Path(y.__file__).read_bytes())
    except OSError:
        h.update(b"?")
    return h.hexdigest()


def _plain_json(v: Any) -> bool:
    """Whether ``v`` survives a JSON round trip unchanged (str keys, no NaN/inf, no tuples)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if not all(type(k) is str for k in x):
                return False
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, float):
            if x != x or x in (float("inf"), float("-inf")):
                return False
        elif x is not None and type(x) not in (str, int, bool):
            return False
    return True


class ParseCache:
    """The loader's plain data per Git blob id, kept as JSON under the user's cache directory.

    JSON, never pickle: the file is read back as data only. A header names the format and a
    fingerprint of the YAML loader, and a sha256 covers the body; a cache that is corrupt, from
    another format or another loader, is ignored with a warning on stderr (and rewritten).
    Only data that survives a JSON round trip unchanged is stored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] = {}
        self._used: set[str] = set()
        self._dirty = False
        self._fingerprint = _loader_fingerprint()
        self._load()

    @classmethod
    def for_dir(cls, policy_dir: str | Path) -> ParseCache:
        """The cache file of one policy directory, under ``platformdirs.user_cache_dir("meshc")``."""
        import platformdirs

        root = Path(os.environ.get("MESHC_CACHE_DIR") or platformdirs.user_cache_dir("meshc"))
        key = hashlib.sha256(str(Path(policy_dir).resolve()).encode()).hexdigest()[:24]
        return cls(root / f"parse-{key}.json")

    def _warn(self, why: str) -> None:
        print(f"meshc: warning: ignoring the parse cache {self.path}: {why}", file=sys.stderr)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self._warn(e.strerror or str(e))
            return
        try:
            head, _, body = raw.partition(b"\n")
            header = json.loads(head)
            if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
                self._warn("not a meshc parse cache of this version")
                return
            if header.get("loader") != self._fingerprint:
                self._warn("written by another version of the YAML loader")
                return
            if header.get("sha256") != hashlib.sha256(body).hexdigest():
                self._warn("its checksum does not match (corrupt)")
                return
            data = json.loads(body)
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, list) for k, v in data.items()
            ):
                self._warn("unexpected content")
                return
        except (ValueError, UnicodeDecodeError):
            self._warn("not valid JSON (corrupt)")
            return
        self._data = data

    def get(self, blob: str) -> list[Any] | None:
        v = self._data.get(blob)
        if v is not None:
            self._used.add(blob)
        return v

    def put(self, blob: str, data: list[Any] | None) -> None:
        if data is not None and _plain_json(data):
            self._data[blob] = data
            self._used.add(blob)
            self._dirty = True

    def save(self) -> None:
        """Write the entries used since loading (others are dropped), if anything changed."""
        if not self._dirty and set(self._data) == self._used:
            return
        kept = {k: self._data[k] for k in sorted(self._used) if k in self._data}
        body = json.dumps(kept, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        header = json.dumps(
            {"format": CACHE_FORMAT, "loader": self._fingerprint, "sha256": hashlib.sha256(body).hexdigest()}
        ).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(header + b"\n" + body)
            os.replace(tmp, self.path)
        except OSError as e:
            print(
                f"meshc: warning: cannot write the parse cache {self.path}: {e.strerror or e}",
                file=sys.stderr,
            )
