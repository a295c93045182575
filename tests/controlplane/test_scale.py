"""What keeps the control plane linear at 10,000 services x 1,000 data planes: endpoint sets
serialized once and spliced per push, membership changes gathered into one endpoint set per
window, bodies made only when a push slot is free, and a bounded stop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cp_harness import REPO

from compiler.controlplane.generation import Generations
from compiler.controlplane.metrics import ControlPlaneMetrics
from compiler.controlplane.pusher import Pusher
from compiler.controlplane.registry import Registry
from compiler.controlplane.release import ReleaseState
from compiler.demo import free_port
from runtime.protocol import EndpointSet, Registration

pytestmark = pytest.mark.timeout(120)


def _pusher(tmp_path: Path) -> tuple[Registry, Pusher]:
    reg = Registry()
    return reg, Pusher(reg, ReleaseState(), ControlPlaneMetrics(), Generations(tmp_path))


def test_the_spliced_endpoint_body_is_the_models_json(tmp_path: Path) -> None:
    async def go() -> None:
        reg, p = _pusher(tmp_path)
        for i, (svc, tags) in enumerate(
            [("benigno", {"version": "v1"}), ("benigno", {"version": "v2", "zone": "ñandú"}), ("b", {})]
        ):
            reg.register(
                Registration(
                    service=svc,
                    tags=tags,
                    inbound_address=f"127.0.0.1:{1000 + i}",
                    admin_address=f"127.0.0.1:{2000 + i}",
                )
            )
        p.flush_endpoints()
        services, _ = p._mesh_endpoints("default")
        assert sum(len(v) for v in services.values()) == 3
        for gen in (0, 7, 2**40):
            want = EndpointSet(generation=gen, services=services).model_dump_json().encode()
            assert p.endpoints_body("default", gen) == want
        await p.close()

    asyncio.run(go())


def test_a_registration_storm_makes_few_endpoint_sets(tmp_path: Path) -> None:
    """200 registrations in one burst: the first one's set is computed at once, the rest are
    gathered into a set at the window's end, not one set (and one push to everyone) each."""

    async def go() -> None:
        reg, p = _pusher(tmp_path)
        digests: list[str] = []
        for i in range(200):
            reg.register(
                Registration(
                    service=f"s{i % 10}",
                    inbound_address=f"127.0.0.1:{3000 + i}",
                    admin_address=f"127.0.0.1:{5000 + i}",
                )
            )
            digests.append(p._mesh_endpoints("default")[1])
        assert len(set(digests)) == 1  # the set from the first registration, until the window ends
        assert len(p._mesh_endpoints("default")[0]) == 1
        deadline = time.monotonic() + 30
        while sum(len(v) for v in p._mesh_endpoints("default")[0].values()) < 200:
            assert time.monotonic() < deadline, "the gathered endpoint set never came"
            await asyncio.sleep(0.01)
        services, digest = p._mesh_endpoints("default")
        assert digest != digests[0] and len(services) == 10
        await p.close()

    asyncio.run(go())


def test_sigterm_during_the_first_compile_exits_promptly(tmp_path: Path) -> None:
    """A control plane still in its first compile (6,000 services: seconds) stops on SIGTERM
    within 5 s, not once the compile is done."""
    repo = tmp_path / "repo"
    gen = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compile.py"), "--generate", "6000", "--dir", str(repo)],
        check=True,
        capture_output=True,
    )
    assert gen.returncode == 0
    port = free_port()
    log = tmp_path / "cp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "compiler.cli",
                "controlplane",
                str(repo),
                "--out",
                str(tmp_path / "out"),
                "--listen",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 60
            while b"compiling" not in log.read_bytes():  # its signal handlers are in place
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert code == 0, log.read_text()
    assert took < 5.0, f"took {took:.1f} s to stop\n{log.read_text()}"
    assert "stopped" in log.read_text()
