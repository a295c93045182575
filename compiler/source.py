"""Reading a policy directory: from the work tree, or from a Git revision's object store.

This is the compiler's input edge (the only module that reads policy files). With ``ref`` the
directory is read with ``git ls-tree`` and ``git cat-file --batch`` (no checkout, nothing
written). Display paths are relative to the Git repository root when there is one, else to the
policy directory, which is what CI annotations need. Each file carries its Git blob id, the
content hash the incremental compiler keys on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import zlib
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path

__all__ = ["SourceError", "SourceFile", "SourceSet", "StatCache", "git_blob_id", "read_policy_dir"]

_SUFFIXES = (".yaml", ".yml")


class SourceError(Exception):
    """The directory or revision cannot be read at all (exit 2)."""


class SourceFile:
    """One policy file: a frozen value of ``path``, ``data`` and ``blob``.

    ``pack()`` keeps the bytes zlib-compressed (``data`` inflates them on each read): a
    long-lived compiler holds every file of the repository and needs the bytes again only to
    locate a new finding in a file it did not re-read (16 MB of YAML at 10,000 services, ~4.5 MB
    packed)."""

    __slots__ = ("_data", "_packed", "blob", "path")

    path: str
    """Display path (relative to the repository root, or to the policy directory)."""
    blob: str
    """Git blob id of ``data`` (sha1 of ``blob <len>\\0<data>``)."""
    _data: bytes | None
    _packed: bytes | None

    def __init__(self, path: str, data: bytes, blob: str) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "blob", blob)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_packed", None)

    @property
    def data(self) -> bytes:
        data = self._data
        if data is None:  # packed: ``pack`` set ``_packed`` before it dropped ``_data``
            assert self._packed is not None
            return zlib.decompress(self._packed)
        return data

    @property
    def packed(self) -> bool:
        return self._data is None

    def pack(self) -> None:
        """Keep the bytes compressed from now on (safe while another thread reads ``data``)."""
        data = self._data
        if data is not None:
            object.__setattr__(self, "_packed", zlib.compress(data, 1))
            object.__setattr__(self, "_data", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SourceFile):
            return NotImplemented
        return self.path == other.path and self.blob == other.blob and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.path, self.blob))

    def __repr__(self) -> str:
        return f"SourceFile(path={self.path!r}, data={self.data!r}, blob={self.blob!r})"

    def __reduce__(self) -> tuple[type[SourceFile], tuple[str, bytes, str]]:
        return (SourceFile, (self.path, self.data, self.blob))


@dataclass(frozen=True)
class SourceSet:
    files: tuple[SourceFile, ...]
    commit: str | None = None
    """The resolved commit when read from Git."""
    repo_root: Path | None = None


RACY_NS = 2_000_000_000
"""A file modified this close before it was read is read again next time (Git's "racily clean"
rule): an edit in the same clock tick with the same size would otherwise go unseen."""

_Stat = tuple[int, int, int, int]


@dataclass
class StatCache:
    """What a long-lived reader (the control plane) keeps between reads of one work tree.

    Each file's stat (mtime, ctime, size, inode) and the ``SourceFile`` read with it: a file whose
    stat is unchanged is neither read nor hashed again, so re-reading 10,000 files after a one-file
    edit costs their ``stat`` calls only. The repository root is looked up once per directory.
    """

    files: dict[str, tuple[_Stat, SourceFile]] = field(default_factory=dict)
    roots: dict[Path, Path | None] = field(default_factory=dict)

    def root_of(self, path: Path) -> Path | None:
        if path not in self.roots:
            self.roots[path] = find_repo_root(path)
        return self.roots[path]


def git_blob_id(data: bytes) -> str:
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _git(cwd: Path, *args: str, input_: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, input=input_, capture_output=True, check=False, env=_git_env()
        )
    except FileNotFoundError as e:
        raise SourceError("git is not installed") from e
    if proc.returncode != 0:
        raise SourceError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    return env


def find_repo_root(path: Path) -> Path | None:
    d = path if path.is_dir() else path.parent
    try:
        out = _git(d, "rev-parse", "--show-toplevel")
    except SourceError:
        return None
    return Path(out.decode().strip())


def read_policy_dir(
    policy_dir: str | Path, ref: str | None = None, *, cache: StatCache | None = None
) -> SourceSet:
    """All ``*.yaml``/``*.yml`` under the directory (hidden folders skipped), sorted by path.

    ``cache`` (work tree only) skips reading files whose stat has not changed since the last read."""
    root = Path(policy_dir).resolve()
    if ref is None and not root.is_dir():
        raise SourceError(f"{policy_dir}: not a directory")
    at = root if root.exists() else root.parent
    repo = cache.root_of(at) if cache is not None else find_repo_root(at)
    if ref is not None:
        if repo is None:
            raise SourceError(
                f"cannot read revision {ref!r}: {policy_dir} is not in a Git repository "
                "(run it inside a clone, or check the work tree alone with `meshc validate DIR`)"
            )
        return _read_git(repo, root, ref)
    base = repo if repo is not None else root
    prefix = root.relative_to(base).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    top = str(root)
    files = []
    seen: dict[str, tuple[_Stat, SourceFile]] = {}
    old = cache.files if cache is not None else {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = dirpath[len(top) + 1 :].replace(os.sep, "/")
        for name in filenames:
            if name.endswith(_SUFFIXES) and not name.startswith("."):
                full = f"{dirpath}/{name}"
                path = f"{prefix}{rel_dir}/{name}" if rel_dir else f"{prefix}{name}"
                f = _read_file(full, path, old, seen) if cache is not None else _read(full, path)
                files.append(f)
    if cache is not None:
        cache.files = seen
    files.sort(key=_path_of)
    return SourceSet(tuple(files), None, repo)


def _path_of(f: SourceFile) -> str:
    return f.path


def _read(full: str, path: str) -> SourceFile:
    try:
        with open(full, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise SourceError(f"{full}: {e.strerror}") from e
    return SourceFile(path, data, git_blob_id(data))


def _read_file(
    full: str, path: str, old: dict[str, tuple[_Stat, SourceFile]], seen: dict[str, tuple[_Stat, SourceFile]]
) -> SourceFile:
    """``full`` from the cache when its stat is the one recorded, else read (and recorded)."""
    try:
        st = os.stat(full)
    except OSError as e:
        raise SourceError(f"{full}: {e.strerror}") from e
    key = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
    hit = old.get(full)
    if hit is not None and hit[0] == key and hit[1].path == path:
        seen[full] = hit
        return hit[1]
    now = time.time_ns()
    f = _read(full, path)
    if hit is not None and hit[1].blob == f.blob and hit[1].path == path:
        # read again (racy, or touched) with the same content: keep the object the compiler
        # holds, not a second copy of the bytes (18 MB at 10,000 files once all were re-read)
        f = hit[1]
    racy = max(st.st_mtime_ns, st.st_ctime_ns) >= now - RACY_NS
    seen[full] = ((-1, -1, -1, -1) if racy else key, f)
    return f


def _read_git(repo: Path, root: Path, ref: str) -> SourceSet:
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()
    except SourceError as e:
        if str(e) == "git is not installed":
            raise
        raise SourceError(
            f"revision {ref!r} is not a commit in {repo}: check the name (`git branch -a`, "
            "`git log --oneline`), or `git fetch` first if it is a remote branch"
        ) from e
    rel = root.relative_to(repo).as_posix() if root != repo else ""
    listing = _git(repo, "ls-tree", "-r", "-z", "--full-tree", commit, "--", rel or ".")
    entries: list[tuple[str, str]] = []
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, raw_path = item.split(b"\t", 1)
        _mode, typ, blob = meta.decode().split()
        p = raw_path.decode()
        parts = p.split("/")
        if typ != "blob" or not p.endswith(_SUFFIXES) or any(x.startswith(".") for x in parts):
            continue
        entries.append((p, blob))
    if not entries:
        if rel and not _git(repo, "ls-tree", "--full-tree", commit, "--", rel).strip():
            raise SourceError(f"{rel}: no such directory at {ref}")
        return SourceSet((), commit, repo)
    out = _git(repo, "cat-file", "--batch", input_="".join(f"{b}\n" for _, b in entries).encode())
    files = []
    pos = 0
    for path, blob in entries:
        nl = out.index(b"\n", pos)
        size = int(out[pos:nl].split()[2])
        content = out[nl + 1 : nl + 1 + size]
        pos = nl + 1 + size + 1
        files.append(SourceFile(path, content, blob))
    files.sort(key=lambda f: f.path)
    return SourceSet(tuple(files), commit, repo)
