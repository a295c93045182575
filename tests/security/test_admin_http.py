"""The admin listener is no weaker than the data listeners (issue 20 #4): the same strict parser
(runtime.h1 over llhttp), head and body read timeouts, a connection limit. A real sidecar process
on 127.0.0.1, probed with raw sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from secure_mesh import HANG_DEADLINE, Plane

_OK = b"GET /config HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    work = tmp_path_factory.mktemp("admin-http")
    args = ["--service", "benigno", "--admin", "127.0.0.1:0"]
    limits = ["--header-timeout", "1", "--body-timeout", "1", "--max-connections", "8"]
    p = Plane([*args, *limits], work)
    try:
        yield p
    finally:
        p.close()


def _exchange(plane: Plane, data: bytes) -> bytes:
    """Send ``data``, read until the server closes (HANG_DEADLINE only catches a hang)."""
    with socket.create_connection(plane.admin, timeout=HANG_DEADLINE) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            id="duplicate-content-length",
        ),
        pytest.param(
            b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
            id="conflicting-content-length",
        ),
        pytest.param(b"GET /config HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", id="nul-in-header"),
        pytest.param(b"GET /con\x00fig HTTP/1.1\r\nHost: a\r\n\r\n", id="nul-in-target"),
        pytest.param(
            b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            id="te-chunked-identity",
        ),
        pytest.param(
            b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(b"GET /config HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET /config HTTP/1.1\nHost: a\n\n", id="bare-lf"),
        pytest.param(
            b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", id="negative-length"
        ),
    ],
)
def test_malformed_framing_is_refused_with_400(plane: Plane, request_bytes: bytes) -> None:
    reply = _exchange(plane, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"Connection: close" in reply
    assert _exchange(plane, _OK).startswith(b"HTTP/1.1 200 ")  # and the listener still serves


def test_a_missing_body_is_cut_off_by_the_body_timeout(plane: Plane) -> None:
    reply = _exchange(plane, b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_slow_loris_is_closed_by_the_header_timeout(plane: Plane) -> None:
    """A head trickled one byte at a time (each byte well within any per-read timeout) is cut off
    by the deadline on the whole head: the server answers 408 and closes while we still send."""
    head = b"GET /config HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"x" * 10_000
    with socket.create_connection(plane.admin, timeout=HANG_DEADLINE) as s:
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


def test_an_idle_connection_is_closed_by_the_header_timeout(plane: Plane) -> None:
    with socket.create_connection(plane.admin, timeout=HANG_DEADLINE) as s:
        reply = b""
        while chunk := s.recv(65536):  # we send nothing: only the server can end this
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_keep_alive_and_pipelining_still_work(plane: Plane) -> None:
    one = b"GET /config HTTP/1.1\r\nHost: a\r\n\r\n"
    reply = _exchange(plane, one + one + _OK)
    assert reply.count(b"HTTP/1.1 200 ") == 3, reply[:300]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """Four connections at most, and a head timeout long enough that held ones stay open."""
    work = tmp_path_factory.mktemp("admin-limit")
    p = Plane(["--service", "benigno", "--admin", "127.0.0.1:0", "--max-connections", "4"], work)
    try:
        yield p
    finally:
        p.close()


def test_connections_over_the_limit_are_refused_and_the_slots_come_back(limited: Plane) -> None:
    plane = limited
    held = [socket.create_connection(plane.admin, timeout=HANG_DEADLINE) for _ in range(4)]
    try:
        # Accepted in order: the four held ones are counted before this one.
        with socket.create_connection(plane.admin, timeout=HANG_DEADLINE) as extra:
            refused = b""
            while chunk := extra.recv(65536):
                refused += chunk
        assert refused.startswith(b"HTTP/1.1 503 ") and b"too many connections" in refused, refused[:200]
    finally:
        for s in held:
            s.close()

    def served() -> bool:
        return _exchange(plane, _OK).startswith(b"HTTP/1.1 200 ")

    end = time.monotonic() + HANG_DEADLINE
    while not served():  # the closed ones are released as the server sees them close
        assert time.monotonic() < end, "the connection slots never came back"
        time.sleep(0.05)
