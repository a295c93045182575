"""Issue 20 #4 on the data listeners: the same read timeouts and connection limit as the admin API.

A head that stops arriving (slow loris) and a body that stops arriving are answered 408 and
closed after ``--header-timeout`` / ``--body-timeout``; a listener at ``--max-connections``
answers 503 and closes, and takes connections again once one has gone. Each refusal is counted in
``meshc_listener_refusals``. The timeouts are short here so that the hang deadline is never near;
nothing sleeps: every wait is a blocking read that the proxy itself ends.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from framing_cases import FRAMING_CASES
from runtime_harness import (
    Plane,
    Upstream,
    endpoint_set,
    mesh_bundle,
    service_bundle,
    wait_until,
    write_bundle,
)

from runtime.bundle import CatalogService

_READ_GUARD_S = 15.0
"""A read that the proxy should end within a 0.5 s limit (and a sweep) fails after this long."""


def _sidecar(plane: Callable[..., Plane], up: Upstream, tmp_path: Path, *limits: str) -> Plane:
    services = {"benigno": CatalogService(port=80, protocol="http")}
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"benigno": [(up.address, {})]}).model_dump_json())
    sidecar = plane(
        "--service", "client", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle(services=services)),
        "--bundle", write_bundle(tmp_path, service_bundle("client")), "--endpoints", eps, *limits,
    )  # fmt: skip
    assert sidecar.outbound is not None
    return sidecar


@pytest.fixture
def benigno(upstream: Callable[[str], Upstream]) -> Upstream:
    return upstream("benigno")


@pytest.fixture
def limited(plane: Callable[..., Plane], benigno: Upstream, tmp_path: Path) -> Callable[..., Plane]:
    """A sidecar with these limit flags (in front of ``benigno``), on this test's data plane."""
    return lambda *limits: _sidecar(plane, benigno, tmp_path, *limits)


def _connect(plane: Plane) -> socket.socket:
    assert plane.outbound is not None
    return socket.create_connection(plane.outbound, timeout=_READ_GUARD_S)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the proxy closes the connection (the hang deadline bounds the wait)."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def _get(plane: Plane) -> bytes:
    with _connect(plane) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: benigno\r\nConnection: close\r\n\r\n")
        return _read_all(s)


def _refusals(plane: Plane, reason: str) -> float:
    prefix = f'meshc_listener_refusals_total{{listener="outbound",reason="{reason}"}} '
    for line in plane.metrics().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_a_head_that_stops_arriving_is_answered_408_and_closed(limited: Callable[..., Plane]) -> None:
    sidecar = limited("--header-timeout", "0.5")
    with _connect(sidecar) as loris, _connect(sidecar) as silent:
        loris.sendall(b"GET /ok HTTP/1.1\r\nHost: beni")  # ... and never the rest
        assert _read_all(loris).startswith(b"HTTP/1.1 408 "), "a partial head is answered 408"
        assert _read_all(silent).startswith(b"HTTP/1.1 408 "), "so is a connection that sends nothing"
    assert _get(sidecar).startswith(b"HTTP/1.1 200 "), "whole requests are still served"
    assert _refusals(sidecar, "header_timeout") == 2


def test_a_body_that_stops_arriving_is_answered_408_and_closed(limited: Callable[..., Plane]) -> None:
    sidecar = limited("--body-timeout", "0.5")
    with _connect(sidecar) as s:
        s.sendall(b"POST /ok HTTP/1.1\r\nHost: benigno\r\nContent-Length: 10\r\n\r\nabc")
        assert _read_all(s).startswith(b"HTTP/1.1 408 "), "a stalled body is answered 408"
    assert _get(sidecar).startswith(b"HTTP/1.1 200 ")
    assert _refusals(sidecar, "body_timeout") == 1


def test_a_listener_at_its_connection_limit_answers_503_until_one_goes(limited: Callable[..., Plane]) -> None:
    sidecar = limited("--max-connections", "2")
    first, second = _connect(sidecar), _connect(sidecar)
    try:
        for s in (first, second):  # both are served: they hold the two places
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: benigno\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        answer = _get(sidecar)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"max-connections" in answer, answer
        assert _refusals(sidecar, "max_connections") == 1
        first.close()
        wait_until(lambda: _get(sidecar).startswith(b"HTTP/1.1 200 "), "a place again once one has gone")
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("request_bytes", FRAMING_CASES)
def test_malformed_framing_is_refused_with_400_before_anything_is_forwarded(
    limited: Callable[..., Plane], benigno: Upstream, request_bytes: bytes
) -> None:
    """The same strict parser as the admin API, on both data planes: the upstream sees nothing."""
    sidecar = limited()
    with _connect(sidecar) as s:
        s.sendall(request_bytes)
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"connection: close" in reply.lower()
    assert _get(sidecar).startswith(b"HTTP/1.1 200 "), "the listener still serves"
    assert dict(benigno.hits) == {"/ok": 1}, "only the good request was forwarded"
