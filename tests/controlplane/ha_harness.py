"""The seed mesh with several control plane replicas on one PostgreSQL (``meshc controlplane
--store postgres://...``): the demo's processes, each data plane given every replica's URL."""

from __future__ import annotations

import json
import re
import signal
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from cp_harness import Tally, commit_file, drive

from compiler.demo import DemoMesh, _http_get, free_port

__all__ = ["HAMesh", "Load", "flip_route", "generations", "one_leader", "pointer", "synced_on"]

ROUTE = "policies/traffic-route.yaml"


@dataclass
class HAMesh(DemoMesh):
    store: str = ""
    replicas: int = 3
    lease_s: float = 2.0
    replica_ports: list[int] = field(default_factory=list)
    _handed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.replica_ports = [free_port() for _ in range(self.replicas)]
        self.cp_port = self.replica_ports[0]

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[i]}"

    @property
    def cp_url(self) -> str:
        """Every replica, starting with the next one each time a data plane is started, so the
        data planes spread over the replicas."""
        n = len(self.replica_ports)
        first = self._handed % n
        self._handed += 1
        return ",".join(self.replica_url((first + k) % n) for k in range(n))

    def start_controlplane(self) -> Any:
        for i in range(len(self.replica_ports)):
            self.start_replica(i)
        return self.procs["controlplane-0"]

    def start_replica(self, i: int) -> Any:
        p = self._proc(
            f"controlplane-{i}",
            self._meshc(
                "controlplane",
                str(self.policy_dir),
                "--out",
                str(self.work_dir / f"out-r{i}"),
                "--state-dir",
                str(self.work_dir / f"state-r{i}"),
                "--secrets-dir",
                str(self.secrets_dir),
                "--listen",
                f"127.0.0.1:{self.replica_ports[i]}",
                "--store",
                self.store,
                "--replica-id",
                f"r{i}",
                "--lease",
                str(self.lease_s),
                *self.cp_args,
            ),
        )
        p.start()
        return p

    def alive(self) -> list[int]:
        return [
            i
            for i in range(len(self.replica_ports))
            if self.procs.get(f"controlplane-{i}") is not None and self.procs[f"controlplane-{i}"].alive()
        ]

    def replica_api(self, i: int, path: str, timeout: float = 2.0) -> dict[str, Any]:
        code, body = _http_get(f"{self.replica_url(i)}{path}", timeout=timeout)
        if code != 200:
            raise OSError(f"{path} answered {code}")
        data: dict[str, Any] = json.loads(body)
        return data

    def api(self, path: str) -> dict[str, Any]:
        err: Exception = OSError("no replica alive")
        for i in self.alive():
            try:
                return self.replica_api(i, path)
            except (OSError, ValueError) as e:
                err = e
        raise OSError(str(err))

    def status(self) -> dict[str, Any]:
        return self.api("/api/v1/status")

    def leaders(self, among: list[int] | None = None) -> list[int]:
        """The replicas that say they lead (of those that answer)."""
        out = []
        for i in self.alive() if among is None else among:
            try:
                if self.replica_api(i, "/api/v1/replicas", timeout=1.0)["leading"]:
                    out.append(i)
            except (OSError, ValueError):
                continue
        return out

    def kill_replica(self, i: int) -> None:
        name = f"controlplane-{i}"
        self.procs[name].signal(signal.SIGKILL)
        self.procs[name].wait(10.0)
        self.forget(name)

    def stop_all(self, timeout: float = 5.0) -> None:
        for p in self.procs.values():  # SIGSTOPped replicas must be able to stop
            p.signal(signal.SIGCONT)
        cps = [n for n in self.procs if n.startswith("controlplane")]
        for n in cps:
            self.procs[f"_{n}"] = self.procs.pop(n)
        super().stop_all(timeout)  # data planes, apps (renamed replicas are not in its waves)
        for n in [k for k in self.procs if k.startswith("_controlplane")]:
            self.procs[n].stop(timeout)


def synced_on(m: HAMesh, commit: str, via: int | None = None) -> bool:
    """Whether the replica (any when ``via`` is None) shows all four data planes Online and SYNCED
    on the release of ``commit``."""
    try:
        st = m.replica_api(via, "/api/v1/status") if via is not None else m.status()
    except (OSError, ValueError):
        return False
    rows = st["dataplanes"]
    return (
        st["commit"] == commit
        and len(rows) == 4
        and all(r["state"] == "Online" and r["status"] == "SYNCED" for r in rows)
    )


def one_leader(m: HAMesh) -> int:
    """Wait until exactly one live replica says it leads; its index."""
    got: list[int] = []

    def one() -> bool:
        got[:] = m.leaders()
        return len(got) == 1

    m.wait_until(one, 60, "exactly one replica to lead")
    return got[0]


def pointer(db: str) -> tuple[str, int, str]:
    """The store's release pointer: (release id, fencing token, holder)."""
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT release_id, fencing_token, holder FROM release_pointer").fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), str(row[2])


def generations(m: HAMesh) -> dict[str, dict[str, int]]:
    """Per data plane admin port, the generation of each slot it runs (its /config)."""
    out = {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    admins = [i.admin for i in m.instances.values()] + [m.gateway_admin]
    for port in admins:
        with opener.open(f"http://127.0.0.1:{port}/config", timeout=5) as r:
            cfg = json.loads(r.read())
        gens = {role: int(b["generation"]) for role, b in cfg["bundles"].items()}
        if cfg.get("endpoints"):
            gens["endpoints"] = int(cfg["endpoints"]["generation"])
        out[str(port)] = gens
    return out


class Load:
    """Requests through the gateway in a thread until stopped: every one must succeed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tally = Tally()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = drive(self.url, 50, concurrency=4)
            for k in ("v1", "v2", "failed", "other"):
                setattr(self.tally, k, getattr(self.tally, k) + getattr(t, k))

    def stop(self) -> Tally:
        self._stop.set()
        self._thread.join(60)
        return self.tally


def flip_route(repo: Path, to: tuple[int, int], msg: str) -> str:
    """Commit the TrafficRoute's two weights as ``to``; the commit's sha."""
    text = (repo / ROUTE).read_text()
    weights = re.findall(r"weight: (\d+)", text)
    assert len(weights) == 2
    text = text.replace(f"weight: {weights[0]}", f"weight: {to[0]}", 1)
    text = text.replace(f"weight: {weights[1]}\n", f"weight: {to[1]}\n", 1)
    return commit_file(repo, ROUTE, text, msg)


def wait_synced(m: HAMesh, commit: str, what: str, via: int | None = None, timeout: float = 90) -> None:
    """``synced_on`` within ``timeout``; on a hang, what the replica shows (the failure's why)."""
    try:
        m.wait_until(lambda: synced_on(m, commit, via), timeout, what)
    except TimeoutError as e:
        try:
            st = m.replica_api(via, "/api/v1/status") if via is not None else m.status()
            brief = [
                (
                    r["instance"],
                    r["replica"],
                    r["state"],
                    r["status"],
                    {k: v["status"] for k, v in r["slots"].items()},
                )
                for r in st["dataplanes"]
            ]
            seen = {
                "commit": st["commit"],
                "want": commit,
                "via": via,
                "rows": brief,
                "cp": st["controlplane"],
            }
        except (OSError, ValueError) as e2:
            seen = {"error": str(e2)}
        raise TimeoutError(f"{e}: {json.dumps(seen)}") from None
