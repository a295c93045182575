"""Scoped per-service endpoint sets across restarts and failovers (``runtime.endpoints``, issue 11).

What a control plane knows of a data plane's endpoint set (which services it fetched on demand,
the per-service digests the next delta goes over) lives in its memory; these tests take that
memory away and check that the data plane still gets the right scoped deltas, and never a delta
over a set it does not run:

* a control plane restarted from its saved registry keeps pushing the services a sidecar
  fetched on demand (the sidecar declares them in its heartbeats), and its first push after the
  restart is a delta (it rebuilds the base from the running digest the heartbeat reports);
* a sidecar restarted from its state dir serves its scoped set while the control plane is down,
  then converges; an altered endpoint set in the state dir is refused and nothing is routed to it;
* on PostgreSQL, a replica restarted from the store keeps sending its restored sidecars scoped
  deltas (the store keeps ``endpoint_deltas``), and a sidecar that fails over to another replica
  keeps its on-demand services and gets deltas over the set it reported at registration.

Pure checks of the pieces first, then real processes (control planes, sidecars of each HTTP data
plane, real apps, a throw-away PostgreSQL cluster: ``tests/pg_cluster.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import HANG_DEADLINE, Plane, ProxyClient, Upstream, metric_value, wait_until
from secure_mesh import ControlPlaneProc
from test_pieces import _policies

from compiler.ca import TokenIssuer
from compiler.controlplane.endpoints import EndpointPlans, MeshEndpoints
from compiler.controlplane.registry import Registry
from runtime.endpoints import apply
from runtime.protocol import Endpoint, EndpointSet, Heartbeat, Registration
from runtime.state import StateDir, StoredState

DATAPLANE_CHOSEN_BY_TEST = True
DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
pytestmark = pytest.mark.timeout(600)


def _ep(address: str) -> Endpoint:
    return Endpoint(address=address)


# --- pure ---------------------------------------------------------------------------------------


def test_the_on_demand_declaration_is_left_out_of_the_json_when_empty() -> None:
    """Older control planes forbid fields they do not know: a data plane that fetched nothing
    on demand sends the registration and heartbeat bytes it always sent."""
    reg = Registration(service="caller", admin_address="127.0.0.1:1")
    assert "endpoints_on_demand" not in reg.model_dump_json()
    assert "endpoints_running" not in reg.model_dump_json()
    hb = Heartbeat(instance="caller-1")
    assert hb.model_dump_json() == (
        '{"instance":"caller-1","running":{},"generations":{},"endpoints_generation":0,"boot_id":null}'
    )
    told = Heartbeat(instance="caller-1", endpoints_on_demand=["beta"])
    assert Heartbeat.model_validate_json(told.model_dump_json()).endpoints_on_demand == ["beta"]
    registry = Registry()
    dp = registry.register(reg.model_copy(update={"endpoints_on_demand": ["beta"], "instance": "caller-1"}))
    assert dp.on_demand == ("beta",)
    registry.heartbeat(told.model_copy(update={"endpoints_on_demand": ["beta", "gamma"]}))
    assert dp.on_demand == ("beta", "gamma")


def _per_service() -> tuple[EndpointPlans, Any]:
    reg = Registration(
        service="caller",
        admin_address="127.0.0.1:7001",
        pieces=True,
        endpoint_deltas=True,
        endpoints_on_demand=["beta"],
    )
    return EndpointPlans(), Registry().register(reg)


def test_a_control_plane_that_knows_nothing_deltas_only_over_what_the_data_plane_reports() -> None:
    plans, dp = _per_service()
    plans.registered(dp)  # what it declared joins its scope
    scope = plans.scope(dp, {"alpha"})
    assert scope == {"alpha", "beta"}
    eps = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:2")]})
    body, _ = plans.body(dp, eps, scope, 1, None)
    running, _ = apply(None, None, EndpointSet.model_validate_json(body))
    assert running.digest is not None
    # Nothing known: whatever it says it runs, the next push is whole.
    plans.unbased(dp)
    assert b'"base"' not in plans.body(dp, eps, scope, 2, running.digest)[0]
    # Its registration's set, altered (its services do not make its digest): not a base.
    forged = running.model_copy(update={"services": {**running.services, "beta": [_ep("127.0.0.1:9")]}})
    assert plans.adopt(dp, forged) is None and not plans.based_on(dp, running.digest)
    # The set itself: the next push is a delta over it.
    assert plans.adopt(dp, running) == running.digest and plans.based_on(dp, running.digest)
    after = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:3")]}, eps)
    delta = EndpointSet.model_validate_json(plans.body(dp, after, scope, 3, running.digest)[0])
    assert delta.base == running.digest and set(delta.services) == {"beta"}
    # A restart: only the digest its heartbeat reports. The set it would get now has that
    # digest: that is its set (the digest covers every service's), a base again.
    plans.unbased(dp)
    assert not plans.rebuild(dp, after, scope, running.digest)  # not what it runs: no base
    assert plans.rebuild(dp, eps, scope, running.digest) and plans.based_on(dp, running.digest)
    assert not plans.rebuild(dp, eps, frozenset({"alpha"}), "0" * 64)


def test_a_stored_endpoint_set_that_does_not_add_up_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plans, dp = _per_service()
    eps = MeshEndpoints({"alpha": [_ep("127.0.0.1:1")], "beta": [_ep("127.0.0.1:2")]})
    scope = frozenset({"alpha", "beta"})
    whole, _ = apply(None, None, EndpointSet.model_validate_json(plans.body(dp, eps, scope, 4, None)[0]))
    assert whole.scoped and whole.digest is not None
    state = StateDir(tmp_path)
    state.save("caller", StoredState(endpoints=whole, instance="caller-1", on_demand=frozenset({"beta"})))
    back = state.load()
    assert back.endpoints == whole and back.on_demand == {"beta"} and back.instance == "caller-1"
    doc = json.loads((tmp_path / "state.json").read_text())
    for altered in (
        {"beta": [{"address": "127.0.0.1:9"}]},  # another address, the same digest
        {"alpha": doc["endpoints"]["services"]["alpha"]},  # a service dropped
    ):
        bad = {**doc, "endpoints": {**doc["endpoints"], "services": altered}}
        (tmp_path / "state.json").write_text(json.dumps(bad))
        got = StateDir(tmp_path).load()
        assert got.endpoints is None and got.instance == "caller-1"  # the rest is kept
        err = capsys.readouterr().err
        assert "refusing the stored endpoint set" in err and "altered" in err
    for extra in ({"base": whole.digest}, {"digest": None}):  # a delta; a scoped set unnamed
        bad = {**doc, "endpoints": {**doc["endpoints"], **extra}}
        (tmp_path / "state.json").write_text(json.dumps(bad))
        assert StateDir(tmp_path).load().endpoints is None
        assert "refusing the stored endpoint set" in capsys.readouterr().err
    # The older form (no digest, not scoped) cannot be checked and is taken as before.
    older = {**doc, "endpoints": {"generation": 1, "services": {"alpha": [{"address": "127.0.0.1:1"}]}}}
    (tmp_path / "state.json").write_text(json.dumps(older))
    assert StateDir(tmp_path).load().endpoints == EndpointSet(
        generation=1, services={"alpha": [_ep("127.0.0.1:1")]}
    )


def test_both_stores_keep_how_a_data_plane_takes_its_endpoints(pg_url: str, tmp_path: Path) -> None:
    """A control plane restarted on its store restores each data plane as it registered: one
    that takes per-service endpoint sets keeps getting them (not the whole mesh's set)."""
    from compiler.controlplane.store.local import LocalStore
    from compiler.controlplane.store.postgres import PostgresStore

    async def go() -> None:
        pg = PostgresStore(pg_url, replica="r0", replica_url="http://r0")
        await pg.start()
        for store in (pg, LocalStore(tmp_path, replica="r0", replica_url="http://r0")):
            registry = Registry(store=store)
            for port, deltas in ((1, True), (2, False)):
                registry.register(
                    Registration(
                        service="caller",
                        admin_address=f"127.0.0.1:{port}",
                        boot_id="b",
                        pieces=True,
                        endpoint_deltas=deltas,
                        endpoints_on_demand=["beta"],
                    )
                )
            if store is pg:
                assert await pg.flush(timeout=HANG_DEADLINE)
            else:
                await store.close()
            back = {d.instance: d for d in await store.load_dataplanes()}
            assert {n: (d.pieces, d.endpoint_deltas) for n, d in back.items()} == {
                "caller-1": (True, True),
                "caller-2": (True, False),
            }, store.name
            assert all(d.on_demand == () for d in back.values())  # not stored: it says so again
        await pg.close()

    asyncio.run(asyncio.wait_for(go(), 120))


# --- real processes ------------------------------------------------------------------------------


@dataclass
class ScopeMesh:
    """Control plane replicas (one on a saved registry, or several on PostgreSQL) and sidecars."""

    work: Path
    policies: Path
    cps: list[ControlPlaneProc]
    tokens: TokenIssuer
    dataplane: str
    apps: dict[str, Upstream] = field(default_factory=dict)
    planes: dict[str, Plane] = field(default_factory=dict)

    def start(self, name: str, service: str, app: str | None = None, cps: list[int] | None = None) -> Plane:
        if app is not None and app not in self.apps:
            self.apps[app] = Upstream(app)
        urls = ",".join(self.cps[i].url for i in (cps if cps is not None else range(len(self.cps))))
        args = [
            "--service",
            service,
            "--app",
            self.apps[app].address if app is not None else "127.0.0.1:9",
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            str(self.work / f"state-{name}"),
            "--control-plane",
            urls,
            "--token",
            self.tokens.mint("default", service),
            "--drain-seconds",
            "0.2",
            "--dataplane",
            self.dataplane,
        ]
        plane = self.planes[name] = Plane(args, self.work, dataplane=self.dataplane)
        return plane

    def row(self, plane: Plane) -> dict[str, Any]:
        """Its status row on the replica it talks to now."""
        cfg = plane.config()
        cp = next((c for c in self.cps if c.url == cfg["control_plane"] and c.proc is not None), None)
        if cp is None:
            return {}
        try:
            rows = cp.api("/api/v1/status")["dataplanes"]
        except OSError:
            return {}
        return next((dict(r) for r in rows if r["instance"] == cfg["instance"]), {})

    def synced(self, plane: Plane) -> bool:
        row = self.row(plane)
        ready = plane.config()["ready"]
        return bool(ready and row.get("status") == "SYNCED" and row.get("state") == "Online")

    def close(self) -> None:
        for p in self.planes.values():
            p.close()
        for cp in self.cps:
            cp.stop()
        for app in self.apps.values():
            app.close()


def _eps(plane: Plane) -> dict[str, Any]:
    got: dict[str, Any] = plane.config()["endpoints"] or {}
    return got


def _addresses(plane: Plane, service: str) -> set[str]:
    return {e["address"] for e in _eps(plane).get("services", {}).get(service, [])}


def _counters(plane: Plane) -> dict[str, float]:
    m = plane.metrics()
    return {
        "acks": metric_value(m, "meshc_reloads_total", kind="endpoints", result="ack"),
        "nacks": metric_value(m, "meshc_reloads_total", kind="endpoints", result="nack"),
        "bytes": metric_value(m, "meshc_push_received_bytes_total", slot="endpoints"),
    }


def _inbound(plane: Plane) -> str:
    address: str = plane.config()["listening"]["inbound"]
    return address


def _get(plane: Plane, host: str) -> tuple[int, str]:
    assert plane.outbound is not None
    client = ProxyClient(plane.outbound)
    try:
        status, _, body = client.get(f"http://{host}/hello")
    finally:
        client.close()
    name = json.loads(body).get("name", "") if status == 200 else body.decode(errors="replace")
    return status, str(name)


def _reaches(plane: Plane, host: str, app: str) -> bool:
    """Whether a request through ``plane`` to ``host`` is answered by ``app`` (a few tries: the
    load balancer picks among the instances)."""
    return any(_get(plane, host) == (200, app) for _ in range(8))


def _fetch_on_demand(mesh: ScopeMesh, caller: Plane) -> None:
    """``caller`` does not reach beta by its policies: its first request fetches beta (the piece
    and the endpoints), which it then declares as fetched on demand."""
    assert "beta" not in _eps(caller)["services"]
    assert _get(caller, "beta") == (200, "beta-app")
    assert "beta" in _eps(caller)["services"] and caller.config()["endpoints_on_demand"] == ["beta"]
    wait_until(lambda: mesh.synced(caller), "caller SYNCED after the fetch")


@pytest.fixture(scope="module", params=DATAPLANES)
def local_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScopeMesh]:
    """One control plane with a state dir (its registry saved), beta with its app, caller."""
    work = tmp_path_factory.mktemp(f"scope-{request.param}")
    policies = work / "policies"
    _policies(policies)
    (work / "cp-state").mkdir()
    cp = ControlPlaneProc(policies, work)
    mesh = ScopeMesh(work, policies, [cp], TokenIssuer(cp.secrets), request.param)
    try:
        cp.start()
        beta, caller = mesh.start("beta", "beta", "beta-app"), mesh.start("caller", "caller")
        wait_until(lambda: mesh.synced(beta) and mesh.synced(caller), "beta and caller SYNCED")
        wait_until(lambda: _eps(caller).get("scoped"), "caller's scoped endpoint set")
        yield mesh
    finally:
        mesh.close()


