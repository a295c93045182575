"""Chaos under load (issue 17 #1): what the demo topology loses while things break.

The demo's processes (``compiler.demo.DemoMesh``: control plane, magnanimo, benigno v1 twice and
the v2 canary, a sidecar beside each, the gateway) on 127.0.0.1, with a copy of ``policies/``,
and a constant-rate client (``bench/_load.py rate``: each request scheduled at t0 + i/rate and
timed from then, so a stall is charged for its queue) sending ``--rate`` requests per second to
``/route1/hw2`` through the gateway. One scenario at a time, each on its own load run:

* ``app-killed``: benigno v1's first app is SIGKILLed; also: how long until magnanimo's sidecar
  sends it nothing (its health check failed or it was ejected: ``/config`` hosts, every 100 ms);
* ``sidecar-killed``: that instance's sidecar is SIGKILLed; also: how long until its address
  left magnanimo's endpoint set;
* ``controlplane-down``: the control plane is SIGKILLed for ``--cp-down`` seconds, then
  restarted; also: seconds from the restart until every data plane is SYNCED again;
* ``pushes``: ``--pushes`` commits to the TrafficRoute alternating 90/10 and 50/50, each waited
  for until the control plane serves the new release;
* ``slow-upstream``: benigno v1's first app answers after ``--slow`` seconds (the seed's Timeout
  says 5 s): the timeout and retries bound the latency, no request hangs;
* ``sidecar-restarted``: benigno v2's sidecar is stopped (SIGTERM, it drains) and started again
  from its state dir;
* ``slow-loris``: ``--loris`` connections trickling a request head and as many malformed
  requests against the gateway listener; also: the gateway's RSS before and after.

Each scenario reports requests sent, succeeded, failed (by status; ``error`` for a broken
connection) and latency percentiles; the success ratio is the figure to read. JSON goes to
``bench/results/chaos.json``. Every process is stopped by its PID at the end; only 127.0.0.1.

    .venv/bin/python bench/chaos.py [--rate 300] [--duration 20] [--only app-killed,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from compiler.demo import APPS, AppSpec, DemoMesh, free_port  # noqa: E402

TARGET = "/route1/hw2"
APPS_CHAOS = (*APPS, AppSpec("benigno-v1b", "benigno", {"version": "v1"}, ("benigno", "--version", "v1")))


def _get(url: str, timeout: float = 2.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def _admin(mesh: DemoMesh, name: str) -> str:
    port = mesh.gateway_admin if name == "gateway" else mesh.instances[name].admin
    return f"http://127.0.0.1:{port}"


def _benigno_addresses(mesh: DemoMesh) -> set[str]:
    cfg = json.loads(_get(_admin(mesh, "magnanimo") + "/config"))
    eps = (cfg.get("endpoints") or {}).get("services") or {}
    return {e["address"] for e in eps.get("benigno", [])}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Load:
    """One constant-rate run of ``bench/_load.py`` against the gateway, in a child process."""

    def __init__(self, mesh: DemoMesh, rate: float, duration: float) -> None:
        self.t0 = time.monotonic()
        cmd = [sys.executable, str(BENCH / "_load.py"), "rate", "--connect", f"127.0.0.1:{mesh.gateway_port}"]
        cmd += ["--target", TARGET, "--host-header", "localhost", "--rate", str(rate)]
        cmd += ["--duration", str(duration), "--conns", "32"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def at(self, seconds: float) -> None:
        """Wait until ``seconds`` into the run."""
        time.sleep(max(0.0, self.t0 + seconds - time.monotonic()))

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=600)
        data: dict[str, Any] = json.loads(out)
        statuses = {str(k): v for k, v in data.pop("statuses", {}).items()}
        ok = int(statuses.pop("200", 0))
        broken = data["errors"] - sum(statuses.values())
        failed = {**statuses, **({"error": broken} if broken else {})}
        return {
            "sent": data["requests"],
            "succeeded": ok,
            "failed": failed,
            "success_ratio": round(ok / data["requests"], 6) if data["requests"] else None,
            **{k: round(v, 2) for k, v in data.items() if k.endswith("_ms")},
        }


def _watch(until: threading.Event, sample: Callable[[], Any], every: float = 0.1) -> list[tuple[float, Any]]:
    """Samples of ``sample()`` every ``every`` s (errors are samples too) until ``until`` is set."""
    out: list[tuple[float, Any]] = []

    def loop() -> None:
        while not until.is_set():
            try:
                out.append((time.monotonic(), sample()))
            except (OSError, ValueError) as e:
                out.append((time.monotonic(), e))
            until.wait(every)

    threading.Thread(target=loop, daemon=True).start()
    return out


def _avoided(mesh: DemoMesh, address: str) -> bool:
    """Whether magnanimo's sidecar sends nothing to ``address`` (failed health check, ejected)."""
    host = json.loads(_get(_admin(mesh, "magnanimo") + "/config"))["hosts"].get(address) or {}
    return bool(host.get("ejected") or host.get("healthy") is False)


