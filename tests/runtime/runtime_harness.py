"""Test harness: real upstream servers, real data plane processes, bundles built from the models.

Everything listens on 127.0.0.1 with OS-chosen ports. Nothing sleeps to synchronise: ``wait_until``
polls a condition under a generous deadline that only exists to turn a hang into a failure.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from runtime.bundle import (
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
from runtime.protocol import HDR_BUNDLE_ROLE, HDR_DIGEST, HDR_GENERATION, Endpoint, EndpointSet

REPO = Path(__file__).resolve().parents[2]
DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
"""The HTTP data planes every data plane test runs on."""
HANG_DEADLINE = 60.0
"""Only there to turn a hang into a failure; never reached by a passing test."""


def aiohttp_cannot(request: Any, dataplane: str, reason: str) -> None:
    """A documented limit of the aiohttp path: the test runs there and must fail (strict xfail)."""
    import pytest

    if dataplane == "aiohttp":
        request.applymarker(pytest.mark.xfail(reason=f"aiohttp path: {reason}", strict=True))


def wait_until(cond: Callable[[], Any], what: str, deadline: float = HANG_DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- upstream apps -------------------------------------------------------------------------------


class Upstream:
    """An HTTP/1.1 app that answers its name; behaviour can be changed while it runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.hang = threading.Event()  # while set, requests block until released
        self.release = threading.Event()
        self.health_status = 200
        self.hits: Counter[str] = Counter()
        self.seen_headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PUT(self) -> None:
                self._serve()

            def _serve(self) -> None:
                body_in = self._body()
                path = self.path
                if path.startswith("/health"):
                    self._send(upstream.health_status, {"name": upstream.name, "health": True})
                    return
                with upstream.lock:
                    upstream.hits[path.split("?")[0]] += 1
                    upstream.seen_headers.append({k.lower(): v for k, v in self.headers.items()})
                if path.startswith("/big/"):
                    self._big(int(path.split("/")[2]))
                    return
                if upstream.hang.is_set() or path.startswith("/hang"):
                    upstream.release.wait(HANG_DEADLINE)
                self._send(
                    upstream.status,
                    {"name": upstream.name, "path": path, "method": self.command, "body_len": len(body_in)},
                )

            def _big(self, n: int) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(n))
                self.end_headers()
                chunk = b"x" * 65536
                left = n
                while left:
                    piece = chunk[: min(left, len(chunk))]
                    self.wfile.write(piece)
                    left -= len(piece)

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def total(self) -> int:
        with self.lock:
            return sum(self.hits.values())

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class TcpEcho:
    """A TCP server that sends its name, then echoes what it receives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        echo = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                echo.connections += 1
                self.request.sendall(f"{echo.name}\n".encode())
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- bundles -------------------------------------------------------------------------------------


def simple_destination(
    service: str,
    split: list[tuple[int, dict[str, str]]] | None = None,
    timeout: TimeoutConf | None = None,
    **kinds: Any,
) -> Destination:
    route = RouteConf(split=tuple(Split(weight=w, service=service, tags=t) for w, t in (split or [(1, {})])))
    return Destination(
        route=(Rule[RouteConf](conf=route),),
        timeout=(Rule[TimeoutConf](conf=timeout or TimeoutConf()),),
        **kinds,
    )


def mesh_bundle(
    services: dict[str, CatalogService] | None = None,
    destinations: dict[str, Destination] | None = None,
    passthrough: bool = True,
) -> MeshBundle:
    services = services or {
        "benigno": CatalogService(port=5000, protocol="http", subsets=({"version": "v1"}, {"version": "v2"})),
        "magnanimo": CatalogService(port=4000, protocol="http"),
    }
    return MeshBundle(
        mesh="default", passthrough=passthrough, services=services, destinations=destinations or {}
    )


def service_bundle(service: str, inbound: Inbound | None = None, **kw: Any) -> ServiceBundle:
    return ServiceBundle(mesh="default", service=service, inbound=inbound or Inbound(), **kw)


def write_bundle(directory: Path, bundle: MeshBundle | ServiceBundle) -> Path:
    data = bundle_bytes(bundle)
    path = directory / f"{bundle_digest(data)}.json"
    path.write_bytes(data)
    return path


def endpoint_set(generation: int, services: dict[str, list[tuple[str, dict[str, str]]]]) -> EndpointSet:
    return EndpointSet(
        generation=generation,
        services={s: [Endpoint(address=a, tags=t) for a, t in eps] for s, eps in services.items()},
    )


# --- processes -----------------------------------------------------------------------------------


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Plane:
    """A data plane process (``python -m runtime.sidecar`` or ``runtime.gateway``)."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        module: str = "runtime.sidecar",
        dataplane: str = "fast",
        repo: Path = REPO,
    ) -> None:
        """``repo``: the source tree it runs (another commit's, for mixed-version tests)."""
        if "--control-plane" not in args and "--trust-key" not in args:
            args = [*args, "--insecure-admin"]  # these tests push unsigned bundles by hand
        self.stderr_path = workdir / f"stderr-{os.getpid()}-{time.monotonic_ns()}.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.dataplane = dataplane
        env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1", "MESHC_DATAPLANE": dataplane}
        env.pop("HTTP_PROXY", None)
        env.pop("http_proxy", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        listening = wait_until(lambda: self.event("listening") or self._died(), "the data plane to listen")
        self.listening: dict[str, str] = listening
        self.admin = _addr(listening["admin"])
        self.outbound = _addr(listening["outbound"]) if "outbound" in listening else None
        self.inbound = _addr(listening["inbound"]) if "inbound" in listening else None

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._events_lock:
                self.events.append(doc)

    def event(self, name: str) -> dict[str, Any] | None:
        with self._events_lock:
            return next((e for e in self.events if e.get("event") == name), None)

    def _died(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"data plane exited {self.proc.returncode}: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(HANG_DEADLINE)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(HANG_DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(HANG_DEADLINE)
        self._stderr.close()

    # -- admin ---------------------------------------------------------------------------------

    def admin_request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.admin, timeout=HANG_DEADLINE)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def push(
        self,
        data: bytes,
        digest: str | None = None,
        generation: int = 1,
        role: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {
            HDR_DIGEST: digest if digest is not None else bundle_digest(data),
            HDR_GENERATION: str(generation),
        }
        if role:
            headers[HDR_BUNDLE_ROLE] = role
        status, body = self.admin_request("PUT", "/bundle", data, headers)
        return status, json.loads(body)

    def push_bundle(
        self, bundle: MeshBundle | ServiceBundle, generation: int = 1
    ) -> tuple[int, dict[str, Any]]:
        return self.push(bundle_bytes(bundle), generation=generation, role=bundle.type)

    def push_endpoints(self, eps: EndpointSet) -> tuple[int, dict[str, Any]]:
        status, body = self.admin_request("PUT", "/endpoints", eps.model_dump_json().encode())
        return status, json.loads(body)

    def config(self) -> dict[str, Any]:
        status, body = self.admin_request("GET", "/config")
        assert status == 200
        doc: dict[str, Any] = json.loads(body)
        return doc

    def metrics(self) -> str:
        return self.admin_request("GET", "/metrics")[1].decode()

    def ready(self) -> bool:
        return self.admin_request("GET", "/ready")[0] == 200


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# --- clients -------------------------------------------------------------------------------------


class ProxyClient:
    """A keep-alive HTTP client that talks to a proxy (absolute URIs) or straight to a server."""

    def __init__(self, address: tuple[str, int], timeout: float = HANG_DEADLINE) -> None:
        self.address = address
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
            try:
                self.conn.request(method, target, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                # A keep-alive connection the server closed between requests: reconnect once.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", target, headers=headers)

    def name(self, target: str, headers: dict[str, str] | None = None) -> str:
        status, _, body = self.get(target, headers)
        assert status == 200, (status, body)
        name: str = json.loads(body)["name"]
        return name

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def connect_tunnel(proxy: tuple[str, int], authority: str) -> tuple[socket.socket, bytes]:
    """Open ``CONNECT authority`` through the proxy; (socket, response head + anything after)."""
    sock = socket.create_connection(proxy, timeout=HANG_DEADLINE)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return sock, data


def read_line(sock: socket.socket, start: bytes = b"") -> tuple[bytes, bytes]:
    data = start
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


def each(n: int) -> Iterator[int]:
    return iter(range(n))


class FakeControlPlane:
    """Answers the data plane protocol (register, heartbeat, deregister) and records each call;
    ``hang`` makes it stop answering, as a stopped process would."""

    def __init__(self, interval_ms: int = 50) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.hang = threading.Event()
        self._released = threading.Event()
        cp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if cp.hang.is_set():
                    cp._released.wait(HANG_DEADLINE)
                    return
                cp.calls.append((self.path, body))
                reply = b"{}"
                if self.path == "/api/v1/register":
                    doc = {"instance": "magnanimo-1", "heartbeat_interval_ms": interval_ms}
                    reply = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
