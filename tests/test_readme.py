"""The README stands on its own and its examples are what the commands really print."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_no_reference_a_clone_does_not_have() -> None:
    assert "../shared" not in README and "DESIGN §" not in README
    assert not re.search(r"^open http", README, re.M), "`open URL` is macOS-only"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_the_plan_example_is_what_the_50_50_edit_prints(tmp_path: Path) -> None:
    example = r"```text\n\$ meshc plan policies/ --base origin/main --exit-code\n(.*?)```"
    block = re.search(example, README, re.S)
    assert block is not None, "the README's plan example is gone"
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "policies", repo / "policies")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "seed")
    _git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
    route = repo / "policies" / "traffic-route.yaml"
    text = route.read_text().replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50")
    route.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "plan", "policies/", "--base", "origin/main", "--exit-code"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == block.group(1)
