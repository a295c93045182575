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
