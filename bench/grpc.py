"""Unary gRPC through two sidecars vs direct, in the same run (issue 15).

    grpc client --h2c--> outbound sidecar --h2c--> inbound sidecar --h2c--> grpcio server
    grpc client -----------------------------------------------------------> grpcio server

Both sidecars run ``--dataplane fast`` (their HTTP/2 layer is the same on either data plane)
with bundles on disk, no control plane, no mTLS. Measured per path, one after the other:

* added latency: sequential unary calls (concurrency 1) for ``--duration`` seconds, p50/p90/p99;
* throughput: ``--concurrency`` calls in flight on one channel for ``--duration`` seconds (rps).

The server runs in its own process; the client is this process. ``summary`` has the ratios
against direct. JSON goes to ``bench/results/grpc.json``; every process started is killed by
PID. Bounded: about ``4 * duration`` seconds plus start-up (well under two minutes at the
default 5 s).

    .venv/bin/python bench/grpc.py [--duration 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# This file is named grpc.py: keep its own directory off the path so ``import grpc`` is grpcio.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
REPO = _HERE.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from runtime.bundle import (  # noqa: E402
    CatalogService,
    Destination,
    Inbound,
    MeshBundle,
    RouteConf,
    Rule,
    ServiceBundle,
    Split,
    TimeoutConf,
    bundle_bytes,
    bundle_digest,
)
from runtime.protocol import Endpoint, EndpointSet  # noqa: E402

METHOD = "/bench.Echo/Unary"
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
PAYLOAD = b"x" * 128


def serve() -> None:
    """The server process: echo on an OS-chosen port, printed on stdout."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    signal.sigwait({signal.SIGTERM})
    server.stop(0)


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)


def _line(proc: subprocess.Popen[bytes], key: str | None = None) -> Any:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        raw = proc.stdout.readline()
        if not raw:
            raise RuntimeError("process exited early")
        if key is None:
            return int(raw)
        with contextlib.suppress(ValueError):
            doc = json.loads(raw)
            if doc.get("event") == key:
                return doc
    raise RuntimeError("no start-up line in time")


def _write(tmp: Path, data: bytes) -> Path:
    path = tmp / f"{bundle_digest(data)}.json"
    path.write_bytes(data)
    return path


def _service(tmp: Path, name: str) -> Path:
    return _write(tmp, bundle_bytes(ServiceBundle(mesh="default", service=name, inbound=Inbound())))


def sidecars(procs: Procs, tmp: Path, app_port: int) -> int:
    """Start the two sidecars; the outbound sidecar's port."""
    services = {
        "echo": CatalogService(port=50051, protocol="http"),
        "client": CatalogService(port=1, protocol="http"),
    }
    route = RouteConf(split=(Split(weight=1, service="echo"),))
    dest = Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))
    mesh = _write(
        tmp, bundle_bytes(MeshBundle(mesh="default", services=services, destinations={"echo": dest}))
    )
    py = sys.executable
    inbound = procs.start(
        [
            py, "-m", "runtime.sidecar", "--service", "echo", "--app", f"127.0.0.1:{app_port}",
            "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--dataplane", "fast", "--insecure-admin",
            "--mesh-bundle", str(mesh),
            "--bundle", str(_service(tmp, "echo")),
        ]
    )  # fmt: skip
    in_addr = _line(inbound, "listening")["inbound"]
    eps = tmp / "eps.json"
    eps.write_text(
        EndpointSet(generation=1, services={"echo": [Endpoint(address=in_addr)]}).model_dump_json()
    )
    outbound = procs.start(
        [
            py, "-m", "runtime.sidecar", "--service", "client", "--outbound", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--dataplane", "fast", "--insecure-admin", "--mesh-bundle", str(mesh),
            "--bundle", str(_service(tmp, "client")),
            "--endpoints", str(eps),
        ]
    )  # fmt: skip
    return int(_line(outbound, "listening")["outbound"].rpartition(":")[2])


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1e6, 1)


def latency(target: str, authority: str | None, duration: float) -> dict[str, Any]:
    opts = [*OPTIONS, *([("grpc.default_authority", authority)] if authority else [])]
    with grpc.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary(METHOD)
        for _ in range(200):  # warm-up: connections, HPACK tables, code paths
            call(PAYLOAD, timeout=10)
        samples: list[float] = []
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            t = time.perf_counter()
            call(PAYLOAD, timeout=10)
            samples.append(time.perf_counter() - t)
    return {
        "calls": len(samples),
        "p50_us": _pct(samples, 0.5),
        "p90_us": _pct(samples, 0.9),
        "p99_us": _pct(samples, 0.99),
    }


def throughput(target: str, authority: str | None, duration: float, concurrency: int) -> dict[str, Any]:
    opts = [*OPTIONS, *([("grpc.default_authority", authority)] if authority else [])]
    done = 0
    errors = 0
    lock = threading.Lock()
    stop = time.perf_counter() + duration
    with grpc.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary(METHOD)
        call(PAYLOAD, timeout=10)
        finished = threading.Event()
        in_flight = [0]

        def launch() -> None:
            with lock:
                in_flight[0] += 1
            fut = call.future(PAYLOAD, timeout=10)
            fut.add_done_callback(on_done)

        def on_done(fut: Any) -> None:
            nonlocal done, errors
            with lock:
                in_flight[0] -= 1
                if fut.exception() is None:
                    done += 1
                else:
                    errors += 1
                last = in_flight[0] == 0
            if time.perf_counter() < stop:
                launch()
            elif last:
                finished.set()

        start = time.perf_counter()
        for _ in range(concurrency):
            launch()
        finished.wait(duration + 30)
        elapsed = time.perf_counter() - start
    return {"calls": done, "errors": errors, "rps": round(done / elapsed, 1), "concurrency": concurrency}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        serve()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args(argv)
    procs = Procs()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
            "loadavg_1m_before": round(os.getloadavg()[0], 2),  # a busy machine skews the ratios
        },
        "duration_s": args.duration,
    }
    try:
        with tempfile.TemporaryDirectory() as d:
            app_port = _line(procs.start([sys.executable, __file__, "--serve"]))
            out_port = sidecars(procs, Path(d), app_port)
            direct = f"127.0.0.1:{app_port}"
            mesh = f"127.0.0.1:{out_port}"
            results["direct"] = {
                "latency": latency(direct, None, args.duration),
                "throughput": throughput(direct, None, args.duration, args.concurrency),
            }
            results["two_sidecars"] = {
                "latency": latency(mesh, "echo:50051", args.duration),
                "throughput": throughput(mesh, "echo:50051", args.duration, args.concurrency),
            }
    finally:
        procs.close()
    results["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    d_lat, m_lat = results["direct"]["latency"], results["two_sidecars"]["latency"]
    d_tp, m_tp = results["direct"]["throughput"], results["two_sidecars"]["throughput"]
    results["summary"] = {
        "added_p50_us": round(m_lat["p50_us"] - d_lat["p50_us"], 1),
        "added_p90_us": round(m_lat["p90_us"] - d_lat["p90_us"], 1),
        "added_p99_us": round(m_lat["p99_us"] - d_lat["p99_us"], 1),
        "rps_ratio_to_direct": round(m_tp["rps"] / d_tp["rps"], 3) if d_tp["rps"] else None,
    }
    out = REPO / "bench" / "results" / "grpc.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