def test_a_restarted_control_plane_keeps_pushing_what_a_sidecar_fetched_on_demand(
    local_mesh: ScopeMesh,
) -> None:
    mesh, cp = local_mesh, local_mesh.cps[0]
    caller = mesh.planes["caller"]
    _fetch_on_demand(mesh, caller)
    held = _eps(caller)
    before = _counters(caller)
    cp.stop()
    cp.start()
    wait_until(lambda: mesh.synced(caller), "caller SYNCED with the restarted control plane")
    # It runs what the restarted control plane wants (beta included): no push at all.
    assert _eps(caller) == held and _counters(caller) == before
    # A new instance of beta: pushed to caller (no request to beta made it ask), as a delta.
    beta2 = mesh.start("beta2", "beta", "beta-app-2")
    wait_until(lambda: _inbound(beta2) in _addresses(caller, "beta"), "caller to hold beta's new instance")
    wait_until(lambda: mesh.synced(caller), "caller SYNCED")
    after = _counters(caller)
    assert after["acks"] == before["acks"] + 1 and after["nacks"] == before["nacks"]
    assert 0 < after["bytes"] - before["bytes"] < 1000, after["bytes"] - before["bytes"]  # beta's list only
    assert _eps(caller)["scoped"] and set(_eps(caller)["services"]) == {"alpha", "beta"}
    wait_until(lambda: _reaches(caller, "beta", "beta-app-2"), "a request through caller to reach beta2")


