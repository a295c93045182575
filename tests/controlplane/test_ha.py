"""High availability end to end: three control plane replicas on one PostgreSQL (the session's
throw-away cluster), the seed mesh's data planes each given every replica's URL, traffic through
the gateway while replicas and the database fail.

The tests run in order on one mesh and each leaves it whole (three replicas, a leader, every data
plane SYNCED): SIGKILL the leader, SIGSTOP it past its lease, restart PostgreSQL, kill the replica
a data plane talks to."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_harness import git, make_policy_repo
from ha_harness import HAMesh, Load, flip_route, generations, one_leader, pointer, synced_on, wait_synced

pytestmark = pytest.mark.timeout(900)

HEARTBEAT_S = 0.3
LEASE_S = 2.0
RETRY_S = LEASE_S / 3
SLACK_S = 3.0
OUTAGE_S = 3 * HEARTBEAT_S + 4 * HEARTBEAT_S + 2.0 + 2.0
"""For a busy 2-core host: process scheduling, not protocol time."""


@pytest.fixture(scope="module")
def ha_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_policy_repo(tmp_path_factory.mktemp("ha-gitops") / "repo")


@pytest.fixture(scope="module")
def ha_db(postgres: Any) -> str:
    url: str = postgres.create_database()
    return url


@pytest.fixture(scope="module")
def ha(ha_repo: Path, ha_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAMesh]:
    from compiler.demo import free_port

    m = HAMesh(
        policy_dir=ha_repo / "policies",
        work_dir=tmp_path_factory.mktemp("ha-mesh"),
        gateway_port=free_port(),
        store=ha_db,
        replicas=3,
        lease_s=LEASE_S,
        cp_args=(
            "--repo",
            str(ha_repo),
            "--ref",
            "main",
            "--poll-interval",
            "0.1",
            "--heartbeat-interval",
            str(HEARTBEAT_S),
        ),
    )
    try:
        m.start_all()
        m.wait_ready(timeout=180)
        yield m
    finally:
        m.stop_all()


def _rows(m: HAMesh, via: int | None = None) -> list[dict[str, Any]]:
    st = m.replica_api(via, "/api/v1/status") if via is not None else m.status()
    rows: list[dict[str, Any]] = st["dataplanes"]
    return rows


def test_three_replicas_one_leader_every_data_plane_spread_over_them(ha: HAMesh, ha_db: str) -> None:
    leader = one_leader(ha)
    view = ha.replica_api((leader + 1) % 3, "/api/v1/replicas")
    assert view["store"] == "postgres" and view["leader"] == f"r{leader}" and not view["leading"]
    ha.wait_until(
        lambda: sum(r["alive"] for r in ha.replica_api(0, "/api/v1/replicas")["replicas"]) == 3,
        30,
        "three replicas alive in the store",
    )
    rows = _rows(ha)
    assert len(rows) == 4 and len({r["replica"] for r in rows}) >= 2, rows
    release, token, holder = pointer(ha_db)
    assert holder == f"r{leader}" and release == ha.status()["release"] and token >= 1
    # meshc status names the store, the leader, every replica, and each data plane's replica
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "status", "--control-plane", ha.replica_url(0), "-o", "wide"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"store postgres, leader r{leader} (fencing token {token})" in out, out
    for i in range(3):
        assert f"replica r{i} {ha.replica_url(i)} " in out, out
    for r in rows:
        line = next(x for x in out.splitlines() if x.startswith(r["instance"]))
        assert line.rstrip().endswith(r["replica"]), line
    gui = ha.replica_api(1, "/api/v1/dashboard/fragments")["replicas"]
    assert f"<b>r{leader}</b>" in gui and "leader" in gui


def test_sigkill_the_leader_a_new_one_takes_over_and_a_later_commit_reaches_every_sidecar(
    ha: HAMesh, ha_repo: Path, ha_db: str
) -> None:
    old = one_leader(ha)
    _, old_token, _ = pointer(ha_db)
    load = Load(f"{ha.gateway_url}/route1/hw2")
    try:
        t0 = time.monotonic()
        ha.kill_replica(old)
        new = one_leader(ha)
        took = time.monotonic() - t0
        assert new != old
        # the lease ran out (at most LEASE_S after its last renewal), then the next round took it
        assert took <= LEASE_S + RETRY_S + SLACK_S, took
        sha = flip_route(ha_repo, (50, 50), "canary 50/50 after the failover")
        wait_synced(ha, sha, "every data plane SYNCED on the commit")
    finally:
        tally = load.stop()
    assert tally.failed == 0 and tally.other == 0 and tally.n > 0, tally
    _, token, holder = pointer(ha_db)
    assert holder == f"r{new}" and token > old_token
    ha.start_replica(old)
    ha.wait_until(lambda: old in ha.alive() and synced_on(ha, sha, via=old), 90, "the restarted replica")
    assert ha.leaders() == [new]  # the restarted one follows


def test_sigstop_the_leader_past_its_lease_its_writes_are_refused_after_sigcont(
    ha: HAMesh, ha_repo: Path, ha_db: str
) -> None:
    import signal

    old = one_leader(ha)
    _, old_token, _ = pointer(ha_db)
    before = generations(ha)
    ha.procs[f"controlplane-{old}"].signal(signal.SIGSTOP)
    try:
        others = [i for i in range(3) if i != old]
        ha.wait_until(lambda: len(ha.leaders(others)) == 1, 60, "another replica to lead")
        new = ha.leaders(others)[0]
        sha = flip_route(ha_repo, (90, 10), "back to 90/10 while the old leader is stopped")
        wait_synced(ha, sha, "every data plane SYNCED on the commit", via=new)
    finally:
        ha.procs[f"controlplane-{old}"].signal(signal.SIGCONT)
    ha.wait_until(lambda: old not in ha.leaders([old]) and old in ha.alive(), 30, "the old leader to follow")
    _, token, holder = pointer(ha_db)
    assert holder == f"r{new}" and token > old_token
    log = ha.procs[f"controlplane-{old}"].log.read_text(errors="replace")
    assert "no longer leads" in log
    wait_synced(ha, sha, "the old leader to adopt the new release", via=old)
    after = generations(ha)
    for port, gens in after.items():  # every slot only moved forward, by one writer at a time
        for slot, g in gens.items():
            assert g >= before[port].get(slot, 0), (port, slot, before[port], gens)
    assert pointer(ha_db)[1] == token  # the old leader published nothing after waking up


def test_postgres_restarted_sidecars_keep_serving_and_replicas_reconnect(
    ha: HAMesh, ha_repo: Path, postgres: Any
) -> None:
    one_leader(ha)
    load = Load(f"{ha.gateway_url}/route1/hw2")
    try:
        postgres.stop()
        ha.wait_until(
            lambda: all(not ha.replica_api(i, "/api/v1/replicas")["store_connected"] for i in ha.alive()),
            30,
            "every replica to notice the database is gone",
        )
        # the outage itself: longer than a peer's data plane may go unseen before it counts as
        # Offline, so a replica that aged peers by the clock would drop their endpoints here
        time.sleep(OUTAGE_S)
        postgres.start()
        ha.wait_until(
            lambda: all(ha.replica_api(i, "/api/v1/replicas")["store_connected"] for i in ha.alive()),
            60,
            "every replica to reconnect",
        )
        one_leader(ha)
        sha = flip_route(ha_repo, (50, 50), "a commit after the database restart")
        for i in ha.alive():
            ha.wait_until(lambda i=i: synced_on(ha, sha, via=i), 90, f"replica r{i} to converge")
    finally:
        tally = load.stop()
    assert tally.failed == 0 and tally.other == 0 and tally.n > 0, tally


def test_a_sidecar_whose_replica_dies_re_registers_with_another_within_a_heartbeat(ha: HAMesh) -> None:
    one_leader(ha)
    rows = _rows(ha)
    by_replica: dict[str, list[str]] = {}
    for r in rows:
        by_replica.setdefault(r["replica"], []).append(r["instance"])
    # the replica most data planes talk to (after the failovers above, maybe the leader: then the
    # data planes and the lead both move)
    victim = int(max(by_replica, key=lambda k: len(by_replica[k]))[1:])
    moved = set(by_replica[f"r{victim}"])
    killed_at = time.time()
    ha.kill_replica(victim)
    survivor = next(i for i in ha.alive())

    def re_registered() -> bool:
        try:
            now = {r["instance"]: r for r in _rows(ha, via=survivor)}
        except (OSError, ValueError):
            return False
        return all(
            i in now
            and now[i]["replica"] != f"r{victim}"
            and now[i]["registered_at"] > killed_at
            and now[i]["state"] == "Online"
            for i in moved
        )

    ha.wait_until(re_registered, 60, "the data planes of the dead replica to register with another")
    now = {r["instance"]: r for r in _rows(ha, via=survivor)}
    delays = [now[i]["registered_at"] - killed_at for i in moved]
    assert max(delays) <= HEARTBEAT_S + SLACK_S, delays  # one interval, plus a busy host
    head = git(Path(ha.policy_dir).parent, "rev-parse", "HEAD")
    wait_synced(ha, head, "every data plane SYNCED again", via=survivor)
    ha.start_replica(victim)
    ha.wait_until(lambda: victim in ha.alive() and synced_on(ha, head, via=victim), 90, "the replica back")
