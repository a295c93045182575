"""The ``meshc-validate`` pre-commit hook, run by pre-commit itself (``pre-commit try-repo``).

A temporary Git repo of policies (a copy of ``policies/``) tries this repository's hook at its
committed HEAD, as a user's policy repo would: pre-commit builds the hook's virtualenv with pip
(``language: python``) from the committed package, then runs ``meshc validate policies/`` once.
The hook environment is built once per session in a temporary ``PRE_COMMIT_HOME``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRE_COMMIT = Path(sys.executable).with_name("pre-commit")

pytestmark = pytest.mark.timeout(900)

# pip's own words when the hook environment cannot be built without the network.
_OFFLINE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "No matching distribution found",
    "Could not find a version that satisfies",
)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def hook_rev() -> str:
    if not PRE_COMMIT.exists():
        pytest.skip(f"pre-commit is not installed beside {sys.executable} (pip install -e '.[test]')")
    if subprocess.run(
        ["git", "cat-file", "-e", "HEAD:.pre-commit-hooks.yaml"], cwd=REPO, capture_output=True
    ).returncode:
        pytest.skip("this checkout's HEAD has no .pre-commit-hooks.yaml (try-repo uses the committed HEAD)")
    return _git(REPO, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def pre_commit_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pre-commit-home")


def _policy_repo(root: Path) -> Path:
    repo = root / "policy-repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    shutil.copytree(REPO / "policies", repo / "policies")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "policies")
    return repo


def _try_repo(repo: Path, rev: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never"}
    env.pop("PRE_COMMIT", None)
    proc = subprocess.run(
        [str(PRE_COMMIT), "try-repo", str(REPO), "meshc-validate", "--ref", rev, "--all-files"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "An unexpected error has occurred" in out:
        log = home / "pre-commit.log"
        detail = log.read_text() if log.exists() else out
        if any(s in detail for s in _OFFLINE):
            pytest.skip(
                f"pre-commit could not build the hook's virtualenv without the network:\n{detail[-800:]}"
            )
        pytest.fail(f"pre-commit failed to run the hook:\n{out}\n{detail[-3000:]}")
    return proc


def test_hook_passes_on_valid_policies(tmp_path: Path, hook_rev: str, pre_commit_home: Path) -> None:
    repo = _policy_repo(tmp_path)
    proc = _try_repo(repo, hook_rev, pre_commit_home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "meshc validate" in out and "Passed" in out


def test_hook_fails_on_a_broken_policy(tmp_path: Path, hook_rev: str, pre_commit_home: Path) -> None:
    repo = _policy_repo(tmp_path)
    route = repo / "policies" / "traffic-route.yaml"
    route.write_text(route.read_text().replace("version: v2", "version: v9"))
    _git(repo, "commit", "-q", "-am", "a canary subset nobody runs")
    proc = _try_repo(repo, hook_rev, pre_commit_home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Failed" in out
    # The hook prints meshc's own diagnostics: file, line, column, code.
    assert "policies/traffic-route.yaml:" in out and "E2002" in out
