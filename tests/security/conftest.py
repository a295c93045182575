"""The secured mesh shared by the mesh tests (see ``secure_mesh``; one per session, as starting
processes is what costs); every process is stopped by its PID. The modules that use it run in
file order: test_mtls (traffic), then test_pushes (signed pushes, a control plane restart, logs)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.ca import TokenIssuer

sys.path.insert(0, str(Path(__file__).parent))

from secure_mesh import (
    ControlPlaneProc,
    SecureMesh,
    Upstream,
    ready_with_certificate,
    start_sidecar,
    wait_until,
    write_policies,
)


@pytest.fixture(scope="session")
def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    work = tmp_path_factory.mktemp("secure-mesh")
    policies = work / "policies"
    write_policies(policies)
    cp = ControlPlaneProc(policies, work)
    app = Upstream("benigno-app")
    planes = {}
    try:
        (work / "cp-state").mkdir()
        specs = [
            ("benigno", "benigno", {"version": "v1"}, "fast"),
            ("magnanimo-v1", "magnanimo", {"version": "v1"}, "aiohttp"),
            ("magnanimo-v2", "magnanimo", {"version": "v2"}, "fast"),
        ]
        # The token secret first (as `meshc token` makes it), then the control plane that checks it.
        tokens = TokenIssuer(cp.secrets)
        cp.start()
        for name, service, tags, dataplane in specs:
            token = tokens.mint("default", service)
            planes[name] = start_sidecar(work, cp, name, service, tags, dataplane, app.address, token)
        for plane in planes.values():
            wait_until(
                lambda p=plane: ready_with_certificate(p, 1), "sidecars with certificates and endpoints"
            )
        yield SecureMesh(work, cp, app, planes)
    finally:
        for p in planes.values():
            p.close()
        cp.stop()
        app.close()
