"""Route-level timeout/retry benchmark (issue 12): the decision cost per outbound request.

What every HTTP data plane does per request before its first byte goes out, sans-io and in one
process per checkout: ``decide_outbound`` (route match, split, the verdict) and ``RetryState``
(the deadline and retry policy, from the route rule's own conf where it has one). Three
destinations of the same service: no route, a route rule without its own conf, a route rule with
its own timeout and retry. Each checkout (this one, and with ``--baseline DIR`` another, e.g.
``/work/main``, whose ``RetryState`` may not take the route's policy) runs in its own subprocess,
alternately, best of ``--rounds``; the ratios are against this checkout's no-route case measured
in the same run. JSON goes to ``bench/results/route_policy.json``.

    .venv/bin/python bench/route_policy.py [--baseline /work/main] [--n 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "route_policy.json"

CHILD = r"""
import inspect, json, random, sys, time
from runtime.bundle import (CatalogService, Destination, HttpMatch, HttpRetry, HttpRoute, MeshBundle,
    RetryConf, RouteConf, Rule, ServiceBundle, Split, StringMatch, TimeoutConf)
from runtime.decide import RetryState, decide_outbound
from runtime.engine import Engine
from runtime.protocol import Endpoint, EndpointSet

n = int(sys.argv[1])
split = (Split(weight=1, service="benigno"),)
match = HttpMatch(path=StringMatch(kind="prefix", value="/api"))
own = {"timeout": TimeoutConf(http_request_timeout_ms=300), "retry": RetryConf(http=HttpRetry(num_retries=2))}
takes_route = "route" in inspect.signature(RetryState.__init__).parameters
if not takes_route:
    own = {}
cases = {
    "no_route": RouteConf(split=split),
    "route": RouteConf(split=split, http=(HttpRoute(match=match, split=split),)),
    "route_policy": RouteConf(split=split, http=(HttpRoute(match=match, split=split, **own),)),
}

class Head:
    method = "GET"
    has_body = False
    upgrade = None
    def authority(self): return "benigno"
    def path(self): return "/api/x"
    def query_string(self): return ""
    def header_map(self): return {}

import runtime.decide
out = {"takes_route": takes_route, "runtime": runtime.decide.__file__}
head = Head()
for name, route in cases.items():
    dest = Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))
    mesh = MeshBundle(mesh="default", services={"benigno": CatalogService(port=5000, protocol="http")},
                      destinations={"benigno": dest})
    eps = EndpointSet(generation=1, services={"benigno": [Endpoint(address="127.0.0.1:1", tags={})]})
    engine = Engine("magnanimo", {}, rng=random.Random(1))
    engine.install(engine.build(mesh, ServiceBundle(mesh="default", service="magnanimo"), eps))
    snap = engine.snapshot
    t0 = time.perf_counter()
    for _ in range(n):
        fwd = decide_outbound(engine, snap, head, "benigno", None, ())
        if takes_route:
            RetryState(fwd.target, "GET", 0, 0.0, fwd.policy)
        else:
            RetryState(fwd.target, "GET", 0, 0.0)
    out[name] = (time.perf_counter() - t0) / n * 1e9
print(json.dumps(out))
"""


def _run(repo: Path, n: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(n)], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout to measure in the same run")
    p.add_argument("--n", type=int, default=200_000, help="requests decided per case")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best is kept")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    repos = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for label, repo in repos.items():
            got = _run(repo, args.n)
            mine = best.setdefault(label, dict(got))
            for k, v in got.items():
                if isinstance(v, float):
                    mine[k] = min(mine[k], v)
    base = best["this"]["no_route"]
    ratios = {
        f"{label}.{k}": round(v / base, 3)
        for label, r in best.items()
        for k, v in r.items()
        if isinstance(v, float)
    }
    report = {
        "ns_per_request": best,
        "ratio_to_this_no_route": ratios,
        "n": args.n,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    for label, r in best.items():
        print(label, {k: (round(v) if isinstance(v, float) else v) for k, v in r.items()})
    print("ratios to this checkout's no-route case:", ratios)
    print(f"load average {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
