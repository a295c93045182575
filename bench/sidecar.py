"""Sidecar benchmark (issue 4): direct vs one sidecar vs two sidecars vs nginx vs haproxy.

All on 127.0.0.1, in one run. Every proxy does the same 90/10 split over two upstream apps
(raw uvloop servers answering 1 KiB). Proxies and apps are pinned to CPU 0, the load generator to
CPU 1. For each configuration:

* constant-rate runs (default 500 and 1000 rps, 16 connections) measured from each request's
  *scheduled* send time (``bench/_load.py rate``); added p50/p90/p99 over direct;
* CPU seconds per 1,000 requests of the proxy processes during those runs (per sidecar for the
  two-sidecar chain), and RSS idle and after load;
* saturation throughput with ``wrk -t1 -c16`` (``_load.py closed`` when wrk is missing).

nginx, haproxy and wrk are installed with apt-get when missing (``--no-install`` to skip).
Results go to ``bench/results/sidecar.json``. Every process started here is killed by PID.

    .venv/bin/python bench/sidecar.py [--duration 10] [--rates 500,1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import (  # noqa: E402
    CLIENT_CPU,
    LOAD,
    PY,
    Procs,
    canary_bundles,
    endpoints_file,
    ensure_tools,
)
from _procs import cpu_s as _cpu_s  # noqa: E402
from _procs import free_port as _free_port  # noqa: E402
from _procs import json_line as _json_line  # noqa: E402
from _procs import rss_mb as _rss_mb  # noqa: E402
from _procs import wait_port as _wait_port  # noqa: E402

# --- configurations ------------------------------------------------------------------------------


def _bundles(tmp: Path) -> tuple[Path, Path, Path, Path]:
    b = canary_bundles(tmp)
    return b["mesh"], b["magnanimo"], b["benigno"], tmp


def _endpoints(tmp: Path, name: str, v1: str, v2: str) -> Path:
    return endpoints_file(tmp / f"{name}.json", v1, v2)


def _sidecar(procs: Procs, args: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = procs.start([PY, "-m", "runtime.sidecar", *args], env=env, cwd=REPO)
    return proc, _json_line(proc)


def _nginx(procs: Procs, tmp: Path, v1: int, v2: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    port = _free_port()
    prefix = tmp / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream benigno {{ server 127.0.0.1:{v1} weight=9; server 127.0.0.1:{v2} weight=1; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://benigno; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""
    )
    proc = procs.start(["nginx", "-p", str(prefix), "-c", str(conf)])
    _wait_port(port)
    return [proc], port


def _haproxy(procs: Procs, tmp: Path, v1: int, v2: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    port = _free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  balance roundrobin
  http-reuse always
  server v1 127.0.0.1:{v1} weight 90
  server v2 127.0.0.1:{v2} weight 10
"""
    )
    proc = procs.start(["haproxy", "-db", "-f", str(conf)])
    _wait_port(port)
    return [proc], port


# --- measurements --------------------------------------------------------------------------------


def _load(args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run([PY, LOAD, *args, "--cpu", str(CLIENT_CPU)], capture_output=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-2000:])
    doc: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return doc


