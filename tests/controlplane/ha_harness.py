"""The seed mesh with several control plane replicas on one PostgreSQL (``meshc controlplane
--store postgres://...``): the demo's processes, each data plane given every replica's URL."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from typing import Any

from compiler.demo import DemoMesh, _http_get, free_port

__all__ = ["HAMesh"]


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
