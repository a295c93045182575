"""Issue 13: code in a Kubernetes pod calls a meshed service by its cluster DNS name.

Kuma names a Kubernetes Service port ``<name>_<namespace>_svc_<port>``; the pod's code says
``benigno:5000``, ``benigno.kong-mesh-app`` or ``benigno.kong-mesh-app.svc.cluster.local:5000``.
The outbound listener takes each of those for the mesh service, and refuses a short name of a
Service with two mesh ports (the Host's port is not looked at, so it would be a guess). Real
processes and HTTP on 127.0.0.1; passthrough is off, so no name leaves the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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

BENIGNO = "benigno_kong-mesh-app_svc_5000"


def test_the_cluster_dns_names_of_a_kuma_service_reach_it(
    plane: Callable[..., Plane], upstream: Callable[[str], Upstream], tmp_path: Path
) -> None:
    benigno, web80, web81 = upstream("benigno"), upstream("web80"), upstream("web81")
    services = {
        BENIGNO: CatalogService(port=5000, protocol="http"),
        "web_kong-mesh-app_svc_80": CatalogService(port=80, protocol="http"),
        "web_kong-mesh-app_svc_81": CatalogService(port=81, protocol="http"),
        "elsewhere_other-ns_svc_80": CatalogService(port=80, protocol="http"),
    }
    eps = tmp_path / "eps.json"
    eps.write_text(
        endpoint_set(
            1,
            {
                BENIGNO: [(benigno.address, {})],
                "web_kong-mesh-app_svc_80": [(web80.address, {})],
                "web_kong-mesh-app_svc_81": [(web81.address, {})],
                "elsewhere_other-ns_svc_80": [(web80.address, {})],
            },
        ).model_dump_json()
    )
    sidecar = plane(
        "--service", "magnanimo_kong-mesh-app_svc_5000", "--outbound", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--endpoints", eps,
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle(services=services, passthrough=False)),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo_kong-mesh-app_svc_5000")),
    )  # fmt: skip
    assert sidecar.outbound is not None
    client = ProxyClient(sidecar.outbound)
    for host in (
        "benigno:5000",
        "benigno.kong-mesh-app:5000",
        "benigno.kong-mesh-app.svc:5000",
        "benigno.kong-mesh-app.svc.cluster.local:5000",
        "benigno.kong-mesh-app.svc.cluster.local.:5000",
        f"{BENIGNO}:5000",
    ):
        status, _, _ = client.get(f"http://{host}/hello")
        assert status == 200, host
    assert benigno.hits["/hello"] == 6
    # Another namespace's service by its namespaced names only; its short name is not ours.
    assert client.get("http://elsewhere.other-ns.svc.cluster.local/e")[0] == 200
    assert client.get("http://elsewhere/e")[0] >= 400
    # Two mesh ports of one Service: the short names would be a guess, so they are refused.
    assert client.get("http://web:80/w")[0] >= 400
    assert client.get("http://web.kong-mesh-app.svc.cluster.local:81/w")[0] >= 400
    assert client.get("http://web_kong-mesh-app_svc_81:81/w")[0] == 200
    assert web80.hits["/w"] == 0 and web81.hits["/w"] == 1
