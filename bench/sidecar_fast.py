"""Fast data path benchmark (issue 7): direct vs the aiohttp path vs the fast path vs nginx.

All on 127.0.0.1, in one run, each proxy doing the same 90/10 split over two upstream apps:

* upstream apps: one nginx worker serving a 1 KiB body on two ports (v1, v2), pinned to CPU 1
  with the load generators, so that the proxy under test has CPU 0 to itself;
* proxies, each pinned to CPU 0 (``taskset``/``sched_setaffinity``): ``meshc sidecar
  --dataplane aiohttp``, ``meshc sidecar --dataplane fast`` (routing, split and metrics on, as
  always), and nginx (1 worker, ``upstream`` with weights 9/1, keep-alive);
* per proxy: idle RSS; added p50/p90 at concurrency 1 (a blocking keep-alive client on CPU 1,
  against the same client straight to the app); saturation with ``wrk -t1 -c16`` and the proxy's
  CPU microseconds per request from ``/proc/<pid>/stat`` utime+stime deltas (and how busy its
  core was: a proxy below ~100% was not the bottleneck);
* a calibration reference: the bare asyncio Protocol + httptools proxy shape that
  performance.md section 7 measured at ~73% of nginx (no policy, no metrics); when this run's
  ratio for it is far from that, the machine was contended and absolute figures are off;
* two sidecars (client -> outbound -> inbound -> app) per data path at a constant 1,000 rps with
  ``bench/_load.py rate`` (latency from each request's *scheduled* send time), added p50/p90/p99
  over direct.

Ratios to nginx and to the aiohttp path, and the issue's targets, are in ``summary``. nginx and
wrk are installed with apt-get when missing. JSON goes to ``bench/results/sidecar_fast.json``.
Every process started here is killed by PID.

    .venv/bin/python bench/sidecar_fast.py [--duration 5] [--rate 1000] [--no-install]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import (  # noqa: E402
    CLIENT_CPU,
    LOAD,
    PROXY_CPU,
    PY,
    Procs,
    canary_bundles,
    endpoints_file,
    rss_mb,
)
from _procs import cpu_s as _cpu_s  # noqa: E402
from _procs import ensure_tools as _ensure_tools  # noqa: E402
from _procs import free_port as _free_port  # noqa: E402
from _procs import json_line as _json_line  # noqa: E402
from _procs import wait_port as _wait_port  # noqa: E402

BODY = 1024
TARGETS = {
    "saturation_ratio_to_nginx_min": 0.5,
    "cpu_per_request_ratio_to_nginx_max": 2.0,
    "added_p50_per_hop_ms_max": 0.15,
    "two_sidecars_added_p90_ms_max": 0.5,
    "idle_rss_mb_max": 60.0,
}


# --- processes -----------------------------------------------------------------------------------


_NGINX_HEAD = """worker_processes 1;
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
"""


def _nginx(procs: Procs, tmp: Path, name: str, body: str, cpu: int) -> subprocess.Popen[bytes]:
    prefix = tmp / name
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_HEAD.format(prefix=prefix) + body + "}\n")
    return procs.start(["nginx", "-p", str(prefix), "-c", str(conf)], cpu)


def _apps(procs: Procs, tmp: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    v1, v2 = _free_port(), _free_port()
    servers = "".join(
        f"  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; "
        f'return 200 "{(name + " " + "x" * BODY)[:BODY]}"; }} }}\n'
        for name, port in (("v1", v1), ("v2", v2))
    )
    proc = _nginx(procs, tmp, "apps", servers, CLIENT_CPU)
    _wait_port(v1)
    _wait_port(v2)
    return proc, v1, v2


def _nginx_proxy(procs: Procs, tmp: Path, v1: int, v2: int) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    body = (
        f"  upstream benigno {{ server 127.0.0.1:{v1} weight=9; server 127.0.0.1:{v2} weight=1; "
        "keepalive 64; }\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://benigno; "
        'proxy_http_version 1.1; proxy_set_header Connection ""; } }\n'
    )
    proc = _nginx(procs, tmp, "proxy", body, PROXY_CPU)
    _wait_port(port)
    return proc, port


def _bundles(tmp: Path) -> dict[str, Path]:
    return canary_bundles(tmp)


def _endpoints(tmp: Path, name: str, v1: str, v2: str) -> Path:
    return endpoints_file(tmp / f"{name}.json", v1, v2)


def ensure_tools(install: bool) -> dict[str, str | None]:
    return _ensure_tools(install, {"nginx": "nginx", "wrk": "wrk"})


def _rss_mb(pid: int) -> float:
    return rss_mb([pid])


def _sidecar(procs: Procs, args: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MESHC_DATAPLANE", None)
    proc = procs.start([PY, "-m", "runtime.sidecar", *args], PROXY_CPU, env=env, cwd=REPO)
    return proc, _json_line(proc)


# --- a calibration reference: the bare proxy shape of performance.md section 7 ---------------------

_RAW_PROXY = """
import asyncio, random, sys, httptools, uvloop
UPS = [("127.0.0.1", int(p)) for p in sys.argv[2:4]]
class Up(asyncio.Protocol):
    def __init__(self, client):
        self.client = client; self.p = httptools.HttpResponseParser(self); self.t = None; self.waiting = []
    def connection_made(self, t):
        self.t = t
        for d in self.waiting: t.write(d)
    def data_received(self, d): self.p.feed_data(d)
    def on_status(self, s): self.reason = s; self.h = []
    def on_header(self, n, v):
        if n.lower() not in (b"connection", b"keep-alive"): self.h.append(n + b": " + v)
    def on_headers_complete(self):
        code, head = self.p.get_status_code(), b"\\r\\n".join(self.h)
        self.out = [b"HTTP/1.1 %d %s\\r\\n%s\\r\\n\\r\\n" % (code, self.reason, head)]
    def on_body(self, b): self.out.append(b)
    def on_message_complete(self): self.client.t.writelines(self.out)
