"""What the Kubernetes tests share: where the seed manifests are, and the real CLI in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "docs" / "kubernetes" / "seed"
GOLDEN = Path(__file__).resolve().parent / "golden"


def meshc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
