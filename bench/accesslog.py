"""Access log cost per request line (issue 12): the data-path work of ``AccessLog.write``.

Baseline, measured in the same run: the writer as it was before formats and shipped backends
(``git show BASE:runtime/accesslog.py``, meshc's JSON line to a File). Then the current writer:
the same JSON line, a Kuma Plain format, a Json format, and a line to an OpenTelemetry and a Tcp
backend (queued for the shipper's thread: what the request pays; the collector is a closed port,
so the thread's sending fails fast and stays off the measured path). Ratios are against the
baseline; the best of ``--repeat`` rounds of ``--lines`` lines each. Results go to
``bench/results/accesslog.json``.

    .venv/bin/python bench/accesslog.py [--lines 50000] [--repeat 5] [--base main]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from runtime.accesslog import AccessLog, LogShipper  # noqa: E402
from runtime.bundle import LoggingBackend, TrafficLogConf  # noqa: E402

HEADERS = {"user-agent": "bench/1", "x-request-id": "r-1", "host": "benigno:5000"}


def _entry() -> dict[str, Any]:
    return {
        "time": time.time(),
        "direction": "outbound",
        "source_service": "magnanimo",
        "destination_service": "benigno",
        "destination_subset": "v1",
        "upstream": "127.0.0.1:5001",
        "method": "GET",
        "path": "/hw2",
        "response_code": 200,
        "duration_ms": 1.234,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }


def _old_writer(base: str, tmp: Path) -> Any:
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{base}:runtime/accesslog.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / "old_accesslog.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_accesslog", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.AccessLog()


def _time(write: Any, conf: TrafficLogConf, lines: int, repeat: int, *args: Any) -> float:
    """Best microseconds per line over ``repeat`` rounds."""
    best = float("inf")
    for _ in range(repeat):
        entries = [_entry() for _ in range(lines)]
        t0 = time.perf_counter()
        for e in entries:
            write(conf, e, *args)
        best = min(best, (time.perf_counter() - t0) / lines * 1e6)
    return best


def _dead() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--base", default="main")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def file(name: str, **kw: Any) -> TrafficLogConf:
            return TrafficLogConf(backend=LoggingBackend(name=name, type="file", path=str(tmp / name), **kw))

        plain = "[%START_TIME%] %KUMA_MESH% %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %DURATION%"
        json_fmt = (
            ("start", "%START_TIME%"),
            ("code", "%RESPONSE_CODE%"),
            ("src", "%KUMA_SOURCE_SERVICE%"),
            ("dst", "%KUMA_DESTINATION_SERVICE%"),
            ("agent", "%REQ(USER-AGENT)%"),
        )
        shipper = LogShipper(CollectorRegistry(), cap=args.lines * args.repeat * 2 + 10)
        dead = _dead()
        otel = TrafficLogConf(
            backend=LoggingBackend(
                name="o", type="otel", address=dead, attributes=(("src", "%KUMA_SOURCE_SERVICE%"),)
            )
        )
        tcp = TrafficLogConf(backend=LoggingBackend(name="t", type="tcp", address=dead, format=plain))
        old = _old_writer(args.base, tmp)
        new = AccessLog(shipper)
        n, r = args.lines, args.repeat
        base_us = _time(old.write, file("old.log"), n, r)
        cases = {
            "json_line_file": _time(new.write, file("new.log"), n, r, HEADERS.get),
            "plain_format_file": _time(new.write, file("plain.log", format=plain), n, r, HEADERS.get),
            "json_format_file": _time(new.write, file("json.log", json_format=json_fmt), n, r, HEADERS.get),
            "otel_queued": _time(new.write, otel, n, r, HEADERS.get),
            "tcp_queued": _time(new.write, tcp, n, r, HEADERS.get),
        }
        old.close()
        new.close()
    out = {
        "bench": "accesslog",
        "base": args.base,
        "lines": n,
        "repeat": r,
        "baseline_us_per_line": round(base_us, 3),
        "us_per_line": {k: round(v, 3) for k, v in cases.items()},
        "ratio_to_baseline": {k: round(v / base_us, 3) for k, v in cases.items()},
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(f"baseline ({args.base}, JSON line to a File): {base_us:.2f} us/line")
    for k, v in cases.items():
        print(f"{k:20s} {v:7.2f} us/line  x{v / base_us:.2f}")
    print(f"load average {out['load_average']}")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "accesslog.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