def test_a_sidecar_restarted_from_its_state_dir_serves_its_scoped_set_then_converges(
    local_mesh: ScopeMesh,
) -> None:
    mesh, cp = local_mesh, local_mesh.cps[0]
    old = mesh.planes["caller"]
    held = _eps(old)
    assert held["scoped"] and {"alpha", "beta"} <= set(held["services"])
    cp.stop()  # nothing pushes while it restarts
    os.kill(old.pid(), signal.SIGKILL)
    old.proc.wait(HANG_DEADLINE)
    old.close()
    caller = mesh.start("caller", "caller")
    wait_until(lambda: caller.config()["ready"], "the restarted caller ready on its state dir")
    # Last known good, before any control plane answered: the same scoped set, served.
    assert _eps(caller) == held and not caller.config()["registered"]
    assert caller.config()["endpoints_on_demand"] == ["beta"]
    assert _get(caller, "beta")[0] == 200
    before = _counters(caller)
    cp.start()
    wait_until(lambda: mesh.synced(caller), "the restarted caller SYNCED")
    # The control plane rebuilt the set it runs (its heartbeat's digest): beta kept, no push.
    assert _eps(caller) == held and _counters(caller)["nacks"] == before["nacks"]
    # Then it converges by deltas: beta2 goes.
    mesh.planes.pop("beta2").terminate()
    wait_until(
        lambda: _addresses(caller, "beta") == {_inbound(mesh.planes["beta"])}, "beta2 gone from caller"
    )
    wait_until(lambda: mesh.synced(caller), "caller SYNCED")
    after = _counters(caller)
    assert after["nacks"] == before["nacks"] and 0 < after["bytes"] - before["bytes"] < 1000


