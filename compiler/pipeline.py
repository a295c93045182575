"""The compiler pipeline: load -> parse -> resolve -> check -> build, as pure functions.

``compile_sources`` takes files already read (a ``SourceSet``) and returns a ``CompileResult``
(``compiler.result``):
located diagnostics, and, when there is no error, the canonical bytes of every bundle and the
release. Reading files (``source``) and writing output (``output``) are the I/O edges.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.build import build_mesh
from compiler.canary import BuildMesh, canary_findings, canary_stage
from compiler.catalog import Catalog, MeshInfo, build_catalog
from compiler.checks import check_all
from compiler.diagnostics import Diagnostic, Related, Span
from compiler.gateway import GatewayBuild, build_gateways
from compiler.kinds.mesh import logging_backends
from compiler.kube import derive as kube
from compiler.parse import Declared, Doc, end_batch, parse_documents
from compiler.resolve import PolicyIndex, conflict_diagnostics, index_policies
from compiler.resolve_targetref import index_targetref, legacy_shadowed
from compiler.result import CompileResult
from compiler.source import SourceFile, SourceSet, read_policy_dir
from compiler.yamlload import Positions, load_fast, load_positions
from runtime import bundle as b

__all__ = [
    "MeshBuilt",
    "MeshResolved",
    "ParsedFile",
    "add_canaries",
    "build_one_mesh",
    "compile_dir",
    "compile_parsed",
    "compile_resolved",
    "compile_sources",
    "doc_lines",
    "finish",
    "locate_all",
    "parse_file",
    "parse_files",
    "parsed_from",
    "provenance",
]


@dataclass
class ParsedFile:
    """One file after parsing; cached by blob id in the incremental compiler."""

    file: SourceFile
    docs: list[Doc]
    findings: list[Diagnostic]
    documents: int
    positions: Positions | None = None
    declared: list[Declared] = field(default_factory=list)
    """Catalog names declared by documents that did not validate (see ``parse_documents``)."""


def parse_file(f: SourceFile) -> ParsedFile:
    return parsed_from(f, load_fast(f.data))


def parsed_from(f: SourceFile, data: list[Any] | None) -> ParsedFile:
    """A file from its fast-path data (None: the fast path refused it; read it carefully)."""
    positions = None
    findings: list[Diagnostic] = []
    if data is None:
        positions, data, findings = load_positions(f.path, f.data)
    docs, more, declared = parse_documents(f.path, data)
    return ParsedFile(f, docs, findings + more, len(data), positions, declared)


PARALLEL_MIN_BYTES = 1 << 20
"""Below this many bytes of YAML, files are parsed in this process only."""
_CHILD_SHARE = 0.55
"""The share of the files the forked child loads; this process loads the rest and validates its
own while the child works (loading is ~4x validating, so this split ends both at about once)."""


def _jobs() -> int:
    env = os.environ.get("MESHC_JOBS", "")
    if env.isdigit():
        return max(1, int(env))
    return min(2, os.cpu_count() or 1)


def parse_files(
    files: Sequence[SourceFile], jobs: int | None = None, loaded: list[list[Any] | None] | None = None
) -> list[ParsedFile]:
    """Parse files in order; with 2+ jobs on Linux a forked child runs the YAML loader on part of them.

    The child returns plain data (cheap to pickle; validated models are not), and the result is
    the same whatever the timing: the split is fixed and the order is the files' order. Any
    failure of the child falls back to loading its files here. ``MESHC_JOBS=1`` turns it off.
    ``loaded``, when given, receives each file's fast-path data (None where it was refused).
    """
    early: list[ParsedFile] = []
    raws = _load_all(files, _jobs() if jobs is None else jobs, early)
    if loaded is not None:
        loaded.extend(raws)
    out = early + [
        parsed_from(f, data) for f, data in zip(files[len(early) :], raws[len(early) :], strict=True)
    ]
    end_batch()
    return out


def _load_all(
    files: Sequence[SourceFile], jobs: int, early: list[ParsedFile] | None = None
) -> list[list[Any] | None]:
    """Each file's fast-path data. With a forked child, this process parses (validates) its own
    share into ``early`` while the child is still loading: the two overlap on two cores."""
    if (
        jobs < 2
        or not sys.platform.startswith("linux")
        or sum(len(f.data) for f in files) < PARALLEL_MIN_BYTES
    ):
        return [load_fast(f.data) for f in files]
    split = len(files) - int(len(files) * _CHILD_SHARE)
    theirs = files[split:]
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return [load_fast(f.data) for f in files]
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            payload = pickle.dumps([load_fast(f.data) for f in theirs], protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as out:
                out.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    inp = os.fdopen(r, "rb")
    try:
        mine = [load_fast(f.data) for f in files[:split]]
        if early is not None:
            early.extend(parsed_from(f, data) for f, data in zip(files[:split], mine, strict=True))
        payload = inp.read()
    finally:
        inp.close()  # before waiting: a child still writing gets EPIPE rather than blocking
        _, status = os.waitpid(pid, 0)
    got: list[list[Any] | None] | None = None
    if os.waitstatus_to_exitcode(status) == 0:
        try:
            got = pickle.loads(payload)  # our own child's output, never data from outside
        except Exception:
            got = None
    if got is None or len(got) != len(theirs):
        got = [load_fast(f.data) for f in theirs]
    return [*mine, *got]


def compile_dir(policy_dir: str | Path, ref: str | None = None) -> CompileResult:
    return compile_sources(read_policy_dir(policy_dir, ref))


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a compile allocates millions of small objects and frees
    them all at the end, and full collections over the growing heap would otherwise cost as much
    as the compile itself. Reference counting still frees everything acyclic."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compile_sources(src: SourceSet) -> CompileResult:
    with no_gc():
        return compile_parsed(src, parse_files(src.files))


def declared_of(parsed: list[ParsedFile]) -> list[Declared]:
    return [x for p in parsed for x in p.declared]


def compile_parsed(src: SourceSet, parsed: list[ParsedFile]) -> CompileResult:
    with no_gc():
        return _compile_parsed(src, parsed)


@dataclass
class MeshResolved:
    """One mesh after resolution: what ``build`` read to write its bundles (``meshc explain``)."""

    info: MeshInfo
    idx: PolicyIndex
    gateways: list[GatewayBuild]


def compile_resolved(src: SourceSet) -> tuple[CompileResult, dict[str, MeshResolved], list[ParsedFile]]:
    """A compile that also hands back each mesh's resolution and the parsed files."""
    resolved: dict[str, MeshResolved] = {}
    with no_gc():
        parsed = parse_files(src.files)
        return _compile_parsed(src, parsed, resolved), resolved, parsed


