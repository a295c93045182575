"""The long fuzzing run (issue 17 #2): the suite's fuzz properties with many more examples, and
optionally the atheris (coverage-guided) harnesses.

``tests/runtime/test_fuzz.py`` (HTTP/1 request and response readers, the decision layer on the
compiled seed, signed bundle and endpoint pushes with mutated bodies, and HTTP/2 sans-io: h2 as
meshc configures it fed malformed frame sequences, the GOAWAY filter) runs in ``make test`` with
300 examples per property and a fixed seed; here each property gets ``--examples`` (default
20,000) with a fresh random seed, in a child pytest process bounded by ``--timeout``. The
compiler's own fuzzing (mutated YAML -> diagnostics, never a traceback) runs beside it from
``tests/compiler/test_properties.py``. ``tests/runtime/test_fuzz_h2.py`` (malformed HTTP/2 over
real sockets to a sidecar chain, on each data plane) gets ``--h2-examples`` (default 3,000: each
is a few connections). ``--h2`` runs only the HTTP/2 targets.

``--atheris`` also runs ``bench/atheris_h1.py``, ``atheris_h2.py`` and ``atheris_yaml.py`` for
``--atheris-seconds`` each (libFuzzer's ``-max_total_time``; needs the ``fuzz`` extra:
``pip install -e '.[fuzz]'``); a crash's input is written to ``bench/results/atheris-*``.

A failure prints hypothesis's shrunk example (or libFuzzer's crash) and makes this script exit 1.
Figures (examples, seconds, result; atheris runs and coverage) go to ``bench/results/fuzz.json``
(``fuzz_h2.json`` with ``--h2``).

    .venv/bin/python bench/fuzz.py [--examples 20000] [--h2-examples 3000] [--h2] [--atheris]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
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
    "h2-sockets": "tests/runtime/test_fuzz_h2.py",
}
H2_TARGETS = {
    "h2-sans-io": "tests/runtime/test_fuzz.py -k h2_frames or goaway_filter",
    "h2-sockets": "tests/runtime/test_fuzz_h2.py",
}
ATHERIS = ["atheris_h1", "atheris_h2", "atheris_yaml"]


def run(target: str, examples: int, h2_examples: int, timeout: float) -> dict[str, object]:
    env = {
        **os.environ,
        "MESHC_FUZZ_EXAMPLES": str(examples),
        "MESHC_FUZZ_H2_EXAMPLES": str(h2_examples),
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    path, _, select = target.partition(" -k ")
    cmd.append(path)
    if select:
        cmd += ["-k", select]
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
        "examples_per_property": h2_examples if "test_fuzz_h2" in target else examples,
        "seconds": round(seconds, 1),
        "result": "passed" if code == 0 else "failed",
        "summary": tail[0] if tail else "",
        "output_tail": out.splitlines()[-40:] if code != 0 else [],
    }


def run_atheris(name: str, seconds: int) -> dict[str, object]:
    """One harness for ``seconds`` (libFuzzer's own bound), plus a margin for start-up."""
    prefix = BENCH / "results" / f"atheris-{name.removeprefix('atheris_')}-"
    cmd = [
        sys.executable,
        str(BENCH / f"{name}.py"),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={prefix}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {seconds + 120} s\n{e.stderr or ''}"
    runs = re.findall(r"Done (\d+) runs in (\d+) second", out)
    cov = re.findall(r"cov: (\d+)", out)
    done = f"{runs[-1][0]} runs in {runs[-1][1]} s" if runs else ""
    return {
        "target": f"bench/{name}.py",
        "runs": int(runs[-1][0]) if runs else 0,
        "coverage_edges": int(cov[-1]) if cov else 0,
        "seconds": round(time.monotonic() - t0, 1),
        "result": "passed" if code == 0 else "failed",
        "summary": done,
        "output_tail": [line for line in out.splitlines() if not line.startswith("#")][-40:] if code else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--h2-examples", type=int, default=3_000, help="per data plane, over sockets")
    ap.add_argument("--h2", action="store_true", help="only the HTTP/2 targets")
    ap.add_argument("--atheris", action="store_true", help="also the atheris harnesses (the fuzz extra)")
    ap.add_argument("--atheris-seconds", type=int, default=300, help="per harness")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per target")
    ap.add_argument("--out", type=Path, help="default bench/results/fuzz.json (--h2: fuzz_h2.json)")
    args = ap.parse_args()
    args.out = args.out or BENCH / "results" / ("fuzz_h2.json" if args.h2 else "fuzz.json")
    targets = H2_TARGETS if args.h2 else TARGETS
    results = {name: run(t, args.examples, args.h2_examples, args.timeout) for name, t in targets.items()}
    if args.atheris:
        if importlib.util.find_spec("atheris") is None:
            print("atheris is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
            return 2
        for name in ATHERIS:
            harnesses = [n for n in ATHERIS if not args.h2 or n == "atheris_h2"]
            if name in harnesses:
                results[name] = run_atheris(name, args.atheris_seconds)
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