def test_an_altered_endpoint_set_in_the_state_dir_is_refused_and_nothing_routes_to_it(
    local_mesh: ScopeMesh,
) -> None:
    mesh, cp = local_mesh, local_mesh.cps[0]
    old = mesh.planes["caller"]
    held = _eps(old)
    cp.stop()
    assert old.terminate() == 0
    old.close()
    state = mesh.work / "state-caller" / "state.json"
    doc = json.loads(state.read_text())
    trap = Upstream("trap")  # where the altered set points beta: nothing may reach it
    try:
        doc["endpoints"]["services"]["beta"] = [{"address": trap.address, "tags": {}, "healthy": True}]
        state.write_text(json.dumps(doc))  # its digest still names the set that was pushed
        caller = mesh.start("caller", "caller")
        wait_until(lambda: "refusing the stored endpoint set" in caller.stderr(), "the refusal logged")
        assert "altered" in caller.stderr()
        assert _eps(caller) == {}  # no endpoints rather than the altered ones
        assert caller.config()["bundles"]["mesh"]["digest"]  # the rest of its state is kept
        status, _ = _get(caller, "beta")
        assert status >= 500 and sum(trap.hits.values()) == 0
        cp.start()
        wait_until(lambda: mesh.synced(caller), "caller SYNCED after the refusal")
        assert _eps(caller)["digest"] == held["digest"] and _addresses(caller, "beta") == {
            _inbound(mesh.planes["beta"])
        }
        assert _get(caller, "beta") == (200, "beta-app") and sum(trap.hits.values()) == 0
    finally:
        trap.close()


