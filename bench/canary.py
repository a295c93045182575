"""Canary compile cost (issue 16): not a test, a measurement.

A Canary makes the compiler build its route once more per step weight. This measures what that
adds where it matters, in the control plane's incremental compiler: on a generated repo
(``bench/compile.py``'s generator), the median time of a one-route edit with no Canary (the
baseline, same run) and with a three-weight Canary on another route, and the cold compile of
each; prints the ratios and writes ``bench/results/canary.json``.

    .venv/bin/python bench/canary.py               # 1,000 services
    .venv/bin/python bench/canary.py --services 10000
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "canary.json"
CANARY = """\
apiVersion: meshc/v1alpha1
kind: Canary
mesh: default
metadata: {name: svc-00004-v2}
spec:
  targetRef: {kind: TrafficRoute, name: svc-00003-to-svc-00004}
  canary: {version: v2}
  steps: [{setWeight: 20}, {pause: {}}, {setWeight: 50}, {setWeight: 100}]
"""


def measure(repo: Path, edits: int) -> dict[str, Any]:
    from compiler.incremental import IncrementalCompiler
    from compiler.source import read_policy_dir

    inc = IncrementalCompiler()
    t = time.perf_counter()
    first = inc.update(read_policy_dir(repo))
    cold = time.perf_counter() - t
    assert first.result.errors == 0, [d.message for d in first.result.diagnostics][:3]
    f = repo / "services" / "svc-00007.yaml"
    orig = f.read_text()
    times = []
    try:
        for i in range(edits):
            f.write_text(re.sub(r"weight: \d+", f"weight: {50 + i % 40}", orig, count=1))
            t = time.perf_counter()
            upd = inc.update(read_policy_dir(repo))
            times.append(time.perf_counter() - t)
            assert upd.changed == ["default/svc-00007"], upd.changed
    finally:
        f.write_text(orig)
    return {
        "cold_s": round(cold, 3),
        "edit_median_s": round(statistics.median(times), 4),
        "edits": edits,
        "canaries": len(first.result.canaries),
        "step_bundles": len(first.result.step_bundles),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshc-bench-canary-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(
            [sys.executable, str(HERE / "compile.py"), "--generate", str(args.services), "--dir", str(repo)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        base = measure(repo, args.edits)
        (repo / "canary.yaml").write_text(CANARY)
        with_canary = measure(repo, args.edits)
    ratio_edit = with_canary["edit_median_s"] / base["edit_median_s"]
    ratio_cold = with_canary["cold_s"] / base["cold_s"]
    doc = {
        "services": args.services,
        "python": platform.python_version(),
        "baseline_no_canary": base,
        "with_canary": with_canary,
        "ratio_edit": round(ratio_edit, 3),
        "ratio_cold": round(ratio_cold, 3),
    }
    print(
        f"{args.services} services: one-route edit {base['edit_median_s'] * 1000:.1f} ms without a Canary, "
        f"{with_canary['edit_median_s'] * 1000:.1f} ms with one ({ratio_edit:.2f}x); cold "
        f"{base['cold_s']:.2f} s vs {with_canary['cold_s']:.2f} s ({ratio_cold:.2f}x); "
        f"{with_canary['step_bundles']} step bundle(s)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
