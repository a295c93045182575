"""The secured mesh shared by the mesh tests (see ``secure_mesh``; one per session and data plane,
as starting processes is what costs); every process is stopped by its PID. The modules that use
it run in file order: test_mtls (traffic), then test_pushes (signed pushes, a control plane
restart, logs).

The mesh is built once per HTTP data plane X (``fast``, ``aiohttp``; ``MESHC_DATAPLANES`` narrows
it): benigno and magnanimo-v2 run X, magnanimo-v1 the other one, so every test sees X on both
sides of a hop and each data plane talking to the other."""

from __future__ import annotations

import os
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

DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
_OTHER = {"fast": "aiohttp", "aiohttp": "fast"}


@pytest.fixture(scope="session", params=DATAPLANES)
def secure_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureMesh]:
    dataplane: str = request.param
    work = tmp_path_factory.mktemp(f"secure-mesh-{dataplane}")
    policies = work / "policies"
    write_policies(policies)
    cp = ControlPlaneProc(policies, work)
    app = Upstream("benigno-app")
    planes = {}
    try:
        (work / "cp-state").mkdir()
        specs = [
            ("benigno", "benigno", {"version": "v1"}, dataplane),
            ("magnanimo-v1", "magnanimo", {"version": "v1"}, _OTHER[dataplane]),
            ("magnanimo-v2", "magnanimo", {"version": "v2"}, dataplane),
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
