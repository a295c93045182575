"""Writing a release: content-addressed bundle files, written once, and the release record.

A bundle file is named by the sha256 of its bytes and never rewritten: an existing file is
verified instead (a mismatch means the output directory was tampered with, and is an error).
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
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


class _BundleDir:
    """Writes content-addressed bundle files into one directory, cheaply: a 10,000-service release
    is 10,000 files, so the names present can be listed once (not stat-ed one by one) and each file
    goes through a temporary name made from the pid and a counter (``mkstemp``'s random names and
    ``pathlib`` cost more than the write itself). Same guarantees as ``_atomic_write``."""

    def __init__(self, root: Path, listed: bool) -> None:
        self.dir = os.fspath(root / "bundles")
        os.makedirs(self.dir, exist_ok=True)
        self.present = set(os.listdir(self.dir)) if listed else None
        """The names present (``listed``: when most of the release is written), else stat each."""
        self.prefix = os.path.join(self.dir, f".tmp-{os.getpid()}-{id(self):x}-")
        self.n = 0

    def put(self, data: bytes) -> bool:
        """Write one bundle unless present (then verify it); True when written."""
        digest = bundle_digest(data)
        name = f"{digest}.json"
        path = os.path.join(self.dir, name)
        present = os.path.exists(path) if self.present is None else name in self.present
        if present:
            with open(path, "rb") as f:
                if bundle_digest(f.read()) != digest:
                    raise OutputError(
                        f"{path}: content does not match its name; remove the file and compile again"
                    )
            return False
        self.n += 1
        tmp = f"{self.prefix}{self.n}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # a leftover of a crashed writer with the same name: go random
            _atomic_write(Path(path), data)
            return True
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True


def write_release(result: CompileResult, out: str | Path) -> tuple[int, int]:
    """Write bundles and the release; returns (bundles written, bundles already present)."""
    if result.errors:
        raise OutputError("a compile with errors writes nothing")
    root = Path(out)
    written = kept = 0
    try:
        bundles = _BundleDir(root, listed=True)
        (root / "releases").mkdir(parents=True, exist_ok=True)
        for data in result.bundles.values():
            if bundles.put(data):
                written += 1
            else:
                kept += 1
        for data in result.step_bundles.values():
            written += bundles.put(data)
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
        bundles = _BundleDir(root, listed=False)
        (root / "releases").mkdir(parents=True, exist_ok=True)
        for key in keys:
            written += bundles.put(result.bundles[key])
        for data in result.step_bundles.values():
            written += bundles.put(data)
        path = root / "releases" / f"{result.release_id}.json"
        _atomic_write(path, release if release is not None else canonical_json(result.release) + b"\n")
    except OSError as e:
        raise OutputError(f"{out}: {e.strerror or e}") from e
    return written
