"""Discovery, TokenReview and Leases against an in-test API server on 127.0.0.1 (real HTTP).

``fake_apiserver`` speaks kube-apiserver's wire protocol from JSON in the real API's shapes; the
client is the real ``kubernetes_asyncio``. No cluster runs here: what a real API server does
beyond these shapes (watch cache timing, bookmarks, RBAC, admission) is not exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from fake_apiserver import (
    BENIGNO,
    NS,
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

from compiler.controlplane.kube.client import api_client
from compiler.controlplane.kube.discovery import KubeEndpoints
from compiler.controlplane.kube.identity import KubeAuthError, TokenReviewer
from compiler.controlplane.kube.leader import LeaseElector
from compiler.controlplane.kube.listwatch import ListWatch
from compiler.controlplane.store import Elector
from runtime.protocol import Registration


async def until(cond: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    """Poll for a condition; the deadline only catches hangs."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(body: Callable[[Store, str], Awaitable[None]]) -> None:
    async def main() -> None:
        store = Store()
        runner, url = await start(store)
        try:
            await body(store, url)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_endpoints_from_endpoint_slices_list_watch_and_relist_on_410() -> None:
    async def body(store: Store, url: str) -> None:
        store.put(SERVICES, SERVICE)
        store.put(PODS, pod("benigno-v1-a", "10.0.0.5", "v1"))
        store.put(PODS, pod("benigno-v2-b", "10.0.0.6", "v2"))
        store.put(PODS, pod("plain-c", "10.0.0.7", "v1", meshed=False))
        store.put(SLICES, endpoint_slice(("benigno-v1-a", "10.0.0.5", True), ("plain-c", "10.0.0.7", True)))
        changes = []
        api = await api_client(url, token="test-token")
        async with api:
            kube = KubeEndpoints(api, lambda: changes.append(1), watch_timeout_s=1)
            kube.start()
            try:
                await kube.synced()
                got = kube.endpoint_services("default")
                assert list(got) == [BENIGNO]
                [e] = got[BENIGNO]
                assert e.address == "10.0.0.5:15006" and e.healthy
                assert e.tags == {"app": "benigno", "pod-template-hash": "fd4567d95", "version": "v1"}
                assert kube.endpoint_services("other") == {}
                # a watch event: v2 joins, not ready yet
                store.put(
                    SLICES,
                    endpoint_slice(("benigno-v1-a", "10.0.0.5", True), ("benigno-v2-b", "10.0.0.6", False)),
                )
                await until(
                    lambda: len(kube.endpoint_services("default").get(BENIGNO, [])) == 2, "v2 to join"
                )
                eps = kube.endpoint_services("default")[BENIGNO]
                assert [(x.address, x.healthy, x.tags["version"]) for x in eps] == [
                    ("10.0.0.5:15006", True, "v1"),
                    ("10.0.0.6:15006", False, "v2"),
                ]
                assert kube.slices.lists == 1
                # rewatch after the server's timeout resumes from the last resourceVersion seen
                watches = kube.slices.watches
                await until(lambda: kube.slices.watches > watches, "a rewatch")
                rv = kube.slices.resource_version
                assert rv == store.objects[SLICES][(NS, "benigno-abcde")]["metadata"]["resourceVersion"]
                want = f"resourceVersion={rv}"
                await until(lambda: any(want in r for r in store.requests if SLICES in r), "a watch from rv")
                # 410 Gone: history compacted while v1 left; the relist must see that v1 is gone
                store.objects[SLICES][(NS, "benigno-abcde")]["endpoints"].pop(0)  # no event for it
                store.compact()
                await until(lambda: kube.slices.lists >= 2, "a relist after 410")
                eps = kube.endpoint_services("default")[BENIGNO]
                assert [x.address for x in eps] == ["10.0.0.6:15006"]
                # deletion
                store.delete(SLICES, NS, "benigno-abcde")
                await until(lambda: kube.endpoint_services("default") == {}, "the slice to go")
                assert changes
            finally:
                await kube.stop()

    run(body)


def test_list_watch_error_event_other_than_410_is_retried_not_fatal() -> None:
    async def body(store: Store, url: str) -> None:
        api = await api_client(url)
        async with api:
            from kubernetes_asyncio import client

            lw = ListWatch(
                client.CoreV1Api(api).list_service_for_all_namespaces, watch_timeout_s=1, retry_s=0.05
            )
            task = asyncio.create_task(lw.run())
            try:
                await until(lambda: lw.lists == 1, "the first list")
                store.put(SERVICES, SERVICE)
                await until(lambda: (NS, "benigno") in lw.items, "the watch event")
                assert lw.items[(NS, "benigno")]["kind"] == "Service"
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

    run(body)


