"""A small secured mesh as real processes on 127.0.0.1: ``meshc controlplane`` on a temp policy
dir (mTLS on, STRICT, 6 s certificates), and sidecars that register with bootstrap tokens.

    benigno      (version v1, fast path)    inbound <- magnanimo v1 only (TrafficPermission by tag)
    magnanimo-v1 (aiohttp path)             outbound -> benigno
    magnanimo-v2 (fast path)                outbound -> benigno (no permission: 403)

Nothing sleeps to synchronise: every wait polls a condition under a deadline that only turns a
hang into a failure.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from runtime_harness import HANG_DEADLINE, Plane, ProxyClient, Upstream, metric_value, wait_until

from compiler.ca import MeshCA
from runtime.identity import Identity, client_context, make_csr, new_private_key

__all__ = [
    "HANG_DEADLINE",
    "PERMISSION",
    "ControlPlaneProc",
    "Plane",
    "ProxyClient",
    "SecureMesh",
    "Upstream",
    "meshc",
    "metric_value",
    "ready_with_certificate",
    "start_sidecar",
    "tls_get",
    "wait_until",
    "write_policies",
]

REPO = Path(__file__).resolve().parents[2]

MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec:
  mtls:
    enabledBackend: ca-1
    backends:
      - name: ca-1
        type: builtin
        mode: {mode}
        dpCert: {{rotation: {{expiration: {ttl}}}}}
"""

SERVICES = """\
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: benigno}
spec: {port: 5000, protocol: http, subsets: [{version: v1}]}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: magnanimo}
spec: {port: 4000, protocol: http, subsets: [{version: v1}, {version: v2}]}
"""

PERMISSION = """\
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {{name: {name}}}
spec:
  sources: [{{match: {{kuma.io/service: magnanimo, version: {version}}}}}]
  destinations: [{{match: {{kuma.io/service: benigno}}}}]
"""


HEALTH_CHECK = """\
apiVersion: kuma.io/v1alpha1
kind: HealthCheck
mesh: default
metadata: {name: benigno-health}
spec:
  sources: [{match: {kuma.io/service: magnanimo, version: v1}}]
  destinations: [{match: {kuma.io/service: benigno}}]
  conf: {interval: 1s, timeout: 5s, unhealthyThreshold: 1, healthyThreshold: 1, http: {path: /health}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_policies(d: Path, mode: str = "STRICT", ttl: str = "6s") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "mesh.yaml").write_text(MESH.format(mode=mode, ttl=ttl))
    (d / "services.yaml").write_text(SERVICES)
    (d / "permission.yaml").write_text(PERMISSION.format(name="magnanimo-v1-to-benigno", version="v1"))
    (d / "health-check.yaml").write_text(HEALTH_CHECK)


def meshc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_DEADLINE,
        check=False,
    )


@dataclass
class ControlPlaneProc:
    policies: Path
    work: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secrets(self) -> Path:
        return self.work / "cp-state"

    def start(self) -> None:
        log = self.work / f"controlplane-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "compiler.cli",
                    "controlplane",
                    str(self.policies),
                    "--out",
                    str(self.work / "out"),
                    "--state-dir",
                    str(self.secrets),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--heartbeat-interval",
                    "0.5",
                ],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_until(self._up, "the control plane to answer")

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"control plane exited: {self.logs[-1].read_text()}")
        try:
            self.api("/healthz")
        except OSError:
            return False
        return True

    def api(self, path: str) -> dict[str, Any]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + path, timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(HANG_DEADLINE)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(HANG_DEADLINE)
        self.proc = None


@dataclass
class SecureMesh:
    work: Path
    cp: ControlPlaneProc
    app: Upstream
    planes: dict[str, Plane]

    def ca(self) -> MeshCA:
        """The mesh's CA as the control plane keeps it (for certificates a test forges)."""
        return MeshCA.builtin(self.cp.secrets, "default")

    def identity(
        self,
        service: str,
        tags: dict[str, str],
        ttl: dt.timedelta = dt.timedelta(minutes=10),
        ca: MeshCA | None = None,
    ) -> Identity:
        ca = ca or self.ca()
        key = new_private_key()
        cert = ca.issue(make_csr(key, "default", service, tags), service, tags, ttl)
        return Identity(key, cert, self.ca().cert_pem)

    def logs(self) -> list[Path]:
        out = list(self.cp.logs)
        out += [p.stderr_path for p in self.planes.values()]
        return out


def start_sidecar(
    work: Path,
    cp: ControlPlaneProc,
    name: str,
    service: str,
    tags: dict[str, str],
    dataplane: str,
    app: str,
    token: str,
) -> Plane:
    args = [
        "--service",
        service,
        *[a for k, v in tags.items() for a in ("--tag", f"{k}={v}")],
        "--app",
        app,
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        str(work / f"state-{name}"),
        "--control-plane",
        cp.url,
        "--token",
        token,
        "--dataplane",
        dataplane,
        "--drain-seconds",
        "1",
    ]
    return Plane(args, work)


def ready_with_certificate(plane: Plane, peers: int) -> bool:
    cfg = plane.config()
    eps = (cfg.get("endpoints") or {}).get("services") or {}
    return bool(
        cfg.get("certificate")
        and cfg.get("ready")
        and sum(len(v) for v in eps.values()) >= peers
        and cfg.get("trusted_control_plane_key")
    )


def tls_get(
    address: tuple[str, int],
    ident: Identity | None,
    path: str = "/hello",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes] | None:
    """One request with mutual TLS as ``ident`` (None: plaintext); None when refused."""
    if ident is not None:
        ctx = client_context(ident)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(*address, context=ctx, timeout=30)
    else:
        conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, TimeoutError):
        return None
    finally:
        conn.close()


def now() -> float:
    return time.monotonic()
