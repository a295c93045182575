"""The long fuzzing run (issue 17 #2): the suite's fuzz properties with many more examples.

``tests/runtime/test_fuzz.py`` (HTTP/1 request and response readers, the decision layer on the
compiled seed, signed bundle and endpoint pushes with mutated bodies) runs in ``make test`` with
300 examples per property and a fixed seed; here each property gets ``--examples`` (default
20,000) with a fresh random seed, in a child pytest process bounded by ``--timeout``. The
compiler's own fuzzing (mutated YAML -> diagnostics, never a traceback) runs beside it from
``tests/compiler/test_properties.py``. A failure prints hypothesis's shrunk example and makes
this script exit 1. Figures (examples, seconds, examples per second, result) go to
``bench/results/fuzz.json``.

    .venv/bin/python bench/fuzz.py [--examples 20000] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TARGETS = {
    "runtime": "tests/runtime/test_fuzz.py",
    "compiler-mutated-yaml": (
        "tests/compiler/test_properties.py::test_mutated_yaml_gives_diagnostics_not_tracebacks"
    ),
}


def run(target: str, examples: int, timeout: float) -> dict[str, object]:
    env = {**os.environ, "MESHC_FUZZ_EXAMPLES": str(examples), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    cmd.append(target)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {timeout} s\n{e.stdout or ''}"
    seconds = time.monotonic() - t0
    tail = [line for line in out.splitlines() if "passed" in line or "failed" in line][-1:]
    return {
        "target": target,
        "examples_per_property": examples,
        "seconds": round(seconds, 1),
        "result": "passed" if code == 0 else "failed",
        "summary": tail[0] if tail else "",
        "output_tail": out.splitlines()[-40:] if code != 0 else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per target")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "fuzz.json")
    args = ap.parse_args()
    results = {name: run(target, args.examples, args.timeout) for name, target in TARGETS.items()}
    doc = {"bench": "fuzz", "python": platform.python_version(), "targets": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:24} {r['result']:7} {r['seconds']:8.1f} s  {r['summary']}")
        for line in r["output_tail"]:  # type: ignore[attr-defined]
            print("   ", line)
    return 0 if all(r["result"] == "passed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