def app_killed(mesh: DemoMesh, load: Load) -> dict[str, Any]:
    address = f"127.0.0.1:{mesh.instances['benigno-v1'].inbound}"
    stop = threading.Event()
    samples = _watch(stop, lambda: _avoided(mesh, address))
    load.at(3.0)
    killed_at = time.monotonic()
    mesh.kill("app-benigno-v1")
    load.proc.wait()
    stop.set()
    avoided = next((t for t, v in samples if t > killed_at and v is True), None)
    mesh.start_app("benigno-v1")
    return {"no_request_to_it_after_s": round(avoided - killed_at, 2) if avoided else None}


def sidecar_killed(mesh: DemoMesh, load: Load) -> dict[str, Any]:
    address = f"127.0.0.1:{mesh.instances['benigno-v1'].inbound}"
    stop = threading.Event()
    samples = _watch(stop, lambda: address in _benigno_addresses(mesh))
    load.at(3.0)
    killed_at = time.monotonic()
    mesh.kill("sidecar-benigno-v1")
    load.proc.wait()
    stop.set()
    gone = next((t for t, v in samples if t > killed_at and v is False), None)
    mesh.start_sidecar("benigno-v1")
    return {"left_the_endpoint_set_after_s": round(gone - killed_at, 2) if gone else None}


def controlplane_down(mesh: DemoMesh, load: Load, down_s: float) -> dict[str, Any]:
    load.at(2.0)
    mesh.kill("controlplane")
    time.sleep(down_s)
    restarted = time.monotonic()
    mesh.start_controlplane()
    want = len(mesh.instances) + 1
    mesh.wait_until(lambda: mesh.synced() >= want, 120, "every data plane SYNCED after the restart")
    converged = time.monotonic() - restarted
    return {"down_s": down_s, "converged_after_restart_s": round(converged, 2)}


