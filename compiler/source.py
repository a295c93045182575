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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SourceError", "SourceFile", "SourceSet", "git_blob_id", "read_policy_dir"]

_SUFFIXES = (".yaml", ".yml")


class SourceError(Exception):
    """The directory or revision cannot be read at all (exit 2)."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Display path (relative to the repository root, or to the policy directory)."""
    data: bytes
    blob: str
    """Git blob id of ``data`` (sha1 of ``blob <len>\\0<data>``)."""


@dataclass(frozen=True)
class SourceSet:
    files: tuple[SourceFile, ...]
    commit: str | None = None
    """The resolved commit when read from Git."""
    repo_root: Path | None = None


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


def read_policy_dir(policy_dir: str | Path, ref: str | None = None) -> SourceSet:
    """All ``*.yaml``/``*.yml`` under the directory (hidden folders skipped), sorted by path."""
    root = Path(policy_dir).resolve()
    if ref is None and not root.is_dir():
        raise SourceError(f"{policy_dir}: not a directory")
    repo = find_repo_root(root if root.exists() else root.parent)
    if ref is not None:
        if repo is None:
            raise SourceError(
                f"cannot read revision {ref!r}: {policy_dir} is not in a Git repository "
                "(run it inside a clone, or check the work tree alone with `meshc validate DIR`)"
            )
        return _read_git(repo, root, ref)
    base = repo if repo is not None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(_SUFFIXES) and not name.startswith("."):
                full = Path(dirpath) / name
                try:
                    data = full.read_bytes()
                except OSError as e:
                    raise SourceError(f"{full}: {e.strerror}") from e
                files.append(SourceFile(full.relative_to(base).as_posix(), data, git_blob_id(data)))
    files.sort(key=lambda f: f.path)
    return SourceSet(tuple(files), None, repo)


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