def _compile_parsed(
    src: SourceSet, parsed: list[ParsedFile], resolved: dict[str, MeshResolved] | None = None
) -> CompileResult:
    docs, findings = kube.expand([d for p in parsed for d in p.docs])
    findings.extend(d for p in parsed for d in p.findings)
    cat, cat_findings = build_catalog(docs, declared_of(parsed))
    findings.extend(cat_findings)
    findings.extend(check_all(docs, cat))
    bundles: dict[str, bytes] = {}
    provenance_docs: dict[str, list[Doc]] = {}
    for mesh in cat.meshes.values():
        mesh_docs = [d for d in docs if d.mesh == mesh.name]
        built = build_one_mesh(cat, mesh, mesh_docs)
        bundles.update(built.bundles)
        provenance_docs.update(built.used)
        findings.extend(built.findings)
        if resolved is not None:
            resolved[mesh.name] = built.resolved
    findings.extend(canary_findings(docs))
    diagnostics = locate_all(parsed, findings)
    result = CompileResult(diagnostics, len(src.files), sum(p.documents for p in parsed), commit=src.commit)
    if result.errors:
        return result
    lines = {p.file.path: doc_lines(p.file.data) for p in parsed}
    digests = {k: b.bundle_digest(v) for k, v in bundles.items()}
    prov = {k: provenance(used, lines) for k, used in provenance_docs.items()}
    return add_canaries(finish(result, bundles, digests, prov), cat, docs)


@dataclass
class MeshBuilt:
    bundles: dict[str, bytes]
    used: dict[str, list[Doc]]
    """Bundle key -> the documents that shaped it (the release's provenance)."""
    findings: list[Diagnostic]
    resolved: MeshResolved


def build_one_mesh(cat: Catalog, mesh: MeshInfo, mesh_docs: list[Doc]) -> MeshBuilt:
    """Resolve and build one mesh's bundles (the release's, and each Canary step's)."""
    bundles: dict[str, bytes] = {}
    used: dict[str, list[Doc]] = {}
    findings: list[Diagnostic] = []
    logging = logging_backends(mesh.doc.spec if mesh.doc else None)
    idx = index_policies(mesh_docs, {mesh.name: logging})
    findings.extend(index_targetref(idx, mesh_docs))
    findings.extend(legacy_shadowed(idx))
    gateways, gw_findings = build_gateways(cat, mesh.name, mesh_docs)
    findings.extend(gw_findings)

    def keep(key: str, data: bytes, docs: list[Doc]) -> None:
        bundles[key] = data
        used[key] = docs

    build_mesh(mesh, idx, gateways, logging, keep)
    findings.extend(conflict_diagnostics(idx))
    return MeshBuilt(bundles, used, findings, MeshResolved(mesh, idx, gateways))