class Client(asyncio.Protocol):
    def __init__(self): self.p = httptools.HttpRequestParser(self); self.ups = {}
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.p.feed_data(d)
    def on_url(self, u): self.url = u; self.h = []
    def on_header(self, n, v): self.h.append(n + b": " + v)
    def on_headers_complete(self):
        i = 0 if random.random() < 0.9 else 1
        head = b"%s %s HTTP/1.1\\r\\n%s\\r\\n\\r\\n" % (self.p.get_method(), self.url, b"\\r\\n".join(self.h))
        up = self.ups.get(i)
        if up is None:
            up = self.ups[i] = Up(self); up.waiting.append(head)
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: up, *UPS[i]))
        elif up.t is None: up.waiting.append(head)
        else: up.t.write(head)
async def main():
    srv = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _raw_proxy(procs: Procs, tmp: Path, v1: int, v2: int) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    script = tmp / "rawproxy.py"
    script.write_text(_RAW_PROXY)
    proc = procs.start([PY, str(script), str(port), str(v1), str(v2)], PROXY_CPU)
    _wait_port(port)
    return proc, port


# --- measurements --------------------------------------------------------------------------------


def latency_client(port: int, target: str, host: str, duration: float) -> dict[str, Any]:
    """Closed loop at concurrency 1 on one keep-alive connection (blocking socket)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CPU})
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    values: list[float] = []
    buf = b""
    end = time.perf_counter() + duration
    while True:
        t = time.perf_counter()
        if t > end:
            break
        sock.sendall(request)
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                lower = buf[:i].lower()
                j = lower.find(b"content-length:")
                n = int(lower[j + 15 :].split(b"\r\n", 1)[0]) if j >= 0 else 0
                if len(buf) >= i + 4 + n:
                    buf = buf[i + 4 + n :]
                    break
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            buf += data
        values.append(time.perf_counter() - t)
    sock.close()
    values = values[len(values) // 20 :]  # the first 5% warm caches
    values.sort()
    n = len(values)
    return {
        "requests": n,
        "p50_ms": values[n // 2] * 1000.0,
        "p90_ms": values[int(n * 0.9)] * 1000.0,
        "p99_ms": values[int(n * 0.99)] * 1000.0,
    }


def _latency(port: int, target: str, host: str, duration: float) -> dict[str, Any]:
    args = [PY, __file__, "--latency-client", str(port), target, host, str(duration)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def _wrk(port: int, host: str, duration: float, pids: list[int]) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        str(CLIENT_CPU),
        "wrk",
        "-t1",
        "-c16",
        f"-d{int(duration)}s",
        "-H",
        f"Host: {host}",
    ]
    cpu0, t0 = _cpu_s(pids), time.monotonic()
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=duration + 60
    )
    cpu, wall = _cpu_s(pids) - cpu0, time.monotonic() - t0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    total = re.search(r"(\d+) requests in", out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    n = int(total.group(1)) if total else 0
    doc: dict[str, Any] = {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": n,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }
    if pids and n:
        doc["cpu_us_per_request"] = round(cpu / n * 1e6, 2)
        doc["proxy_core_busy"] = round(cpu / wall, 3)
    return doc


def _rate(port: int, target: str, host: str, rate: int, duration: float) -> dict[str, Any]:
    args = [PY, LOAD, "rate", "--connect", f"127.0.0.1:{port}", "--target", target, "--host-header", host,
            "--rate", str(rate), "--duration", str(duration), "--conns", "16",
            "--cpu", str(CLIENT_CPU)]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 180)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def measure_proxy(
    name: str, port: int, target: str, host: str, pid: int | None, duration: float
) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    pids = [pid] if pid is not None else []
    res: dict[str, Any] = {"idle_rss_mb": round(_rss_mb(pid), 1) if pid is not None else None}
    _wrk(port, host, 2, [])  # warm-up: the first round of a sitting runs low (performance.md 7)
    res["c1"] = _latency(port, target, host, min(duration, 3.0))
    res["saturation"] = _wrk(port, host, duration, pids)
    res["rss_after_mb"] = round(_rss_mb(pid), 1) if pid is not None else None
    print(f"   {json.dumps(res)}", flush=True)
    return res


def main(argv: list[str]) -> int:
    if argv[:1] == ["--latency-client"]:
        print(json.dumps(latency_client(int(argv[1]), argv[2], argv[3], float(argv[4]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per saturation/rate run")
    p.add_argument("--rate", type=int, default=1000, help="constant rate for the two-sidecar runs")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install nginx and wrk")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sidecar_fast.json")
    ns = p.parse_args(argv)
    tools = ensure_tools(not ns.no_install)
    if tools["nginx"] is None or tools["wrk"] is None:
        print("nginx and wrk are needed (apt-get install nginx wrk)", file=sys.stderr)
        return 2
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="meshc-bench-fast-"))
    results: dict[str, Any] = {}
    try:
        _apps_proc, v1, v2 = _apps(procs, tmp)
        app1, app2 = f"127.0.0.1:{v1}", f"127.0.0.1:{v2}"
        bundles = _bundles(tmp)
        results["direct"] = measure_proxy("direct", v1, "/", "benigno", None, ns.duration)
        eps = _endpoints(tmp, "eps", app1, app2)
        for path in ("aiohttp", "fast"):
            proc, info = _sidecar(procs, ["--service", "magnanimo", "--outbound", "127.0.0.1:0",
                                          "--admin", "127.0.0.1:0", "--mesh-bundle", str(bundles["mesh"]),
                                          "--bundle", str(bundles["magnanimo"]), "--endpoints", str(eps),
                                          "--dataplane", path])  # fmt: skip
            port = int(info["outbound"].rpartition(":")[2])
            results[path] = measure_proxy(
                path, port, "http://benigno:5000/", "benigno:5000", proc.pid, ns.duration
            )
            procs.stop(proc)
        proc, port = _nginx_proxy(procs, tmp, v1, v2)
        results["nginx"] = measure_proxy("nginx", port, "/", "benigno", proc.pid, ns.duration)
        procs.stop(proc)
        proc, port = _raw_proxy(procs, tmp, v1, v2)
        results["raw_reference"] = measure_proxy("raw_reference", port, "/", "benigno", proc.pid, ns.duration)
        procs.stop(proc)

        print(f"== {ns.rate} rps constant rate: direct and two sidecars", flush=True)
        _rate(v1, "/", "benigno", ns.rate, 2)
        chains: dict[str, Any] = {"direct": _rate(v1, "/", "benigno", ns.rate, ns.duration)}
        for path in ("aiohttp", "fast"):
            started = []
            inbound = []
            for app in (app1, app2):
                proc, info = _sidecar(procs, ["--service", "benigno", "--app", app,
                                              "--inbound", "127.0.0.1:0",
                                              "--admin", "127.0.0.1:0", "--mesh-bundle", str(bundles["mesh"]),
                                              "--bundle", str(bundles["benigno"]),
                                              "--dataplane", path])  # fmt: skip
                started.append(proc)
                inbound.append(info["inbound"])
            eps2 = _endpoints(tmp, f"eps-chain-{path}", *inbound)
            proc, info = _sidecar(procs, ["--service", "magnanimo", "--outbound", "127.0.0.1:0",
                                          "--admin", "127.0.0.1:0", "--mesh-bundle", str(bundles["mesh"]),
                                          "--bundle", str(bundles["magnanimo"]), "--endpoints", str(eps2),
                                          "--dataplane", path])  # fmt: skip
            started.append(proc)
            port = int(info["outbound"].rpartition(":")[2])
            _rate(port, "http://benigno:5000/", "benigno:5000", ns.rate, 2)
            pids = [s.pid for s in started]
            cpu0 = _cpu_s(pids)
            doc = _rate(port, "http://benigno:5000/", "benigno:5000", ns.rate, ns.duration)
            doc["cpu_us_per_request_all_sidecars"] = round(
                (_cpu_s(pids) - cpu0) / max(1, doc["requests"]) * 1e6, 1
            )
            chains[path] = doc
            print(f"   {path}: {json.dumps(doc)}", flush=True)
            for s in started:
                procs.stop(s)
        results["two_sidecars"] = chains
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = _summary(results)
    doc = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "loadavg_at_end": os.getloadavg()},
        "method": {"duration_s": ns.duration, "rate": ns.rate, "connections": 16, "body_bytes": BODY,
                   "split": "90/10", "pinning": "proxy under test on CPU 0; apps (nginx) and load on CPU 1",
                   "note": "compare ratios from one run only; absolute figures drift +-8% between rounds"},
        "results": results,
        "summary": summary,
    }  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {ns.out}")
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    direct = results["direct"]
    out: dict[str, Any] = {}
    for name in ("aiohttp", "fast", "nginx", "raw_reference"):
        res = results[name]
        sat = res["saturation"]
        out[name] = {
            "saturation_rps": sat["rps"],
            "cpu_us_per_request": sat.get("cpu_us_per_request"),
            "proxy_core_busy": sat.get("proxy_core_busy"),
            "added_p50_ms_c1": round(res["c1"]["p50_ms"] - direct["c1"]["p50_ms"], 3),
            "added_p90_ms_c1": round(res["c1"]["p90_ms"] - direct["c1"]["p90_ms"], 3),
            "idle_rss_mb": res["idle_rss_mb"],
            "rss_after_mb": res["rss_after_mb"],
            "saturation_ratio_to_nginx": _ratio(sat["rps"], results["nginx"]["saturation"]["rps"]),
            "cpu_ratio_to_nginx": _ratio(
                sat.get("cpu_us_per_request"), results["nginx"]["saturation"].get("cpu_us_per_request")
            ),
            "saturation_ratio_to_aiohttp": _ratio(sat["rps"], results["aiohttp"]["saturation"]["rps"]),
            "cpu_ratio_to_aiohttp": _ratio(
                sat.get("cpu_us_per_request"), results["aiohttp"]["saturation"].get("cpu_us_per_request")
            ),
        }
    chains = results["two_sidecars"]
    for path in ("aiohttp", "fast"):
        out[path]["two_sidecars_added_ms"] = {
            q: round(chains[path][f"{q}_ms"] - chains["direct"][f"{q}_ms"], 3) for q in ("p50", "p90", "p99")
        }
        out[path]["two_sidecars_errors"] = chains[path].get("errors")
    out["calibration"] = {
        "raw_reference_saturation_ratio_to_nginx": out["raw_reference"]["saturation_ratio_to_nginx"],
        "published_raw_to_nginx": round(68 / 93, 3),
        "fast_saturation_ratio_to_raw_reference": _ratio(
            results["fast"]["saturation"]["rps"], results["raw_reference"]["saturation"]["rps"]
        ),
        "fast_cpu_ratio_to_raw_reference": _ratio(
            results["fast"]["saturation"].get("cpu_us_per_request"),
            results["raw_reference"]["saturation"].get("cpu_us_per_request"),
        ),
    }
    fast = out["fast"]
    t = TARGETS
    sat_ratio, cpu_ratio = fast["saturation_ratio_to_nginx"] or 0.0, fast["cpu_ratio_to_nginx"] or 99.0
    idle, idle_aiohttp = fast["idle_rss_mb"] or 999.0, out["aiohttp"]["idle_rss_mb"] or 0.0
    out["targets"] = {
        "saturation_ge_50pct_nginx": sat_ratio >= t["saturation_ratio_to_nginx_min"],
        "cpu_per_request_le_2x_nginx": cpu_ratio <= t["cpu_per_request_ratio_to_nginx_max"],
        "added_p50_per_hop_le_0.15ms": fast["added_p50_ms_c1"] <= t["added_p50_per_hop_ms_max"],
        "two_sidecars_added_p90_le_0.5ms": fast["two_sidecars_added_ms"]["p90"]
        <= t["two_sidecars_added_p90_ms_max"],
        "idle_rss_le_60mb": idle <= t["idle_rss_mb_max"],
        "idle_rss_le_aiohttp": idle <= idle_aiohttp,
    }
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
