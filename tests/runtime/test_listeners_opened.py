"""A data plane opens the listeners it was configured with and no other (issue 17 #3): its
listening TCP sockets, read from ``/proc`` (the inodes of its own socket descriptors in the
kernel's listen table), are exactly the ones it reports; an active health check or a pool of
upstream connections listens on nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_harness import (
    Plane,
    ProxyClient,
    Upstream,
    endpoint_set,
    mesh_bundle,
    service_bundle,
    write_bundle,
)

from runtime.bundle import CatalogService

_LISTEN = "0A"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _ports(plane: Plane) -> set[int]:
    """The ports of what it says it listens on (admin, inbound, outbound, gateway listeners)."""
    names = [k for k in plane.listening if k in ("admin", "inbound", "outbound") or k.startswith("listener:")]
    return {int(plane.listening[k].rsplit(":", 1)[1]) for k in names}


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc/<pid>/net")
def test_a_sidecar_listens_on_its_configured_ports_only(
    plane: Callable[..., Plane], upstream: Callable[[str], Upstream], tmp_path: Path
) -> None:
    app = upstream("benigno")
    services = {"benigno": CatalogService(port=80, protocol="http")}
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"benigno": [(app.address, {})]}).model_dump_json())
    sidecar = plane(
        "--service", "benigno", "--app", app.address, "--inbound", "127.0.0.1:0",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle(services=services)),
        "--bundle", write_bundle(tmp_path, service_bundle("benigno")), "--endpoints", eps,
    )  # fmt: skip
    configured = _ports(sidecar)
    assert len(configured) == 3, sidecar.listening
    assert listening_ports(sidecar.proc.pid) == configured
    # Traffic through it opens upstream connections (a pool), not listeners.
    assert sidecar.outbound is not None
    assert ProxyClient(sidecar.outbound).get("http://benigno/x")[0] == 200
    assert listening_ports(sidecar.proc.pid) == configured
