"""``--ref``: validate and compile a policy directory as committed, whatever the work tree holds.

A real repository (``git init``, real commits) in a temporary directory, and the real ``meshc``
command in subprocesses, run from inside the policy directory so that paths relative to the
repository root (what CI annotations need) differ from paths relative to the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="Test",
        GIT_COMMITTER_EMAIL="test@example.com",
        GIT_AUTHOR_DATE="2026-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2026-01-01T00:00:00Z",
    )
    return env


def meshc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Three commits of ``policies/``; HEAD~1 has a bad reference, HEAD is clean (90/10)."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    (root / "README.md").write_text("not policy\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "seed")
    _replace(policies / "traffic-route.yaml", "version: v2", "version: v3")  # E2002
    (policies / ".drafts").mkdir()
    (policies / ".drafts" / "broken.yaml").write_text("kind: [\n")  # hidden: never read
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "canary to an undeclared subset")
    _replace(policies / "traffic-route.yaml", "version: v3", "version: v2")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "fix the canary")
    return root


def test_ref_reads_the_committed_content_not_the_work_tree(repo: Path) -> None:
    policies = repo / "policies"
    # The work tree differs from every commit: an uncommitted error and an untracked broken file.
    _replace(policies / "benigno-retry.yaml", "numRetries: 2", "numRetries: two")
    (policies / "untracked.yaml").write_text("apiVersion: kuma.io/v1alpha1\nkind: Timeout\nspec: [\n")

    work = meshc(policies, "validate", ".", "--format", "json")
    assert work.returncode == 1, work.stderr
    assert {d["file"] for d in report(work)["diagnostics"]} == {
        "policies/benigno-retry.yaml",
        "policies/untracked.yaml",
    }

    head = meshc(policies, "validate", ".", "--ref", "HEAD", "--format", "json")
    assert head.returncode == 0, head.stdout + head.stderr
    assert report(head)["diagnostics"] == []
    assert report(head)["summary"]["files"] == len(list(POLICIES.glob("*.yaml")))

    prev = meshc(policies, "validate", ".", "--ref", "HEAD~1", "--format", "json")
    assert prev.returncode == 1
    [d] = report(prev)["diagnostics"]
    # Relative to the repository root, not to the working directory or the policy directory.
    assert (d["file"], d["code"], d["line"]) == ("policies/traffic-route.yaml", "E2002", 24)

    text = meshc(repo, "validate", "policies", "--ref", "HEAD~1")
    assert text.returncode == 1
    assert text.stdout.startswith("policies/traffic-route.yaml:24:")


def test_compile_ref_builds_the_commit(repo: Path, tmp_path: Path) -> None:
    policies = repo / "policies"
    sha = git(repo, "rev-parse", "HEAD")
    # A valid work-tree change (50/50) that must not leak into the compile of HEAD.
    _replace(policies / "traffic-route.yaml", "weight: 90", "weight: 50")
    _replace(policies / "traffic-route.yaml", "weight: 10", "weight: 50")

    out_ref = tmp_path / "out-ref"
    proc = meshc(policies, "compile", ".", "--ref", "HEAD", "--out", str(out_ref))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rel = json.loads((out_ref / "releases" / f"{sha}.json").read_bytes())
    assert rel["commit"] == sha
    assert {p["file"] for k in rel["provenance"] for p in rel["provenance"][k]} <= {
        f"policies/{p.name}" for p in POLICIES.glob("*.yaml")
    }

    # The same commit as a plain directory (no Git) gives the same bundles.
    plain = tmp_path / "plain"
    shutil.copytree(POLICIES, plain)
    out_plain = tmp_path / "out-plain"
    assert meshc(tmp_path, "compile", str(plain), "--out", str(out_plain)).returncode == 0
    [plain_release] = list((out_plain / "releases").glob("*.json"))
    assert json.loads(plain_release.read_bytes())["bundles"] == rel["bundles"]

    # The work tree (50/50) differs in magnanimo's bundle, and only there.
    out_work = tmp_path / "out-work"
    assert meshc(policies, "compile", ".", "--out", str(out_work)).returncode == 0
    [work_release] = list((out_work / "releases").glob("*.json"))
    work = json.loads(work_release.read_bytes())["bundles"]
    assert {k for k in work if work[k] != rel["bundles"][k]} == {"default/magnanimo"}

    # A commit with errors compiles to nothing.
    out_bad = tmp_path / "out-bad"
    bad = meshc(policies, "compile", ".", "--ref", "HEAD~1", "--out", str(out_bad))
    assert bad.returncode == 1
    assert not out_bad.exists() or not any(out_bad.rglob("*"))


def test_bad_ref_is_exit_2(repo: Path) -> None:
    proc = meshc(repo / "policies", "validate", ".", "--ref", "no-such-branch")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no-such-branch" in proc.stderr


def test_ref_outside_a_repository_is_exit_2(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(POLICIES, plain)
    proc = meshc(plain, "validate", ".", "--ref", "HEAD")
    assert proc.returncode == 2
    assert "Git" in proc.stderr or "git" in proc.stderr
