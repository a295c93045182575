"""High-availability benchmark (issue 14): not a test, a measurement, bounded to a few minutes.

Three control plane replicas on one throw-away PostgreSQL (initdb + pg_ctl in a temp dir, as the
tests do), the seed mesh (magnanimo, benigno v1 and v2, the gateway) with every data plane given
the three URLs, and constant load through the gateway the whole time. Rounds of:

* **baseline**: a policy commit with every replica up: commit -> every data plane SYNCED on it;
* **SIGKILL the leader**: the time until another replica leads (against the lease), then a commit
  -> every data plane SYNCED (against the baseline of the same run), then the replica restarted;
* **a data plane's replica dies**: per data plane, its new registration's time minus the kill
  (against the heartbeat interval);
* **SIGSTOP the leader** past its lease, SIGCONT: the takeover time, and that the release pointer's
  fencing token is the new leader's;
* **PostgreSQL restarted**: the time until every replica is connected again, then a commit ->
  SYNCED.

Every request through the gateway is counted: the figure is how many failed (the target is 0).

    .venv/bin/python bench/ha.py            # 3 rounds
    .venv/bin/python bench/ha.py --quick    # 1 round

Writes ``bench/results/ha.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "ha.json"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))

from cp_harness import make_policy_repo  # noqa: E402
from ha_harness import HAMesh, Load, flip_route, one_leader, pointer, synced_on  # noqa: E402
from pg_cluster import PostgresCluster, unavailable_reason  # noqa: E402

from compiler.demo import free_port  # noqa: E402

HEARTBEAT_S = 0.5
LEASE_S = 3.0


def _poll(cond: Any, timeout: float = 120.0, step: float = 0.02) -> float:
    """Seconds until ``cond()``; raises on a hang."""
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except (OSError, ValueError, KeyError):
            pass  # a replica not listening yet
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the mesh did not converge")
        time.sleep(step)


def _commit_to_synced(m: HAMesh, repo: Path, weights: tuple[int, int], msg: str) -> float:
    t0 = time.monotonic()
    sha = flip_route(repo, weights, msg)
    _poll(lambda: synced_on(m, sha))
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/ha.py: {reason}", file=sys.stderr)
        return 2
    pg = PostgresCluster()
    work = Path(tempfile.mkdtemp(prefix="meshc-ha-bench-"))
    m: HAMesh | None = None
    flips = [(50, 50), (90, 10)]
    out: dict[str, Any] = {"rounds": []}
    try:
        pg.start()
        db = pg.create_database()
        repo = make_policy_repo(work / "repo")
        m = HAMesh(
            policy_dir=repo / "policies",
            work_dir=work / "mesh",
            gateway_port=free_port(),
            store=db,
            replicas=3,
            lease_s=LEASE_S,
            cp_args=(
                "--repo",
                str(repo),
                "--ref",
                "main",
                "--poll-interval",
                "0.1",
                "--heartbeat-interval",
                str(HEARTBEAT_S),
            ),
        )
        m.start_all()
        m.wait_ready(timeout=180)
        load = Load(f"{m.gateway_url}/route1/hw2")
        k = 0

        def failed() -> int:
            return load.tally.failed + load.tally.other

        for r in range(rounds):
            row: dict[str, Any] = {}
            f0 = failed()
            row["baseline_commit_to_synced_s"] = _commit_to_synced(m, repo, flips[k % 2], f"baseline {r}")
            k += 1
            # SIGKILL the leader
            old = one_leader(m)
            m.kill_replica(old)
            row["sigkill_takeover_s"] = _poll(lambda: len(m.leaders()) == 1)
            row["after_failover_commit_to_synced_s"] = _commit_to_synced(
                m, repo, flips[k % 2], f"after kill {r}"
            )
            k += 1
            m.start_replica(old)
            _poll(lambda old=old: len(m.replica_api(old, "/api/v1/status")["dataplanes"]) == 4)
            row["failed_requests_sigkill"], f0 = failed() - f0, failed()
            # a data plane's replica dies
            one_leader(m)
            rows = m.status()["dataplanes"]
            counts: dict[str, int] = {}
            for x in rows:
                counts[x["replica"]] = counts.get(x["replica"], 0) + 1
            busiest = max(counts, key=lambda k: counts[k])  # maybe the leader: then the lead moves too
            victim = int(busiest[1:])
            moved = {x["instance"] for x in rows if x["replica"] == busiest}
            killed_at = time.time()
            m.kill_replica(victim)
            survivor = m.alive()[0]

            def done(moved: set[str] = moved, survivor: int = survivor, killed_at: float = killed_at) -> bool:
                now = {x["instance"]: x for x in m.replica_api(survivor, "/api/v1/status")["dataplanes"]}
                return all(i in now and now[i]["registered_at"] > killed_at for i in moved)

            _poll(done)
            now = {x["instance"]: x for x in m.replica_api(survivor, "/api/v1/status")["dataplanes"]}
            row["reregister_s"] = sorted(round(now[i]["registered_at"] - killed_at, 3) for i in moved)
            m.start_replica(victim)
            _poll(lambda victim=victim: len(m.replica_api(victim, "/api/v1/status")["dataplanes"]) == 4)
            row["failed_requests_replica_loss"], f0 = failed() - f0, failed()
            # SIGSTOP the leader past its lease
            old = one_leader(m)
            _, old_token, _ = pointer(db)
            m.procs[f"controlplane-{old}"].signal(signal.SIGSTOP)
            others = [i for i in range(3) if i != old]
            row["sigstop_takeover_s"] = _poll(lambda others=others: len(m.leaders(others)) == 1)
            new = m.leaders(others)[0]
            row["during_stop_commit_to_synced_s"] = _commit_to_synced(m, repo, flips[k % 2], f"stopped {r}")
            k += 1
            m.procs[f"controlplane-{old}"].signal(signal.SIGCONT)
            _poll(lambda old=old: not m.leaders([old]))
            _, token, holder = pointer(db)
            row["fenced"] = holder == f"r{new}" and token > old_token
            row["failed_requests_sigstop"], f0 = failed() - f0, failed()
            # PostgreSQL restarted
            t0 = time.monotonic()
            pg.restart()
            row["pg_restart_s"] = round(time.monotonic() - t0, 3)
            row["replicas_reconnected_s"] = _poll(
                lambda: all(m.replica_api(i, "/api/v1/replicas")["store_connected"] for i in m.alive())
            )
            one_leader(m)
            row["after_pg_restart_commit_to_synced_s"] = _commit_to_synced(m, repo, flips[k % 2], f"pg {r}")
            k += 1
            row["failed_requests_pg_restart"] = failed() - f0
            out["rounds"].append(row)
            print(json.dumps(row), flush=True)
        tally = load.stop()
        rs = out["rounds"]
        base = statistics.median(x["baseline_commit_to_synced_s"] for x in rs)
        reg = [v for x in rs for v in x.get("reregister_s", [])]
        out["summary"] = {
            "requests": tally.n + tally.failed + tally.other,
            "failed": tally.failed + tally.other,
            "lease_s": LEASE_S,
            "heartbeat_s": HEARTBEAT_S,
            "sigkill_takeover_over_lease": round(max(x["sigkill_takeover_s"] for x in rs) / LEASE_S, 3),
            "sigstop_takeover_over_lease": round(max(x["sigstop_takeover_s"] for x in rs) / LEASE_S, 3),
            "after_failover_propagation_over_baseline": round(
                statistics.median(x["after_failover_commit_to_synced_s"] for x in rs) / base, 3
            ),
            "reregister_max_over_heartbeat": round(max(reg) / HEARTBEAT_S, 3) if reg else None,
            "all_fenced": all(x["fenced"] for x in rs),
        }
        out["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
        print(json.dumps(out["summary"], indent=1))
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {RESULTS}")
        return 0
    finally:
        if m is not None:
            m.stop_all()
        pg.close()


if __name__ == "__main__":
    sys.exit(main())
