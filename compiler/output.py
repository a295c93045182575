"""Writing a release: content-addressed bundle files, written once, and the release record.

A bundle file is named by the sha256 of its bytes and never rewritten: an existing file is
verified instead (a mismatch means the output directory was tampered with, and is an error).
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from compiler.result import CompileResult
from runtime.bundle import bundle_digest, canonical_json

__all__ = ["OutputError", "write_bundles", "write_release"]


class OutputError(Exception):
    """The output directory cannot be written, or holds a corrupt bundle (exit 2)."""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_release(result: CompileResult, out: str | Path) -> tuple[int, int]:
    """Write bundles and the release; returns (bundles written, bundles already present)."""
    if result.errors:
        raise OutputError("a compile with errors writes nothing")
    root = Path(out)
    written = kept = 0
    try:
        (root / "bundles").mkdir(parents=True, exist_ok=True)
        (root / "releases").mkdir(parents=True, exist_ok=True)
        for data in result.bundles.values():
            digest = bundle_digest(data)
            path = root / "bundles" / f"{digest}.json"
            if path.exists():
                if bundle_digest(path.read_bytes()) != digest:
                    raise OutputError(
                        f"{path}: content does not match its name; remove the file and compile again"
                    )
                kept += 1
                continue
            _atomic_write(path, data)
            written += 1
        for data in result.step_bundles.values():
            written += _write_bundle(root, data)
        _atomic_write(root / "releases" / f"{result.release_id}.json", canonical_json(result.release) + b"\n")
    except OSError as e:
        raise OutputError(f"{out}: {e.strerror or e}") from e
    return written, kept


def write_bundles(
    result: CompileResult, out: str | Path, keys: Iterable[str], release: bytes | None = None
) -> int:
    """Write the bundles of ``keys`` that are not in ``out`` yet, then the release (the incremental
    compiler's write: the other bundles of the release are already there). ``release`` is the release
    file's bytes when the caller has them already. Returns the number of bundles written."""
    if result.errors:
        raise OutputError("a compile with errors writes nothing")
    root = Path(out)
    written = 0
    try:
        (root / "bundles").mkdir(parents=True, exist_ok=True)
        (root / "releases").mkdir(parents=True, exist_ok=True)
        for key in keys:
            data = result.bundles[key]
            digest = bundle_digest(data)
            path = root / "bundles" / f"{digest}.json"
            if path.exists():
                if bundle_digest(path.read_bytes()) != digest:
                    raise OutputError(
                        f"{path}: content does not match its name; remove the file and compile again"
                    )
                continue
            _atomic_write(path, data)
            written += 1
        for data in result.step_bundles.values():
            written += _write_bundle(root, data)
        path = root / "releases" / f"{result.release_id}.json"
        _atomic_write(path, release if release is not None else canonical_json(result.release) + b"\n")
    except OSError as e:
        raise OutputError(f"{out}: {e.strerror or e}") from e
    return written


def _write_bundle(root: Path, data: bytes) -> int:
    """Write one content-addressed bundle unless it is there already; 1 if written."""
    path = root / "bundles" / f"{bundle_digest(data)}.json"
    if path.exists():
        return 0
    _atomic_write(path, data)
    return 1