# --- PostgreSQL: a restarted replica, a failover ------------------------------------------------


@pytest.fixture(scope="module", params=DATAPLANES)
def pg_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres: Any
) -> Iterator[ScopeMesh]:
    """Two replicas on one PostgreSQL database; beta (both replicas), ``pinned`` (a caller that
    knows r0 only, so it stays with r0 across r0's restart) and ``mover`` (a caller given both,
    that starts on r0)."""
    work = tmp_path_factory.mktemp(f"scope-pg-{request.param}")
    policies = work / "policies"
    _policies(policies)
    secrets = work / "secrets"
    secrets.mkdir()
    db = postgres.create_database()
    cps = []
    for i in range(2):
        (work / f"r{i}" / "cp-state").mkdir(parents=True)
        flags = ["--store", db, "--replica-id", f"r{i}", "--secrets-dir", str(secrets), "--lease", "2"]
        cps.append(ControlPlaneProc(policies, work / f"r{i}", extra=flags))
    mesh = ScopeMesh(work, policies, cps, TokenIssuer(secrets), request.param)
    try:
        for cp in cps:
            cp.start()
        wait_until(lambda: cps[0].api("/api/v1/release").get("bundles"), "a release on r0")
        beta = mesh.start("beta", "beta", "beta-app")
        pinned = mesh.start("pinned", "caller", cps=[0])
        mover = mesh.start("mover", "caller", cps=[0, 1])
        wait_until(lambda: all(mesh.synced(p) for p in (beta, pinned, mover)), "three sidecars SYNCED")
        wait_until(lambda: _eps(pinned).get("scoped") and _eps(mover).get("scoped"), "scoped sets")
        yield mesh
    finally:
        mesh.close()


def test_on_postgres_restarted_and_failed_over_sidecars_keep_their_scoped_deltas(pg_mesh: ScopeMesh) -> None:
    mesh = pg_mesh
    r0, r1 = mesh.cps
    pinned, mover = mesh.planes["pinned"], mesh.planes["mover"]
    assert pinned.config()["control_plane"] == mover.config()["control_plane"] == r0.url
    for plane in (pinned, mover):
        _fetch_on_demand(mesh, plane)
    before = {n: _counters(mesh.planes[n]) for n in ("pinned", "mover")}
    # r0 dies: mover re-registers with r1 at once (its set and what it fetched on demand in the
    # registration), pinned waits for r0, which comes back from the store.
    assert r0.proc is not None
    os.kill(r0.proc.pid, signal.SIGKILL)
    r0.proc.wait(HANG_DEADLINE)
    r0.proc = None
    wait_until(lambda: mover.config()["control_plane"] == r1.url and mesh.synced(mover), "mover SYNCED on r1")
    r0.start()
    wait_until(lambda: mesh.synced(pinned), "pinned SYNCED with the restarted r0")
    row = {r["instance"]: r for r in r0.api("/api/v1/status")["dataplanes"]}[pinned.config()["instance"]]
    assert row["endpoint_deltas"] and row["replica"] == "r0"  # restored from the store as it registered
    for name in ("pinned", "mover"):
        plane = mesh.planes[name]
        assert _eps(plane)["scoped"] and set(_eps(plane)["services"]) == {"alpha", "beta"}, name
        assert _counters(plane)["nacks"] == before[name]["nacks"], name
    # A new instance of beta (registered with either replica): each caller gets a delta of
    # beta's list, from its own replica, with no request to beta asking for it.
    mid = {n: _counters(mesh.planes[n]) for n in ("pinned", "mover")}
    beta2 = mesh.start("beta2", "beta", "beta-app-2")
    for name in ("pinned", "mover"):
        plane = mesh.planes[name]
        wait_until(lambda p=plane: _inbound(beta2) in _addresses(p, "beta"), f"{name} to hold beta2")
        wait_until(lambda p=plane: mesh.synced(p), f"{name} SYNCED")
        got = _counters(plane)
        assert got["nacks"] == mid[name]["nacks"], name  # never a delta over a set it lacks
        assert 0 < got["bytes"] - mid[name]["bytes"] < 1000 * (got["acks"] - mid[name]["acks"]), name
        assert _eps(plane)["scoped"] and set(_eps(plane)["services"]) == {"alpha", "beta"}, name
        wait_until(lambda p=plane: _reaches(p, "beta", "beta-app-2"), f"{name} to reach beta2")
