"""The control listeners are no weaker than the data listeners (issue 20 #4): the same strict
parser (runtime.h1 over llhttp), head and body read timeouts, a connection limit. Each test runs
against a real sidecar's admin API (runtime._http) and a real control plane's API (aiohttp behind
runtime.h1guard), on 127.0.0.1, probed with raw sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from framing_cases import FRAMING_CASES
from secure_mesh import HANG_DEADLINE, REPO, ControlPlaneProc, Plane


@dataclass
class Listener:
    """A control listener under test: its address and a path it answers 200."""

    address: tuple[str, int]
    ok_path: str
    body_target: str
    """A method and path whose handler reads the request body."""

    @property
    def ok(self) -> bytes:
        return f"GET {self.ok_path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()


def _start(kind: str, work: Path, limits: list[str]) -> tuple[Listener, Plane | ControlPlaneProc]:
    if kind == "admin":
        p = Plane(["--service", "benigno", "--admin", "127.0.0.1:0", *limits], work)
        return Listener(p.admin, "/config", "PUT /endpoints"), p
    cp = ControlPlaneProc(REPO / "policies", work, extra=limits)
    cp.start()
    return Listener(("127.0.0.1", cp.port), "/healthz", "POST /api/v1/register"), cp


def _stop(proc: Plane | ControlPlaneProc) -> None:
    if isinstance(proc, Plane):
        proc.close()
    else:
        proc.stop()


@pytest.fixture(scope="module", params=["admin", "controlplane"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    work = tmp_path_factory.mktemp(f"{request.param}-http")
    listener, proc = _start(
        request.param, work, ["--header-timeout", "1", "--body-timeout", "1", "--max-connections", "8"]
    )
    try:
        yield listener
    finally:
        _stop(proc)


def _exchange(plane: Listener, data: bytes) -> bytes:
    """Send ``data``, read until the server closes (HANG_DEADLINE only catches a hang)."""
    with socket.create_connection(plane.address, timeout=HANG_DEADLINE) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("request_bytes", FRAMING_CASES)
def test_malformed_framing_is_refused_with_400(plane: Listener, request_bytes: bytes) -> None:
    reply = _exchange(plane, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"connection: close" in reply.lower()
    assert _exchange(plane, plane.ok).startswith(b"HTTP/1.1 200 ")  # and the listener still serves


def test_a_missing_body_is_cut_off_by_the_body_timeout(plane: Listener) -> None:
    head = f"{plane.body_target} HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{{}}"
    reply = _exchange(plane, head.encode())
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_slow_loris_is_closed_by_the_header_timeout(plane: Listener) -> None:
    """A head trickled one byte at a time (each byte well within any per-read timeout) is cut off
    by the deadline on the whole head: the server answers 408 and closes while we still send."""
    head = b"GET /config HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"x" * 10_000
    with socket.create_connection(plane.address, timeout=HANG_DEADLINE) as s:
        s.settimeout(0.2)
        reply = b""
        end = time.monotonic() + HANG_DEADLINE
        for i in range(len(head)):
            assert time.monotonic() < end, "the trickled head is still being read"
            try:
                s.send(head[i : i + 1])
            except OSError:
                break  # closed under us
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break  # our byte after its close: the reset may discard the 408 before we read it
            if not chunk:
                break
            reply += chunk
        else:
            pytest.fail("the whole trickled head was accepted: no header timeout")
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert i < len(head) - 1


def test_an_idle_connection_is_closed_by_the_header_timeout(plane: Listener) -> None:
    with socket.create_connection(plane.address, timeout=HANG_DEADLINE) as s:
        reply = b""
        while chunk := s.recv(65536):  # we send nothing: only the server can end this
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_keep_alive_and_pipelining_still_work(plane: Listener) -> None:
    one = plane.ok.replace(b"Connection: close\r\n", b"")
    reply = _exchange(plane, one + one + plane.ok)
    assert reply.count(b"HTTP/1.1 200 ") == 3, reply[:300]


@pytest.fixture(scope="module", params=["admin", "controlplane"])
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    """Four connections at most, and a head timeout long enough that held ones stay open."""
    listener, proc = _start(
        request.param, tmp_path_factory.mktemp(f"{request.param}-limit"), ["--max-connections", "4"]
    )
    try:
        yield listener
    finally:
        _stop(proc)


def test_connections_over_the_limit_are_refused_and_the_slots_come_back(limited: Listener) -> None:
    plane = limited
    held = [socket.create_connection(plane.address, timeout=HANG_DEADLINE) for _ in range(4)]
    try:
        # Accepted in order: the four held ones are counted before this one.
        with socket.create_connection(plane.address, timeout=HANG_DEADLINE) as extra:
            refused = b""
            while chunk := extra.recv(65536):
                refused += chunk
        assert refused.startswith(b"HTTP/1.1 503 ") and b"reached --max-connections" in refused, refused[:200]
    finally:
        for s in held:
            s.close()

    def served() -> bool:
        return _exchange(plane, plane.ok).startswith(b"HTTP/1.1 200 ")

    end = time.monotonic() + HANG_DEADLINE
    while not served():  # the closed ones are released as the server sees them close
        assert time.monotonic() < end, "the connection slots never came back"
        time.sleep(0.05)
