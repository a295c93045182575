"""Helpers for the control plane's end-to-end tests: a temp Git repo of the seed policies, traffic
through the gateway, and binomial bounds."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]

V1 = "Hello World, Benigno:"
V2 = "Hello World, Benigno, Canary Release:"


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=meshc-test", "-c", "user.email=test@meshc.invalid", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def make_policy_repo(root: Path) -> Path:
    """A Git repo holding a copy of the seed policies on branch main; returns its root."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "policies", root / "policies")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "policies")
    git(root, "commit", "-q", "-m", "seed policies")
    return root


def commit_file(repo: Path, rel: str, text: str, message: str) -> str:
    (repo / rel).write_text(text)
    git(repo, "add", rel)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@dataclass
class Tally:
    v1: int = 0
    v2: int = 0
    failed: int = 0
    other: int = 0

    @property
    def n(self) -> int:
        return self.v1 + self.v2

    @property
    def canary_share(self) -> float:
        return self.v2 / max(self.n, 1)


async def _drive(url: str, n: int, concurrency: int) -> Tally:
    t = Tally()
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as s:

        async def one() -> None:
            async with sem:
                try:
                    async with s.get(url) as r:
                        text = await r.text()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    t.failed += 1
                    return
            if status != 200:
                t.failed += 1
            elif text.startswith(V2):
                t.v2 += 1
            elif text.startswith(V1):
                t.v1 += 1
            else:
                t.other += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return t


def drive(url: str, n: int, concurrency: int = 16) -> Tally:
    return asyncio.run(_drive(url, n, concurrency))


def within_binomial(t: Tally, p: float, z: float = 5.3) -> bool:
    """|share - p| <= z * sd: a correct split falls outside less than once in a million runs."""
    return abs(t.canary_share - p) <= z * math.sqrt(p * (1 - p) / max(t.n, 1))


CHROMIUM = Path("/usr/bin/chromium")


def chromium_api() -> Any:
    """playwright's sync API, or a skip that says what is missing (Debian's chromium, playwright)."""
    import pytest

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    return pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


def launch_chromium(pw: Any) -> Any:
    """Headless Debian Chromium, no network of its own beyond what the page asks for."""
    return pw.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--no-sandbox",
            "--headless",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ],
    )