def pushes(mesh: DemoMesh, load: Load, n: int) -> dict[str, Any]:
    route = mesh.policy_dir / "traffic-route.yaml"
    text = route.read_text()
    variants = [text, text.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50")]
    t0 = time.monotonic()
    for i in range(1, n + 1):
        before = mesh.status()["release"]
        route.write_text(variants[i % 2])

        def moved(before: Any = before) -> bool:
            try:
                return bool(mesh.status()["release"] != before)
            except (OSError, ValueError):
                return False

        mesh.wait_until(moved, 60, f"release {i} of {n}", poll=0.02)
    route.write_text(variants[0])
    return {"pushes": n, "pushes_s": round(time.monotonic() - t0, 2)}


def slow_upstream(mesh: DemoMesh, load: Load, delay_s: float) -> dict[str, Any]:
    load.at(2.0)
    mesh.kill("app-benigno-v1")
    mesh.start_app("benigno-v1", "--delay", str(delay_s))
    load.proc.wait()
    mesh.kill("app-benigno-v1")
    mesh.start_app("benigno-v1")
    return {"upstream_delay_s": delay_s}


def sidecar_restarted(mesh: DemoMesh, load: Load) -> dict[str, Any]:
    load.at(3.0)
    t0 = time.monotonic()
    mesh.stop("sidecar-benigno-v2")
    mesh.forget("sidecar-benigno-v2")
    mesh.start_sidecar("benigno-v2")
    want = len(mesh.instances) + 1
    mesh.wait_until(lambda: mesh.synced() >= want, 60, "the restarted sidecar SYNCED")
    return {"back_after_s": round(time.monotonic() - t0, 2)}


def slow_loris(mesh: DemoMesh, load: Load, n: int) -> dict[str, Any]:
    gw = mesh.procs["gateway"].pid
    assert gw is not None
    rss_before = _rss_kb(gw)
    load.at(2.0)
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=10)
        s.sendall(b"GET /route1/hw2 HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        held.append(s)
    refused = 0
    for i in range(n):
        with socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=10) as s:
            s.sendall(
                b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: %d\r\n\r\n" % (i + 2)
            )
            refused += s.recv(64).startswith(b"HTTP/1.1 400 ")
    rss_peak = _rss_kb(gw)
    load.proc.wait()
    for s in held:
        s.close()
    time.sleep(2.0)
    return {
        "loris_connections": n,
        "malformed_refused_400": refused,
        "gateway_rss_kb": {"before": rss_before, "peak": rss_peak, "after": _rss_kb(gw)},
    }


SCENARIOS = (
    "app-killed",
    "sidecar-killed",
    "controlplane-down",
    "pushes",
    "slow-upstream",
    "sidecar-restarted",
    "slow-loris",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per scenario")
    ap.add_argument("--cp-down", type=float, default=20.0)
    ap.add_argument("--pushes", type=int, default=100)
    ap.add_argument("--loris", type=int, default=300)
    ap.add_argument("--slow", type=float, default=10.0, help="the slow upstream's delay (s)")
    ap.add_argument("--only", help="comma-separated scenarios (default: all)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "chaos.json")
    args = ap.parse_args()
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="meshc-chaos-"))
    policies = work / "policies"
    shutil.copytree(REPO / "policies", policies)
    mesh = DemoMesh(policies, work / "mesh", cp_port=free_port(), gateway_port=free_port(), apps=APPS_CHAOS)
    results: dict[str, Any] = {}
    try:
        mesh.start_all()
        mesh.wait_ready(120)
        for name in chosen:
            duration = args.duration + (args.cp_down if name == "controlplane-down" else 0.0)
            if name == "pushes":
                duration = max(args.duration, args.pushes * 0.5)
            load = Load(mesh, args.rate, duration)
            if name == "app-killed":
                extra = app_killed(mesh, load)
            elif name == "sidecar-killed":
                extra = sidecar_killed(mesh, load)
            elif name == "controlplane-down":
                extra = controlplane_down(mesh, load, args.cp_down)
            elif name == "pushes":
                extra = pushes(mesh, load, args.pushes)
            elif name == "slow-upstream":
                extra = slow_upstream(mesh, load, args.slow)
            elif name == "sidecar-restarted":
                extra = sidecar_restarted(mesh, load)
            elif name == "slow-loris":
                extra = slow_loris(mesh, load, args.loris)
            else:
                raise SystemExit(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
            results[name] = {**load.result(), **extra}
            r = results[name]
            print(f"{name:18} sent {r['sent']:6}  ok {r['success_ratio']:.4%}  failed {r['failed']}  "
                  f"p99 {r.get('p99_ms', 0):.1f} ms  {extra}", flush=True)  # fmt: skip
            mesh.wait_until(lambda: mesh.synced() >= len(mesh.instances) + 1, 120, "SYNCED between scenarios")
    finally:
        mesh.stop_all()
    doc = {
        "bench": "chaos",
        "python": platform.python_version(),
        "rate": args.rate,
        "duration_s": args.duration,
        "loadavg": os.getloadavg(),
        "scenarios": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
