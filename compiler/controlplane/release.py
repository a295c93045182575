"""The current good release and the record of the last compiles.

A successful compile replaces the release and names the bundle keys whose digest changed; a failed
one keeps the current release untouched (nothing is pushed) and records its diagnostics, which
the log, the API and the GUI show. Compiling goes through ``Compiler``, the one seam to the
incremental compiler.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from compiler.controlplane.pieces import PieceStore
from compiler.incremental import IncrementalCompiler
from compiler.report import render
from compiler.result import CompileResult
from compiler.source import SourceSet, StatCache, read_policy_dir
from runtime.bundle import bundle_digest
from runtime.pieces import MeshPieces, split_mesh

__all__ = ["CompileRecord", "Compiler", "Release", "ReleaseState", "trim_heap", "tune_heap"]


class Compiler:
    """``compile(src) -> CompileResult``, incrementally: the one seam to ``IncrementalCompiler``.

    With ``out`` it writes the bundles and the release itself (``writes_output``), so the caller
    does not write them again.
    """

    def __init__(self, out: Path | None = None) -> None:
        self._inc = IncrementalCompiler(out=out)
        self._stat = StatCache()
        self.writes_output = out is not None
        self.incremental = True
        """Always, now; the status API still reports it."""

    def compile(self, src: SourceSet) -> CompileResult:
        result = self._inc.update(src).result
        trim_heap()
        return result

    def compact(self) -> None:
        """Pack the source bytes the compiler keeps (``SourceFile.pack``: 16 MB of YAML at
        10,000 services, ~4.5 MB packed), then give what that freed back. Safe beside a compile."""
        if self._inc.pack_sources() >= 100:  # a cold compile, a large change (not a one-file edit)
            trim_heap()

    def read(self, policy_dir: Path, ref: str | None = None) -> SourceSet:
        """The policy directory, reading again (work tree) only the files whose stat changed."""
        return read_policy_dir(policy_dir, ref, cache=self._stat if ref is None else None)

    def split_meshes(
        self, store: PieceStore, bundles: dict[str, bytes], digests: dict[str, str]
    ) -> dict[str, MeshPieces]:
        """The pieces of each mesh bundle that ``store`` lacks (digest -> pieces), to ``add`` to
        it: from the compiler's parts when they are this result's (only changed destinations
        re-split), else cut from the bytes. Runs off the event loop; it does not change ``store``."""
        out: dict[str, MeshPieces] = {}
        last = self._inc.result.digests if self._inc.result is not None else {}
        for key, digest in digests.items():
            if "/" in key or key not in bundles or store.has(digest):
                continue
            parts = self._inc.mesh_parts(key)
            if parts is not None and last.get(key) == digest:
                out[digest] = store.split_parts(key, parts)
            else:
                out[digest] = split_mesh(bundles[key])
        return out


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``): after a compile,
    and now and then (the sweep), after pushes.

    A compile of 10,000 services frees tens of MB of multi-MB strings (bundles, the release), a
    push fan-out as much in bodies; glibc's dynamic mmap threshold puts such blocks on the heap
    once one has been freed, so without this the control plane's RSS creeps up with each change
    and stays there. The call releases the GIL (a ``ctypes.CDLL`` call)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | Literal[False] | None = None

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2


def tune_heap() -> None:
    """Set the C heap up for a long-lived control plane (glibc ``mallopt``); call it before any
    thread starts. ``MESHC_MALLOC_DEFAULTS=1`` leaves glibc's defaults.

    * A fixed mmap threshold (``MMAP_THRESHOLD``): blocks this large (push bodies, bundles, the
      release) are mapped and unmapped, never carved from the heap. glibc's dynamic threshold
      rises to the largest block freed (a 7 MB mesh bundle), after which every such block lands
      on the heap and leaves it fragmented until the next ``trim_heap``.
    * ``ARENA_MAX`` arenas: every thread (compiles and splits run in worker threads) otherwise
      gets an arena of its own, up to 8 per core, each holding free memory of its own; with the
      GIL the threads hardly ever allocate at once, so sharing costs no speed.

    Measured at 10,000 services with 1,000 stub data planes (``bench/cp_memory.py``)."""
    if os.environ.get("MESHC_MALLOC_DEFAULTS") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    except (OSError, AttributeError):
        return


@dataclass(frozen=True)
class Release:
    id: str
    commit: str | None
    bundles: dict[str, bytes]
    """Bundle key (``<mesh>`` or ``<mesh>/<service>``) -> canonical bytes."""
    digests: dict[str, str]
    provenance: dict[str, list[dict[str, Any]]]
    record: dict[str, Any]
    """The release document as written to ``releases/<id>.json``."""
    applied_at: float
    seen_at: float
    """When the change that produced it was seen (for propagation time)."""
    step_bundles: dict[str, bytes] = field(default_factory=dict)
    """Digest -> bytes of its Canary steps' bundles (``compiler.canary``)."""

    @property
    def canaries(self) -> dict[str, dict[str, Any]]:
        return dict(self.record.get("canaries") or {})


