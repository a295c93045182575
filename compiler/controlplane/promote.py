"""A finished Canary's promotion as a commit on a branch (``controlplane --promote-commit``).

The commit is the compiled commit with one change: the route's weights set to the promoted
step's, in place (comments, order and the file's other documents kept, ``compiler.yamledit``).
It is made with Git's plumbing against a private index (``read-tree``, ``update-index``,
``write-tree``, ``commit-tree``, ``update-ref``), so neither the work tree nor any checked-out
branch moves, and it is never pushed: a human opens the pull request; once it merges, Git says
what the canary ran and the Canary can be removed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from compiler.canary import split_text
from compiler.yamledit import EditError, set_weights

__all__ = ["PromoteError", "branch_name", "promote_commit"]


class PromoteError(Exception):
    """Why no promotion commit was made (the canary's state shows it)."""


def branch_name(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key.replace('/', '-')}"


def _git(
    repo: Path, *args: str, input_: bytes | None = None, env: dict[str, str] | None = None, raw: bool = False
) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input_,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise PromoteError(f"git {args[0]}: {proc.stderr.decode(errors='replace').strip()}")
    out = proc.stdout.decode()
    return out if raw else out.strip()


def promote_commit(
    repo: Path, base: str, rec: dict[str, Any], weight: int, branch: str, protected: str
) -> str:
    """Make ``branch`` point at a new commit on top of ``base`` with the route at ``weight``;
    returns the commit. Refuses the branch the control plane follows (``protected``)."""
    if branch in (protected, protected.removeprefix("refs/heads/")) or branch.endswith("/" + protected):
        raise PromoteError(f"refusing to commit to {branch!r}: the control plane follows it")
    src = rec["source"]
    path = str(src["file"])
    edits = [(tuple(p), list(ws)) for p, ws in src["edits"][str(weight)]]
    text = _git(repo, "show", f"{base}:{path}", raw=True)
    try:
        new = set_weights(text, int(src["index"]), edits, rec["route"]["kind"], rec["route"]["name"])
    except EditError as e:
        raise PromoteError(f"{path}: {e}") from None
    listed = _git(repo, "ls-tree", base, "--", path).split()
    mode = listed[0] if listed else "100644"
    blob = _git(repo, "hash-object", "-w", "--stdin", input_=new.encode())
    who = {
        "GIT_AUTHOR_NAME": "meshc controlplane",
        "GIT_AUTHOR_EMAIL": "meshc@localhost",
        "GIT_COMMITTER_NAME": "meshc controlplane",
        "GIT_COMMITTER_EMAIL": "meshc@localhost",
    }
    with tempfile.TemporaryDirectory(prefix="meshc-promote-") as tmp:
        env = {**who, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(repo, "read-tree", base, env=env)
        _git(repo, "update-index", "--cacheinfo", f"{mode},{blob},{path}", env=env)
        tree = _git(repo, "write-tree", env=env)
    split = split_text(rec["splits"][str(weight)])
    message = (
        f"Promote Canary {rec['mesh']}/{rec['name']}: {rec['route']['kind']} {rec['route']['name']} "
        f"at {split}\n\nThe canary passed every step on the control plane; this commit makes Git say what "
        f"the data planes run. Made by meshc controlplane --promote-commit, never pushed by it.\n"
    )
    commit = _git(repo, "commit-tree", tree, "-p", base, "-m", message, env=who)
    _git(repo, "update-ref", f"refs/heads/{branch}", commit)
    return commit
