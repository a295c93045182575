"""A data plane given several control planes (replicas) talks to one at a time and moves to the
next at once when its own is gone (refused) or stops answering (no reply within a heartbeat
interval, at least 1 s), registering there: on both data planes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_harness import FakeControlPlane, Plane, mesh_bundle, service_bundle, wait_until, write_bundle

from compiler.demo import free_port

INTERVAL_MS = 200
SLACK_S = 3.0
"""A busy 2-core host's scheduling, not protocol time."""


def _sidecar(plane: Callable[..., Plane], tmp_path: Path, *urls: str) -> Plane:
    return plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", tmp_path / "s", "--insecure-admin",
        *[a for u in urls for a in ("--control-plane", u)],
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_moves_to_the_next_control_plane_and_registers_there(
    plane: Callable[..., Plane], tmp_path: Path, how: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    a, b = FakeControlPlane(INTERVAL_MS), FakeControlPlane(INTERVAL_MS)
    try:
        # a comma-separated list and a repeated flag; the first is not listening
        sidecar = _sidecar(plane, tmp_path, f"{dead},{a.url}", b.url)
        wait_until(lambda: a.paths().count("/api/v1/heartbeat") >= 2, "heartbeats to the second URL")
        assert a.paths()[0] == "/api/v1/register" and b.paths() == []
        cfg = sidecar.config()
        assert cfg["control_plane"] == a.url and cfg["control_plane_switches"] == 1
        t0 = time.monotonic()
        if how == "killed":
            a.close()
            bound = INTERVAL_MS / 1000 + SLACK_S  # the next heartbeat is refused at once
        else:
            a.hang.set()
            bound = INTERVAL_MS / 1000 + 1.0 + SLACK_S  # then it waits its timeout, 1 s
        wait_until(lambda: "/api/v1/register" in b.paths(), "a registration with the next one")
        took = time.monotonic() - t0
        assert took <= bound, took
        wait_until(lambda: b.paths().count("/api/v1/heartbeat") >= 2, "heartbeats to the next one")
        assert sidecar.config()["control_plane"] == b.url
        assert sidecar.ready()  # it served all along from what it had
    finally:
        a.close()
        b.close()