@dataclass(frozen=True)
class CompileRecord:
    at: float
    ok: bool
    trigger: str
    commit: str | None
    duration_s: float
    diagnostics: list[dict[str, Any]]
    summary: dict[str, int]
    release_id: str | None
    changed: tuple[str, ...] = ()
    error: str | None = None
    """Set when the sources could not be read at all."""

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "ok": self.ok,
            "trigger": self.trigger,
            "commit": self.commit,
            "duration_s": round(self.duration_s, 6),
            "diagnostics": self.diagnostics,
            "summary": self.summary,
            "release": self.release_id,
            "changed": list(self.changed),
            "error": self.error,
        }


Overlay = Callable[[Release], dict[str, bytes]]
"""The compiled release -> the bundles that replace some of its own (a Canary's current step)."""


@dataclass
class ReleaseState:
    """``compiled`` is what Git says; ``current`` is what data planes are sent: the compiled
    release with the ``overlay`` (a Canary step's pre-built bundles) put over it."""

    current: Release | None = None
    last: CompileRecord | None = None
    history: deque[CompileRecord] = field(default_factory=lambda: deque(maxlen=50))
    compiled: Release | None = None
    overlay: Overlay | None = None

    def _set(self, rel: Release) -> set[str]:
        """Make ``rel`` the compiled release; returns the keys whose sent digest changes."""
        old = self.current.digests if self.current else {}
        self.compiled = rel
        self.current = self._effective(rel)
        digests = self.current.digests
        return {k for k in set(old) | set(digests) if old.get(k) != digests.get(k)}

    def _effective(self, rel: Release) -> Release:
        extra = self.overlay(rel) if self.overlay is not None else {}
        if not extra:
            return rel
        return replace(
            rel,
            bundles={**rel.bundles, **extra},
            digests={**rel.digests, **{k: bundle_digest(v) for k, v in extra.items()}},
        )

    def refresh(self) -> set[str]:
        """The overlay moved (a Canary step): recompute what is sent; returns the changed keys."""
        return self._set(self.compiled) if self.compiled is not None else set()

    def apply(
        self, result: CompileResult, *, seen_at: float, trigger: str, duration_s: float
    ) -> set[str] | None:
        """Adopt ``result`` if it compiled; returns the changed bundle keys, or None on failure."""
        summary = {
            "files": result.files,
            "documents": result.documents,
            "errors": result.errors,
            "warnings": result.warnings,
        }
        diags = json.loads(render("json", result.diagnostics, summary))["diagnostics"]
        now = time.time()
        if result.errors or not result.release:
            self._record(CompileRecord(now, False, trigger, result.commit, duration_s, diags, summary, None))
            return None
        changed = self._set(
            Release(
                id=result.release_id,
                commit=result.commit,
                bundles=dict(result.bundles),
                digests=result.digests,
                provenance=dict(result.release.get("provenance", {})),
                record=result.release,
                applied_at=now,
                seen_at=seen_at,
                step_bundles=dict(result.step_bundles),
            )
        )
        self._record(
            CompileRecord(
                now,
                True,
                trigger,
                result.commit,
                duration_s,
                diags,
                summary,
                result.release_id,
                tuple(sorted(changed)),
            )
        )
        return changed

    def adopt(
        self,
        *,
        release_id: str,
        commit: str | None,
        bundles: dict[str, bytes],
        digests: dict[str, str],
        record: dict[str, Any],
        seen_at: float,
        trigger: str,
        step_bundles: dict[str, bytes] | None = None,
    ) -> set[str]:
        """Make current a release another replica (the leader) compiled; returns the changed keys."""
        now = time.time()
        changed = self._set(
            Release(
                id=release_id,
                commit=commit,
                bundles=dict(bundles),
                digests=dict(digests),
                provenance=dict(record.get("provenance", {})),
                record=record,
                applied_at=now,
                seen_at=seen_at,
                step_bundles=dict(step_bundles or {}),
            )
        )
        self._record(
            CompileRecord(now, True, trigger, commit, 0.0, [], {}, release_id, tuple(sorted(changed)))
        )
        return changed

    def fail(self, error: str, *, trigger: str) -> None:
        """The sources could not be read (a bad ref, an unreadable file): keep the release."""
        self._record(
            CompileRecord(time.time(), False, trigger, None, 0.0, [], {}, None, error=error),
        )

    def _record(self, rec: CompileRecord) -> None:
        self.last = rec
        self.history.append(rec)
