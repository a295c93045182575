"""The admin API's liveness answer and ``--token-file`` (what Kubernetes probes and mounts use)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from runtime_harness import REPO, Plane


def test_live_answers_while_not_ready(plane: Callable[..., Plane]) -> None:
    p = plane("--service", "benigno", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    status, body = p.admin_request("GET", "/live")
    assert status == 200 and json.loads(body) == {"live": True}
    status, body = p.admin_request("GET", "/ready")
    assert status == 503 and json.loads(body)["ready"] is False  # no bundle yet: live, not ready


def test_token_file_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "compiler.cli",
            "sidecar",
            "--service",
            "s",
            "--token-file",
            str(tmp_path / "no"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "--token-file" in res.stderr and "No such file" in res.stderr