def _wrk(wrk: str | None, port: int, host: str, duration: float) -> dict[str, Any]:
    if wrk is None:
        doc = _load(
            ["closed", "--connect", f"127.0.0.1:{port}", "--host-header", host, "--duration", str(duration)],
            duration + 120,
        )
        return {"tool": "_load.py closed", "rps": doc["rps"]}
    cmd = ["taskset", "-c", str(CLIENT_CPU), wrk, "-t1", "-c16", f"-d{int(duration)}s", "-H", f"Host: {host}"]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=duration + 120
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    return {
        "tool": "wrk -t1 -c16",
        "rps": float(m.group(1)) if m else 0.0,
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def measure(
    name: str,
    port: int,
    target: str,
    host: str,
    pids: list[int],
    sidecars: int,
    rates: list[int],
    duration: float,
    wrk: str | None,
) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    result: dict[str, Any] = {
        "idle_rss_mb": round(_rss_mb(pids), 1) if pids else None,
        "idle_rss_mb_per_process": round(_rss_mb(pids) / len(pids), 1) if pids else None,
        "rates": {},
    }
    # Warm-up: the first round of a sitting runs low (performance.md section 7).
    _load(["rate", "--connect", f"127.0.0.1:{port}", "--target", target, "--host-header", host,
           "--rate", "500", "--duration", "2"], 120)  # fmt: skip
    for rate in rates:
        cpu0 = _cpu_s(pids)
        doc = _load(
            ["rate", "--connect", f"127.0.0.1:{port}", "--target", target, "--host-header", host,
             "--rate", str(rate), "--duration", str(duration)],
            duration + 180,
        )  # fmt: skip
        cpu = _cpu_s(pids) - cpu0
        if pids and doc["requests"]:
            doc["cpu_s_per_1000"] = round(cpu / doc["requests"] * 1000, 4)
            if sidecars:
                doc["cpu_s_per_1000_per_sidecar"] = round(cpu / doc["requests"] * 1000 / sidecars, 4)
        result["rates"][str(rate)] = doc
        print(f"   {rate} rps: {json.dumps(doc)}", flush=True)
    result["rss_after_mb"] = round(_rss_mb(pids), 1) if pids else None
    result["saturation"] = _wrk(wrk, port, host, duration)
    print(f"   saturation: {result['saturation']}", flush=True)
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default %(default)s)")
    p.add_argument("--rates", default="500,1000")
    p.add_argument("--quick", action="store_true", help="3-second runs")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install nginx, haproxy, wrk")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sidecar.json")
    ns = p.parse_args(argv)
    duration = 3.0 if ns.quick else ns.duration
    rates = [int(r) for r in ns.rates.split(",") if r]
    tools = ensure_tools(not ns.no_install, {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"})
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="meshc-bench-"))
    results: dict[str, Any] = {}
    try:
        ups = {}
        for name in ("v1", "v2"):
            proc = procs.start([PY, LOAD, "upstream", name])
            ups[name] = _json_line(proc)["port"]
        v1, v2 = f"127.0.0.1:{ups['v1']}", f"127.0.0.1:{ups['v2']}"
        mesh, svc_magnanimo, svc_benigno, _ = _bundles(tmp)
        results["direct"] = measure("direct", ups["v1"], "/", "benigno", [], 0, rates, duration, tools["wrk"])

        eps = _endpoints(tmp, "eps-direct", v1, v2)
        outbound_args = ["--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                         "--mesh-bundle", str(mesh), "--bundle", str(svc_magnanimo)]  # fmt: skip
        one, info = _sidecar(procs, [*outbound_args, "--endpoints", str(eps)])
        port = int(info["outbound"].rpartition(":")[2])
        results["one_sidecar"] = measure(
            "one sidecar",
            port,
            "http://benigno:5000/",
            "benigno:5000",
            [one.pid],
            1,
            rates,
            duration,
            tools["wrk"],
        )
        procs.stop(one)

        inbound_addrs = []
        chain = []
        for app in (v1, v2):
            proc, info = _sidecar(procs, ["--service", "benigno", "--app", app, "--inbound", "127.0.0.1:0",
                                          "--admin", "127.0.0.1:0", "--mesh-bundle", str(mesh),
                                          "--bundle", str(svc_benigno)])  # fmt: skip
            inbound_addrs.append(info["inbound"])
            chain.append(proc)
        eps2 = _endpoints(tmp, "eps-chain", *inbound_addrs)
        out, info = _sidecar(procs, [*outbound_args, "--endpoints", str(eps2)])
        port = int(info["outbound"].rpartition(":")[2])
        results["two_sidecars"] = measure(
            "two sidecars", port, "http://benigno:5000/", "benigno:5000",
            [out.pid, *(c.pid for c in chain)], 2, rates, duration, tools["wrk"],
        )  # fmt: skip
        for proc in (out, *chain):
            procs.stop(proc)

        for name, starter in (("nginx", _nginx), ("haproxy", _haproxy)):
            if tools[name] is None:
                results[name] = {"skipped": f"{name} is not installed"}
                continue
            started, port = starter(procs, tmp, ups["v1"], ups["v2"])
            results[name] = measure(
                name, port, "/", "benigno", [s.pid for s in started], 1, rates, duration, tools["wrk"]
            )
            for proc in started:
                procs.stop(proc)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = _summary(results, rates)
    doc = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "method": {"duration_s": duration, "rates": rates, "connections": 16, "body_bytes": 1024,
                   "split": "90/10", "pinning": "proxies and apps on CPU 0, load on CPU 1"},
        "results": results,
        "summary": summary,
    }  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {ns.out}")
    return 0


def _summary(results: dict[str, Any], rates: list[int]) -> dict[str, Any]:
    direct = results.get("direct", {})
    nginx = results.get("nginx", {})
    out: dict[str, Any] = {}
    for name, res in results.items():
        if name == "direct" or "rates" not in res:
            continue
        row: dict[str, Any] = {}
        for rate in rates:
            r, d = res["rates"].get(str(rate), {}), direct.get("rates", {}).get(str(rate), {})
            if "p50_ms" in r and "p50_ms" in d:
                row[f"added_ms_at_{rate}"] = {
                    q: round(r[f"{q}_ms"] - d[f"{q}_ms"], 3) for q in ("p50", "p90", "p99")
                }
            if "cpu_s_per_1000" in r:
                row[f"cpu_s_per_1000_at_{rate}"] = r.get("cpu_s_per_1000_per_sidecar", r["cpu_s_per_1000"])
            row[f"errors_at_{rate}"] = r.get("errors")
        sat = res.get("saturation", {}).get("rps")
        row["saturation_rps"] = sat
        if sat and direct.get("saturation", {}).get("rps"):
            row["saturation_ratio_to_direct"] = round(sat / direct["saturation"]["rps"], 4)
        if sat and nginx.get("saturation", {}).get("rps"):
            row["saturation_ratio_to_nginx"] = round(sat / nginx["saturation"]["rps"], 4)
        row["idle_rss_mb_per_process"] = res.get("idle_rss_mb_per_process")
        out[name] = row
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