def test_token_review_identity_comes_from_the_pod_never_the_request() -> None:
    async def body(store: Store, url: str) -> None:
        store.put(SERVICES, SERVICE)
        store.put(PODS, pod("benigno-v1-a", "10.0.0.5", "v1"))
        tokens(store)
        api = await api_client(url)
        async with api:
            services = [SERVICE]
            reviewer = TokenReviewer(
                api, lambda ns: [s for s in services if s["metadata"]["namespace"] == ns]
            )
            reg = Registration(service=BENIGNO, tags={"version": "v1"}, admin_address="127.0.0.1:15002")
            ident = await reviewer.authorize("good", reg)
            assert (ident.namespace, ident.service_account, ident.pod) == (NS, "benigno", "benigno-v1-a")
            assert ident.services == (BENIGNO,) and ident.labels["version"] == "v1"
            refusals = [
                (
                    "good",
                    reg.model_copy(update={"service": "magnanimo_kong-mesh-app_svc_4000"}),
                    "not selected",
                ),
                ("good", reg.model_copy(update={"tags": {"version": "v2"}}), "version=v2"),
                ("bad", reg, "not valid"),
                ("other-audience", reg, "not valid"),
                ("unbound", reg, "not bound to a pod"),
                ("user", reg, "not a service account"),
            ]
            for token, r, why in refusals:
                with pytest.raises(KubeAuthError, match=why) as info:
                    await reviewer.authorize(token, r)
                assert info.value.status == 403
            assert sum(1 for x in store.requests if "tokenreviews" in x) == 1 + len(refusals)

    run(body)


def test_a_gateway_is_named_by_its_pods_kuma_io_service_label() -> None:
    """A gateway registers under its MeshGateway's name, which no Kubernetes Service carries: the
    label ``kuma.io/service`` of its pod (set by ``meshc manifests``) names it, nothing else."""

    async def body(store: Store, url: str) -> None:
        gw = pod("meshc-gateway-a", "10.0.0.9", "v1")
        gw["metadata"]["labels"] = {
            "app.kubernetes.io/name": "meshc-gateway",
            "kuma.io/service": "meshc-gateway",
        }
        gw["spec"]["serviceAccountName"] = "meshc-gateway"
        store.put(PODS, gw)
        store.put(PODS, pod("benigno-v1-a", "10.0.0.5", "v1"))
        tokens(store)
        store.tokens["gateway"] = {
            **store.tokens["good"],
            "username": f"system:serviceaccount:{NS}:meshc-gateway",
            "extra": {"authentication.kubernetes.io/pod-name": ["meshc-gateway-a"]},
        }
        api = await api_client(url)
        async with api:
            reviewer = TokenReviewer(api, lambda ns: [SERVICE])
            reg = Registration(service="meshc-gateway", kind="gateway", admin_address="127.0.0.1:15002")
            ident = await reviewer.authorize("gateway", reg)
            assert ident.pod == "meshc-gateway-a"
            for token, r in (
                ("gateway", reg.model_copy(update={"service": "other-gateway"})),  # not its label
                ("good", reg),  # benigno's pod has no such label
                ("gateway", reg.model_copy(update={"kind": "sidecar"})),  # no Service selects it
            ):
                with pytest.raises(KubeAuthError) as info:
                    await reviewer.authorize(token, r)
                assert info.value.status == 403

    run(body)


def test_lease_one_leader_conflicts_and_takeover_after_expiry() -> None:
    async def body(store: Store, url: str) -> None:
        clock = [1000.0]
        api = await api_client(url)
        async with api:
            a = LeaseElector(
                api, "meshc-system", "meshc-leader", "cp-a", lease_duration_s=15, clock=lambda: clock[0]
            )
            b = LeaseElector(
                api, "meshc-system", "meshc-leader", "cp-b", lease_duration_s=15, clock=lambda: clock[0]
            )
            # both race to create it: the API server accepts one create, 409 AlreadyExists for the other
            ra, rb = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
            assert sorted([ra, rb]) == [False, True]
            leader, follower = (a, b) if ra else (b, a)
            # the loser either saw the winner's Lease or lost the create with 409 AlreadyExists
            assert store.lease_conflicts == follower.conflicts <= 1 and leader.conflicts == 0
            from kubernetes_asyncio import client

            again = client.V1Lease(metadata=client.V1ObjectMeta(name="meshc-leader"))
            with pytest.raises(client.exceptions.ApiException) as created:
                await client.CoordinationV1Api(api).create_namespaced_lease("meshc-system", again)
            assert created.value.status == 409
            lease = store.leases[("meshc-system", "meshc-leader")]
            assert lease["spec"]["holderIdentity"] == leader.identity
            assert lease["spec"]["leaseDurationSeconds"] == 15
            # the leader renews; the follower, seeing a fresh holder, stays follower
            assert await leader.try_acquire_or_renew()
            assert not await follower.try_acquire_or_renew()
            # a stale write (resourceVersion read before someone else's update) gets 409 Conflict
            coord = client.CoordinationV1Api(api)
            stale = await coord.read_namespaced_lease("meshc-leader", "meshc-system")
            assert await leader.try_acquire_or_renew()
            stale.spec.holder_identity = "intruder"
            with pytest.raises(client.exceptions.ApiException) as info:
                await coord.replace_namespaced_lease("meshc-leader", "meshc-system", stale)
            assert info.value.status == 409
            assert store.leases[("meshc-system", "meshc-leader")]["spec"]["holderIdentity"] == leader.identity
            # the leader stops renewing; after the lease duration (on the follower's clock) it takes over
            assert not await follower.try_acquire_or_renew()
            clock[0] += 16
            assert await follower.try_acquire_or_renew()
            lease = store.leases[("meshc-system", "meshc-leader")]
            assert lease["spec"]["holderIdentity"] == follower.identity
            assert lease["spec"]["leaseTransitions"] == 1
            # the old leader sees the new holder and steps down
            assert not await leader.try_acquire_or_renew()
            assert not leader.leader and follower.leader
            # as an Elector: the fencing token grew with the change of holder; a follower has none
            assert follower.fencing_token == 1 and leader.fencing_token is None
            elector: Elector = follower
            await elector.release()
            assert elector.fencing_token is None and not elector.leader

    run(body)
