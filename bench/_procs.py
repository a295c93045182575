"""What the sidecar benchmarks share: processes started and killed by PID, /proc readings,
free ports, tools installed from Debian when missing, and the endpoint file of the 90/10 split."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import (
    CatalogService,
    Destination,
    MeshBundle,
    RouteConf,
    Rule,
    ServiceBundle,
    Split,
    TimeoutConf,
    bundle_bytes,
    bundle_digest,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LOAD = str(REPO / "bench" / "_load.py")
PROXY_CPU = 0
CLIENT_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Procs:
    """Every process a benchmark starts, killed by PID (with its descendants) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], cpu: int | None = PROXY_CPU, **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {cpu})
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their descendants."""
    total = 0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes and their descendants."""
    total = 0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            m = re.search(r"VmRSS:\s+(\d+)", status)
            total += int(m.group(1)) if m else 0
    return total / 1024.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def json_line(proc: subprocess.Popen[bytes], deadline: float = 60.0) -> dict[str, Any]:
    """The first JSON line a process prints (sidecars announce their listeners that way)."""
    assert proc.stdout is not None
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process {proc.pid} exited {proc.poll()}")
        with contextlib.suppress(ValueError):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise RuntimeError("no JSON line in time")


def ensure_tools(install: bool, wanted: dict[str, str]) -> dict[str, str | None]:
    """Debian package -> binary; installs the missing ones with apt-get when allowed."""
    missing = [pkg for pkg, binary in wanted.items() if shutil.which(binary) is None]
    if missing and install and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    return {name: shutil.which(binary) for name, binary in wanted.items()}


def endpoints_file(path: Path, v1: str, v2: str) -> Path:
    """The endpoint set of benigno v1 and v2, as ``PUT /endpoints`` takes it."""
    services = {
        "benigno": [{"address": v1, "tags": {"version": "v1"}}, {"address": v2, "tags": {"version": "v2"}}]
    }
    path.write_text(json.dumps({"generation": 1, "services": services}))
    return path


def canary_bundles(tmp: Path) -> dict[str, Path]:
    """The seed's 90/10 canary as bundle files: ``mesh``, ``magnanimo`` and ``benigno``."""
    split = (
        Split(weight=90, service="benigno", tags={"version": "v1"}),
        Split(weight=10, service="benigno", tags={"version": "v2"}),
    )
    dest = Destination(
        route=(Rule[RouteConf](conf=RouteConf(split=split)),),
        timeout=(Rule[TimeoutConf](conf=TimeoutConf()),),
    )
    mesh = MeshBundle(
        mesh="default",
        services={
            "benigno": CatalogService(port=5000, protocol="http"),
            "magnanimo": CatalogService(port=4000, protocol="http"),
        },
        destinations={"benigno": dest},
    )
    out = {}
    for key, bundle in (
        ("mesh", mesh),
        ("magnanimo", ServiceBundle(mesh="default", service="magnanimo")),
        ("benigno", ServiceBundle(mesh="default", service="benigno")),
    ):
        data = bundle_bytes(bundle)
        path = tmp / f"{bundle_digest(data)}.json"
        path.write_bytes(data)
        out[key] = path
    return out
