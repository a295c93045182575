"""Connection floods against one sidecar's listeners (issue 20 #4): RSS before, at the peak and
after, per listener.

For each listener (admin, outbound, inbound) of one ``meshc sidecar`` (``--dataplane``: fast by
default, or aiohttp, whose listeners sit behind ``runtime.h1guard``; no control plane,
``--insecure-admin``): open ``--connections`` connections that each send a partial request
head (1 KiB of header, never finished, as a slow-loris client does), read the sidecar's RSS from
``/proc/<pid>/status`` at the peak, close them all, wait ``--settle`` seconds and read it again.
The baseline is the RSS before the first flood, in the same run; the ratios are peak/before and
after/before. Every listener holds at most ``--max-connections`` (default 1024) at once and
answers the rest 503, so its peak is bounded whatever the flood. JSON goes to
``bench/results/listener_flood.json`` (``listener_flood_aiohttp.json`` for the aiohttp data
plane). The sidecar is stopped by its PID.

    .venv/bin/python bench/listener_flood.py [--connections 1200] [--settle 3] [--dataplane aiohttp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTIAL_HEAD = b"GET /flood HTTP/1.1\r\nHost: benigno\r\nX-Pad: " + b"p" * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def flood(pid: int, address: tuple[str, int], n: int, settle: float) -> dict[str, Any]:
    before = rss_kb(pid)
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(n):
        try:
            s = socket.create_connection(address, timeout=5)
            s.sendall(PARTIAL_HEAD)
            socks.append(s)
        except OSError:
            refused += 1
    time.sleep(0.5)  # let the sidecar read what was sent (a bench, not a test)
    peak = rss_kb(pid)
    for s in socks:
        s.close()
    time.sleep(settle)
    after = rss_kb(pid)
    return {
        "connections": n,
        "refused_at_connect": refused,
        "rss_kb_before": before,
        "rss_kb_peak": peak,
        "rss_kb_after": after,
        "peak_over_before": round(peak / before, 3),
        "after_over_before": round(after / before, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1200)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--dataplane", choices=("fast", "aiohttp"), default="fast")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    suffix = "" if args.dataplane == "fast" else f"_{args.dataplane}"
    out: Path = args.out or BENCH / "results" / f"listener_flood{suffix}.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections + 256)), hard))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        app_port = s.getsockname()[1]  # nothing listens there: the flood never reaches an app
    work = Path(tempfile.mkdtemp(prefix="meshc-flood-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "runtime.sidecar",
        "--service",
        "benigno",
        "--app",
        f"127.0.0.1:{app_port}",
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--insecure-admin",
        "--dataplane",
        args.dataplane,
    ]
    with open(work / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        listening = json.loads(proc.stdout.readline())
        time.sleep(1.0)
        results = {
            name: flood(proc.pid, _addr(listening[name]), args.connections, args.settle)
            for name in ("admin", "outbound", "inbound")
        }
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    doc = {
        "bench": "listener_flood",
        "dataplane": args.dataplane,
        "python": platform.python_version(),
        "connections": args.connections,
        "settle_s": args.settle,
        "listeners": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in results.items():
        print(
            f"{name:9} before {r['rss_kb_before'] / 1024:6.1f} MB  peak {r['rss_kb_peak'] / 1024:6.1f} MB "
            f"({r['peak_over_before']:.2f}x)  after {r['rss_kb_after'] / 1024:6.1f} MB "
            f"({r['after_over_before']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
