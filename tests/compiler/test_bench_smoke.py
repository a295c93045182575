"""bench/compile.py --quick runs end to end (a smoke test; the figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_compile_quick(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["services"] == 200 and run["compile"]["bundles"] == 201
    inc = run["incremental"]
    assert inc["byte_identical_to_cold"] and inc["rewritten_equals_changed"]
    assert inc["written"] == len(inc["behaviour_changed"]) == 1


def test_bench_pieces_formats_quick(tmp_path: Path) -> None:
    """bench/pieces_formats.py --quick: a one-destination change costs less than the whole
    scope in both formats (the figures themselves are not checked)."""
    out = tmp_path / "pieces_formats.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pieces_formats.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["services"] == 1000
    assert max(report["change_push_bytes"].values()) < report["whole_scope_push_bytes"]
    assert report["manifest_bytes"]["1"] > report["manifest_bytes"]["2"]
