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
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from runtime_harness import HANG_DEADLINE, Plane, ProxyClient, Upstream, metric_value, wait_until

from compiler.ca import MeshCA, PushSigner
from runtime.identity import Identity, client_context, make_csr, new_private_key
from runtime.protocol import HDR_BUNDLE_ROLE, HDR_DIGEST, HDR_GENERATION, HDR_SIGNATURE, PushTarget

__all__ = [
    "HANG_DEADLINE",
    "PERMISSION",
    "Captured",
    "ControlPlaneProc",
    "FakeDataPlane",
    "Plane",
    "ProxyClient",
    "SecureMesh",
    "Upstream",
    "meshc",
    "metric_value",
    "push_target",
    "ready_with_certificate",
    "signed_headers",
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


OTHER_MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: other}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: other
metadata: {name: magnanimo}
spec: {port: 4000, protocol: http}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: other
metadata: {name: benigno}
spec: {port: 5000, protocol: http}
"""
"""A second mesh on the same control plane with the same service names (the cross-mesh replay)."""


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
    (d / "other-mesh.yaml").write_text(OTHER_MESH)


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
    extra: list[str] = field(default_factory=list)
    """More ``meshc controlplane`` flags."""
    repo: Path = REPO
    """The source tree it runs (another commit's, for mixed-version tests)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secrets(self) -> Path:
        return self.work / "cp-state"

    def start(self) -> None:
        log = self.work / f"controlplane-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(self.repo), "PYTHONUNBUFFERED": "1"}
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
                    *self.extra,
                ],
                cwd=self.repo,
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


@dataclass
class Captured:
    path: str
    headers: dict[str, str]
    body: bytes


class FakeDataPlane:
    """A data plane played by the test: it registers and heartbeats as told (real HTTP to the
    control plane) and records the pushes it receives on its own admin port, so that a test can
    replay them elsewhere (what an attacker holding a token does) or lie in its heartbeats."""

    def __init__(self, cp: ControlPlaneProc, mesh: str, service: str, token: str) -> None:
        self.cp, self.mesh, self.service, self.token = cp, mesh, service, token
        self.boot_id = os.urandom(16).hex()
        self.pushes: list[Captured] = []
        self.answer: tuple[int, bytes] | None = None  # None: ACK
        self.instance: str | None = None
        self.registered = False
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.pushes.append(Captured(self.path, {k: v for k, v in self.headers.items()}, body))
                status, reply = fake.answer or (
                    200,
                    json.dumps({"ack": hashlib.sha256(body).hexdigest()}).encode(),
                )
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def call(self, path: str, doc: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        req = urllib.request.Request(self.cp.url + path, json.dumps(doc).encode(), headers, method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def register(self, **extra: Any) -> tuple[int, dict[str, Any]]:
        doc = {
            "service": self.service,
            "mesh": self.mesh,
            "admin_address": self.admin_address,
            "boot_id": self.boot_id,
            **extra,
        }
        status, reply = self.call("/api/v1/register", doc)
        if status == 200:
            self.instance = reply["instance"]
            self.registered = True
        return status, reply

    def heartbeat(self, running: dict[str, str], generations: dict[str, int]) -> int:
        assert self.instance is not None
        doc = {
            "instance": self.instance,
            "running": running,
            "generations": generations,
            "endpoints_generation": generations.get("endpoints", 0),
            "boot_id": self.boot_id,
        }
        return self.call("/api/v1/heartbeat", doc)[0]

    def last(self, slot: str) -> Captured | None:
        """The last push received for ``slot`` (endpoints, mesh, service)."""
        for c in reversed(self.pushes):
            role = "endpoints" if c.path == "/endpoints" else c.headers.get(HDR_BUNDLE_ROLE)
            if role == slot:
                return c
        return None

    def close(self) -> None:
        if self.registered and self.instance:
            self.call("/api/v1/deregister", {"instance": self.instance})
        self.server.shutdown()
        self.server.server_close()


def push_target(plane: Plane) -> PushTarget:
    """Who ``plane`` is in this boot, as a push to it must be signed for (its /config says)."""
    cfg = plane.config()
    return PushTarget(cfg["mesh"], cfg["service"], cfg["instance"] or "", cfg["boot_id"])


def signed_headers(
    signer: PushSigner | None, target: PushTarget, slot: str, body: bytes, generation: int
) -> dict[str, str]:
    """The headers of a push of ``body`` into ``slot``, signed (None: unsigned) for ``target``."""
    digest = hashlib.sha256(body).hexdigest()
    headers = {HDR_GENERATION: str(generation)}
    if slot != "endpoints":
        headers.update({HDR_DIGEST: digest, HDR_BUNDLE_ROLE: slot})
    if signer is not None:
        headers[HDR_SIGNATURE] = signer.sign(target, slot, digest, generation)
    return headers


def ready_with_certificate(plane: Plane, peers: int) -> bool:
    cfg = plane.config()
    eps = (cfg.get("endpoints") or {}).get("services") or {}
    # A scoped set (runtime.endpoints) holds what the policies name: the rest comes on demand.
    scoped = bool((cfg.get("endpoints") or {}).get("scoped"))
    return bool(
        cfg.get("certificate")
        and cfg.get("ready")
        and (scoped or sum(len(v) for v in eps.values()) >= peers)
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