def add_canaries(
    result: CompileResult, cat: Catalog, docs: list[Doc], build: BuildMesh | None = None
) -> CompileResult:
    """Pre-build every Canary step of an error-free result (``compiler.canary``) into it; ``build``
    (default: the whole mesh again) is how a step's bundles are built."""
    if not any(d.kind == "Canary" for d in docs):
        return result

    def whole_mesh(mesh: str, _route: Doc, _changed: Doc, mesh_docs: list[Doc]) -> dict[str, bytes]:
        return build_one_mesh(cat, cat.meshes[mesh], mesh_docs).bundles

    stage = canary_stage(docs, result.bundles, build or whole_mesh)
    result.step_bundles = stage.bundles
    result.release["canaries"] = stage.records
    return result


def provenance(used: list[Doc], lines: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The release's provenance of one bundle: the documents that shaped it, sorted, once each."""
    keys = sorted({(d.kind, d.name, d.file, _line(lines, d)) for d in used})
    return [{"kind": kind, "name": name, "file": file, "line": line} for kind, name, file, line in keys]


def finish(
    result: CompileResult,
    bundles: dict[str, bytes],
    digests: dict[str, str],
    prov: dict[str, list[dict[str, Any]]],
) -> CompileResult:
    """Fill in an error-free result's bundles and release (keys sorted, as the release lists them)."""
    keys = sorted(bundles)
    result.bundles = {k: bundles[k] for k in keys}
    ordered = {k: digests[k] for k in keys}
    result.release = {
        "format": 1,
        "commit": result.commit,
        "bundles": ordered,
        "provenance": {k: prov[k] for k in keys},
    }
    result.release_id = result.commit or hashlib.sha256(b.canonical_json(ordered)).hexdigest()
    return result


_DOC_START = re.compile(rb"^---", re.M)


def doc_lines(data: bytes) -> list[int]:
    """The first content line of each document (past its ``---``, comments and blank lines), from
    its separators (cheap; no re-parse): where a reader looks for the policy, not its modeline."""
    starts = [1]
    lead = len(data) - len(data.lstrip())  # the bytes before this are whitespace only
    line, pos = 1, 0
    for m in _DOC_START.finditer(data):
        line += data.count(b"\n", pos, m.start())  # counted on from the previous separator
        pos = m.start()
        if pos <= lead or line == 1:
            starts[0] = line + 1
        else:
            starts.append(line + 1)
    lines = data.split(b"\n")
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] - 1 if i + 1 < len(starts) else len(lines)
        n = start
        while n < end and (not lines[n - 1].strip() or lines[n - 1].lstrip().startswith(b"#")):
            n += 1
        out.append(n if n <= len(lines) and lines[n - 1].strip() else start)
    return out


def _line(lines: dict[str, list[int]], d: Doc) -> int:
    ls = lines.get(d.file, [1])
    return ls[d.index] if d.index < len(ls) else ls[-1]


def locate_all(
    parsed: list[ParsedFile],
    findings: list[Diagnostic],
    positions_cache: dict[tuple[str, str], Positions | None] | None = None,
) -> list[Diagnostic]:
    """Give every finding a span, re-reading with positions only the files that have findings.

    ``positions_cache`` (path and blob id -> positions) lets a long-lived caller keep them."""
    by_path = {p.file.path: p for p in parsed}
    cache: dict[str, Positions | None] = {}
    kept = positions_cache if positions_cache is not None else {}

    def positions(path: str) -> Positions | None:
        if path not in cache:
            p = by_path.get(path)
            if p is None:
                cache[path] = None
            elif p.positions is not None:
                cache[path] = p.positions
            else:
                key = (path, p.file.blob)
                if key not in kept:
                    kept[key] = load_positions(path, p.file.data)[0]
                cache[path] = kept[key]
        return cache[path]

    out = []
    for d in findings:
        span = d.span
        if span is None:
            pos = positions(d.loc.file)
            span = pos.locate(d.loc) if pos is not None else Span()
        related = list(d.related)
        for loc, msg in d.related_locs:
            pos = positions(loc.file)
            s = pos.locate(loc) if pos is not None else Span()
            related.append(Related(loc.file, s.line, s.column, msg))
        out.append(Diagnostic(d.code, d.message, d.loc, span, tuple(related)))
    out.sort(key=Diagnostic.sort_key)
    return out
