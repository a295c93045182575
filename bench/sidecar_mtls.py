"""The mTLS column of the sidecar benchmark (issue 6): the same constant-rate two-sidecar runs as
``bench/sidecar_fast.py`` (client -> outbound sidecar -> inbound sidecar -> app, 90/10 split over
two nginx apps, 1 KiB bodies, 16 keep-alive client connections), with the Mesh's mTLS off and on.

The sidecars run as in production: a real ``meshc controlplane`` compiles a small policy dir
(Mesh, Services, the 90/10 TrafficRoute, a TrafficPermission), the three sidecars (magnanimo's
outbound, benigno v1 and v2 inbound) register with bootstrap tokens and get their certificates
and signed pushes from it. Only the Mesh changes between runs (the control plane follows the work
tree and pushes it): plaintext and mTLS STRICT alternate (``--rounds`` pairs) on the same
processes, and the ratio is taken between the medians (CPU accounting on a shared machine drifts
by tens of percent between rounds). Per data path (aiohttp, fast):

* CPU microseconds per request of the three sidecars together (``/proc/<pid>/stat`` deltas);
* added latency (p50/p90/p99 from each request's *scheduled* send time);
* TLS handshakes per request on the inbound sides (``meshc_inbound_connections_total``): pooled
  keep-alive connections are reused, so this stays near 0 (a handshake per request is a bug).

Sidecars are pinned to CPU 0; the apps, the load generator and the control plane to CPU 1.
Target (issue 6): mTLS costs at most 30% more CPU per request on the aiohttp path.
JSON goes to ``bench/results/sidecar_mtls.json``. Every process started here is killed by PID.

    .venv/bin/python bench/sidecar_mtls.py [--duration 10] [--rate-aiohttp 300] [--rate-fast 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import sidecar_fast as sf  # noqa: E402

from compiler.ca import TokenIssuer  # noqa: E402

TARGET_AIOHTTP_CPU_RATIO = 1.30

_MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec:
{mtls}  networking: {{outbound: {{passthrough: true}}}}
"""
_MTLS = """\
  mtls:
    enabledBackend: ca-1
    backends: [{name: ca-1, type: builtin, mode: STRICT, dpCert: {rotation: {expiration: 1d}}}]
"""
_POLICIES = """\
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: benigno}
spec: {port: 5000, protocol: http, subsets: [{version: v1}, {version: v2}]}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: magnanimo}
spec: {port: 4000, protocol: http}
---
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata: {name: split}
spec:
  sources: [{match: {kuma.io/service: magnanimo}}]
  destinations: [{match: {kuma.io/service: benigno}}]
  conf:
    split:
      - {weight: 90, destination: {kuma.io/service: benigno, version: v1}}
      - {weight: 10, destination: {kuma.io/service: benigno, version: v2}}
---
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {name: magnanimo-to-benigno}
spec:
  sources: [{match: {kuma.io/service: magnanimo}}]
  destinations: [{match: {kuma.io/service: benigno}}]
"""


def _get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.read()


