"""``meshc controlplane --kubernetes``: a real control plane (in process) on the in-test API server.

Registration with a projected service-account token is decided by TokenReview (the pod's Service
and labels), the endpoint set pushed to data planes comes from EndpointSlices and follows them.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
from fake_apiserver import (
    BENIGNO,
    JWT,
    PODS,
    SERVICE,
    SERVICES,
    SLICES,
    Store,
    endpoint_slice,
    pod,
    start,
    tokens,
)
from kube_harness import SEED

from compiler.ca import TokenIssuer
from compiler.controlplane.server import Config, ControlPlane
from compiler.demo import free_port
from runtime.protocol import Registration


async def until(cond: object, what: str, deadline_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_registration_by_token_review_and_endpoints_from_slices(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(SEED, policies)

    async def main() -> None:
        store = Store()
        store.put(SERVICES, SERVICE)
        store.put(PODS, pod("benigno-v1-a", "10.0.0.5", "v1"))
        store.put(PODS, pod("benigno-v2-b", "10.0.0.6", "v2"))
        store.put(SLICES, endpoint_slice(("benigno-v1-a", "10.0.0.5", True)))
        tokens(store)
        runner, url = await start(store)
        cfg = Config(
            policy_dir=policies,
            out=tmp_path / "out",
            port=free_port(),
            state_dir=tmp_path / "state",
            quiet=True,
            kubernetes=url,
        )
        assert cfg.state_dir is not None
        TokenIssuer(cfg.state_dir)
        cp = ControlPlane(cfg)
        await cp.start()
        base = f"http://127.0.0.1:{cfg.port}/api/v1/register"
        try:
            eps = cp.pusher._mesh_endpoints("default")[0]
            assert [(e.address, e.tags["version"]) for e in eps[BENIGNO]] == [("10.0.0.5:15006", "v1")]
            reg = Registration(
                service=BENIGNO,
                tags={"version": "v1"},
                admin_address=f"127.0.0.1:{free_port()}",
                inbound_address="10.0.0.5:15006",
            )
            async with aiohttp.ClientSession(trust_env=False) as s:

                async def post(r: Registration, token: str | None) -> int:
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    async with s.post(base, data=r.model_dump_json(), headers=headers) as resp:
                        return resp.status

                assert await post(reg, JWT) == 200
                assert [d.service for d in cp.registry.dataplanes.values()] == [BENIGNO]
                assert await post(reg.model_copy(update={"tags": {"version": "v2"}}), JWT) == 403
                other = reg.model_copy(update={"service": "magnanimo_kong-mesh-app_svc_4000"})
                assert await post(other, JWT) == 403
                assert await post(reg, "eyJbad.eyJbad.sig") == 403
                assert await post(reg, None) == 401  # the bootstrap-token path is unchanged
            assert any("tokenreviews" in r for r in store.requests)
            # the slice changes: v2 becomes ready; the pushed set follows
            store.put(
                SLICES, endpoint_slice(("benigno-v1-a", "10.0.0.5", True), ("benigno-v2-b", "10.0.0.6", True))
            )
            await until(
                lambda: len(cp.pusher._mesh_endpoints("default")[0].get(BENIGNO, [])) == 2, "v2 to join"
            )
            await until(lambda: cp.kube.leader, "the only replica to lead")
        finally:
            await cp.stop()
            await runner.cleanup()

    asyncio.run(main())