def _wait(cond: Callable[[], bool], what: str, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if cond():
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _config(admin: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_get(f"http://{admin}/config"))
    return doc


def _metric(admin: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in _get(f"http://{admin}/metrics").decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rpartition(" ")[2])
    return total


def _set_mesh(policies: Path, mtls: bool) -> None:
    (policies / "mesh.yaml").write_text(_MESH.format(mtls=_MTLS if mtls else ""))


def _mesh_applied(admins: list[str], mtls: bool) -> bool:
    for admin in admins:
        cfg = _config(admin)
        mesh = cfg["bundles"]["mesh"]["bundle"]
        if bool(mesh["mtls"]["enabled"]) != mtls or not cfg["ready"]:
            return False
        if mtls and not cfg["certificate"]:
            return False
    return True


def _run(port: int, pids: list[int], inbound_admins: list[str], rate: int, duration: float) -> dict[str, Any]:
    target, host = "http://benigno:5000/", "benigno:5000"
    sf._rate(port, target, host, rate, 2)  # warm-up: pools filled, first handshakes done
    hs0 = sum(_metric(a, "meshc_inbound_connections_total", result="accepted") for a in inbound_admins)
    cpu0 = sf._cpu_s(pids)
    doc = sf._rate(port, target, host, rate, duration)
    cpu = sf._cpu_s(pids) - cpu0
    hs = sum(_metric(a, "meshc_inbound_connections_total", result="accepted") for a in inbound_admins) - hs0
    n = max(1, doc["requests"])
    doc["cpu_us_per_request_all_sidecars"] = round(cpu / n * 1e6, 1)
    doc["inbound_connections_per_request"] = round(hs / n, 5)
    return doc


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per constant-rate run")
    p.add_argument("--rate-aiohttp", type=int, default=300, help="constant rate on the aiohttp path")
    p.add_argument("--rate-fast", type=int, default=1000, help="constant rate on the fast path")
    p.add_argument("--rounds", type=int, default=3, help="plaintext/mTLS pairs per data path (medians)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install nginx and wrk")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "sidecar_mtls.json")
    ns = p.parse_args(argv)
    tools = sf.ensure_tools(not ns.no_install)
    if tools["nginx"] is None:
        print("nginx is needed (apt-get install nginx)", file=sys.stderr)
        return 2
    procs = sf.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="meshc-bench-mtls-"))
    results: dict[str, Any] = {}
    try:
        _, v1, v2 = sf._apps(procs, tmp)
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "policies.yaml").write_text(_POLICIES)
        _set_mesh(policies, mtls=False)
        cp_state = tmp / "cp"
        tokens = TokenIssuer(cp_state)
        cp_port = sf._free_port()
        cp_url = f"http://127.0.0.1:{cp_port}"
        env = {**os.environ, "PYTHONPATH": str(sf.REPO)}
        procs.start(
            [sf.PY, "-m", "compiler.cli", "controlplane", str(policies), "--out", str(tmp / "out"),
             "--state-dir", str(cp_state), "--listen", f"127.0.0.1:{cp_port}"],
            sf.CLIENT_CPU, env=env, cwd=sf.REPO,
        )  # fmt: skip
        _wait(lambda: bool(_get(cp_url + "/healthz")), "the control plane")
        for path, rate in (("aiohttp", ns.rate_aiohttp), ("fast", ns.rate_fast)):
            print(f"== {path} path, {rate} rps", flush=True)
            _set_mesh(policies, mtls=False)
            started, admins = [], []
            for version, app in (("v1", v1), ("v2", v2)):
                proc, info = sf._sidecar(procs, [
                    "--service", "benigno", "--tag", f"version={version}", "--app", f"127.0.0.1:{app}",
                    "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--control-plane", cp_url,
                    "--token", tokens.mint("default", "benigno"),
                    "--state-dir", str(tmp / f"{path}-{version}"),
                    "--dataplane", path,
                ])  # fmt: skip
                started.append(proc)
                admins.append(info["admin"])
            proc, info = sf._sidecar(procs, [
                "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--control-plane", cp_url, "--token", tokens.mint("default", "magnanimo"),
                "--state-dir", str(tmp / f"{path}-magnanimo"), "--dataplane", path,
            ])  # fmt: skip
            started.append(proc)
            out_admin = info["admin"]
            port = int(info["outbound"].rpartition(":")[2])

            def routed(admin: str = out_admin) -> bool:
                eps = (_config(admin).get("endpoints") or {}).get("services") or {}
                return len(eps.get("benigno", [])) == 2

            _wait(routed, "the outbound sidecar to know both benigno instances")
            pids = [s.pid for s in started]
            runs: dict[str, Any] = {"plaintext": [], "mtls": []}
            for _ in range(ns.rounds):
                for label, mtls in (("plaintext", False), ("mtls", True)):
                    _set_mesh(policies, mtls)
                    everyone = [*admins, out_admin]
                    _wait(lambda m=mtls, a=everyone: _mesh_applied(a, m), f"mesh mTLS={mtls} everywhere")
                    doc = _run(port, pids, admins, rate, ns.duration)
                    runs[label].append(doc)
                    print(f"   {label}: {json.dumps(doc)}", flush=True)
            med = {
                k: _median([r["cpu_us_per_request_all_sidecars"] for r in runs[k]])
                for k in ("plaintext", "mtls")
            }
            runs["median_cpu_us_per_request"] = med
            runs["mtls_cpu_per_request_ratio"] = round(med["mtls"] / med["plaintext"], 3)
            runs["median_added_p50_ms"] = {
                k: round(_median([r["p50_ms"] for r in runs[k]]), 3) for k in ("plaintext", "mtls")
            }
            runs["rate"] = rate
            results[path] = runs
            for s in started:
                procs.stop(s)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "aiohttp_mtls_cpu_ratio": results["aiohttp"]["mtls_cpu_per_request_ratio"],
        "fast_mtls_cpu_ratio": results["fast"]["mtls_cpu_per_request_ratio"],
        "target_aiohttp_ratio_max": TARGET_AIOHTTP_CPU_RATIO,
        "aiohttp_meets_target": results["aiohttp"]["mtls_cpu_per_request_ratio"] <= TARGET_AIOHTTP_CPU_RATIO,
        "handshakes_per_request_mtls": {
            k: max(r["inbound_connections_per_request"] for r in v["mtls"]) for k, v in results.items()
        },
    }
    doc = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "method": {"duration_s": ns.duration, "connections": 16, "body_bytes": sf.BODY, "split": "90/10",
                   "chain": "client -> outbound sidecar -> inbound sidecar (v1/v2) -> nginx app",
                   "mtls": "Mesh mTLS STRICT, builtin CA, ECDSA P-256 certificates, TLS 1.3",
                   "order": "plaintext and mTLS alternating on the same processes (--rounds pairs); "
                            "ratio of the medians (CPU accounting on a shared machine drifts +-30%)",
                   "pinning": "sidecars on CPU 0; apps, load generator and control plane on CPU 1"},
        "results": results,
        "summary": summary,
    }  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.TimeoutExpired as e:
        print(f"timed out: {e}", file=sys.stderr)
        sys.exit(2)
