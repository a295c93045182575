"""The control plane in-process against fake data planes (real aiohttp admin servers on
127.0.0.1): what is pushed where and in which order, ACK/NACK bookkeeping, the work-tree watcher,
a failed compile, Offline after missed heartbeats, generations; and the CLI's exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cp_harness import REPO

from compiler.ca import TokenIssuer
from compiler.controlplane.generation import Generations
from compiler.controlplane.server import Config, ControlPlane
from compiler.demo import free_port
from runtime.protocol import HDR_BUNDLE_ROLE, HDR_DIGEST, HDR_GENERATION, Heartbeat, Registration

pytestmark = pytest.mark.timeout(180)


@dataclass
class FakePlane:
    """An admin API that records every push; ``nack_roles`` are refused, and the first
    ``not_yet`` pushes get 403 "not registered in this boot" (a push that overtook the answer)."""

    service: str
    tags: dict[str, str] = field(default_factory=dict)
    nack_roles: set[str] = field(default_factory=set)
    not_yet: int = 0
    pushes: list[tuple[str, str, int]] = field(default_factory=list)
    running: dict[str, str] = field(default_factory=dict)
    endpoints: dict[str, Any] | None = None
    port: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def bundle(request: web.Request) -> web.Response:
            body = await request.read()
            role = request.headers[HDR_BUNDLE_ROLE]
            gen = int(request.headers[HDR_GENERATION])
            digest = request.headers[HDR_DIGEST]
            assert hashlib.sha256(body).hexdigest() == digest
            self.pushes.append((role, digest, gen))
            if self._refuse_now():
                return web.json_response({"nack": "not registered in this boot yet"}, status=403)
            if role in self.nack_roles:
                return web.json_response({"nack": f"refusing the {role} bundle"}, status=400)
            self.running[role] = digest
            return web.json_response({"ack": digest})

        async def endpoints(request: web.Request) -> web.Response:
            doc = json.loads(await request.read())
            self.pushes.append(("endpoints", "", int(doc["generation"])))
            if self._refuse_now():
                return web.json_response({"nack": "not registered in this boot yet"}, status=403)
            self.endpoints = doc
            return web.json_response({"ack": "ok"})

        app = web.Application()
        app.router.add_put("/bundle", bundle)
        app.router.add_put("/endpoints", endpoints)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]

    def _refuse_now(self) -> bool:
        self.not_yet -= 1
        return self.not_yet >= 0

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def registration(self) -> Registration:
        return Registration(
            service=self.service,
            tags=self.tags,
            inbound_address=f"127.0.0.1:{free_port()}",
            admin_address=f"127.0.0.1:{self.port}",
        )


async def _until(cond: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _copy_policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(REPO / "policies", d)
    return d


async def _register(session: aiohttp.ClientSession, cp: str, fp: FakePlane, state_dir: Path) -> str:
    token = TokenIssuer(state_dir).mint("default", fp.service)  # the bootstrap token (DESIGN §6)
    async with session.post(
        f"{cp}/api/v1/register",
        data=fp.registration().model_dump_json(),
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        assert r.status == 200, await r.text()
        name: str = (await r.json())["instance"]
        return name


async def _heartbeat(
    session: aiohttp.ClientSession, cp: str, name: str, fp: FakePlane, state_dir: Path
) -> int:
    hb = Heartbeat(
        instance=name, running=fp.running, endpoints_generation=(fp.endpoints or {}).get("generation", 0)
    )
    token = TokenIssuer(state_dir).mint("default", fp.service)  # heartbeats are authenticated too
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{cp}/api/v1/heartbeat", data=hb.model_dump_json(), headers=headers) as r:
        return r.status


async def _rows(session: aiohttp.ClientSession, cp: str) -> dict[str, dict[str, Any]]:
    async with session.get(f"{cp}/api/v1/status") as r:
        return {x["instance"]: x for x in (await r.json())["dataplanes"]}


def test_a_push_refused_for_the_moment_is_retried_until_it_is_acked(tmp_path: Path) -> None:
    """A 403 (not registered in this boot yet) is not the content's fault: pushed again, with a
    new generation each time and backing off, until it ACKs; a 400 is not (the test below)."""
    policies = _copy_policies(tmp_path)

    async def main() -> None:
        cfg = Config(
            policy_dir=policies,
            out=tmp_path / "out",
            port=free_port(),
            state_dir=tmp_path / "state",
            heartbeat_interval_s=0.2,
            quiet=True,
            registration_auth=False,
        )
        assert cfg.state_dir is not None
        TokenIssuer(cfg.state_dir)
        cp_obj = ControlPlane(cfg)
        await cp_obj.start()
        cp = f"http://127.0.0.1:{cfg.port}"
        fp = FakePlane("magnanimo", not_yet=3)
        await fp.start()
        async with aiohttp.ClientSession(trust_env=False) as s:
            name = await _register(s, cp, fp, cfg.state_dir)

            async def synced() -> bool:
                await _heartbeat(s, cp, name, fp, cfg.state_dir)
                return (await _rows(s, cp))[name]["status"] == "SYNCED"

            try:
                await _until(synced, 60, "the refused data plane SYNCED")
            finally:
                await cp_obj.stop()
                await fp.stop()
        slots = [p[0] for p in fp.pushes]
        assert slots[:4] == ["endpoints"] * 4 and slots[4:] == ["mesh", "service"], slots
        gens = [p[2] for p in fp.pushes]
        assert gens == sorted(gens) and len(set(gens)) == len(gens)

    asyncio.run(main())


def test_push_order_only_changed_bundles_nack_watcher_and_offline(tmp_path: Path) -> None:
    policies = _copy_policies(tmp_path)

    async def main() -> None:
        cfg = Config(
            policy_dir=policies,
            out=tmp_path / "out",
            port=free_port(),
            state_dir=tmp_path / "state",
            heartbeat_interval_s=0.2,
            quiet=True,
            registration_auth=False,  # fake data planes; authentication is tests/security's
        )
        assert cfg.state_dir is not None
        TokenIssuer(cfg.state_dir)  # the token secret exists before the control plane starts
        cp_obj = ControlPlane(cfg)
        await cp_obj.start()
        cp = f"http://127.0.0.1:{cfg.port}"
        mag, ben, bad = FakePlane("magnanimo"), FakePlane("benigno", {"version": "v1"}), FakePlane("benigno")
        bad.nack_roles = {"mesh"}
        for fp in (mag, ben, bad):
            await fp.start()
        names: dict[str, str] = {}
        beating = True
        async with aiohttp.ClientSession(trust_env=False) as s:
            for key, fp in (("mag", mag), ("ben", ben), ("bad", bad)):
                names[key] = await _register(s, cp, fp, cfg.state_dir)

            async def beat() -> None:
                while beating:
                    for key, fp in (("mag", mag), ("ben", ben), ("bad", bad)):
                        await _heartbeat(s, cp, names[key], fp, cfg.state_dir)
                    await asyncio.sleep(0.1)

            beater = asyncio.ensure_future(beat())
            try:

                async def synced() -> bool:
                    rows = await _rows(s, cp)
                    return all(rows[names[k]]["status"] == "SYNCED" for k in ("mag", "ben"))

                await _until(synced, 30, "magnanimo and benigno SYNCED")
                # make-before-break: endpoints, then the mesh bundle, then the service bundle
                assert [p[0] for p in mag.pushes] == ["endpoints", "mesh", "service"]
                gens = [p[2] for p in mag.pushes]
                assert gens == sorted(gens) and len(set(gens)) == 3
                eps = mag.endpoints["services"] if mag.endpoints else {}
                assert sorted(eps) == ["benigno", "magnanimo"] and len(eps["benigno"]) == 2
                # the NACKed mesh bundle is recorded; the service bundle that depends on it waits
                rows = await _rows(s, cp)
                badrow = rows[names["bad"]]
                assert badrow["status"] == "STALE"
                assert badrow["slots"]["mesh"]["status"] == "STALE"
                assert "refusing the mesh bundle" in badrow["last_nack"]
                assert badrow["slots"]["service"]["status"] == "NOT SENT"
                assert [p[0] for p in bad.pushes] == ["endpoints", "mesh"]

                # a saved edit in the work tree: only magnanimo's bundle changes and is pushed
                n_mag, n_ben = len(mag.pushes), len(ben.pushes)
                route = policies / "traffic-route.yaml"
                old_release = cp_obj.releases.current.id if cp_obj.releases.current else None
                route.write_text(
                    route.read_text().replace("weight: 90", "weight: 70").replace("weight: 10", "weight: 30")
                )

                async def new_release() -> bool:
                    rel = cp_obj.releases.current  # read before the status: no stale SYNCED
                    if rel is None or rel.id == old_release:
                        return False
                    rows = await _rows(s, cp)
                    return bool(rows[names["mag"]]["status"] == "SYNCED")

                await _until(new_release, 30, "the edit to be compiled and pushed")
                assert [p[0] for p in mag.pushes[n_mag:]] == ["service"]
                assert len(ben.pushes) == n_ben
                ro = cp_obj.pusher.rollouts[-1]
                assert ro.changed == ("default/magnanimo",) and ro.completed_at is not None

                # a broken edit: diagnostics recorded, nothing pushed, release kept
                keep = cp_obj.releases.current.id if cp_obj.releases.current else None
                route.write_text(route.read_text().replace("split:", "splitt:"))

                async def failed() -> bool:
                    async with s.get(f"{cp}/api/v1/diagnostics") as r:
                        last = (await r.json())["last"]
                    return last is not None and not last["ok"]

                await _until(failed, 30, "the broken edit to be reported")
                async with s.get(f"{cp}/api/v1/diagnostics") as r:
                    diags = (await r.json())["last"]["diagnostics"]
                assert any(
                    d["file"].endswith("traffic-route.yaml") and d["severity"] == "error" for d in diags
                )
                assert cp_obj.releases.current is not None and cp_obj.releases.current.id == keep
                assert len(mag.pushes) == n_mag + 1

                # heartbeats stop: Offline, and its endpoint leaves the others' set
                beating = False
                await beater

                async def offline() -> bool:
                    rows = await _rows(s, cp)
                    return all(r["state"] == "Offline" for r in rows.values())

                await _until(offline, 30, "Offline after missed heartbeats")
                async with s.get(f"{cp}/metrics") as r:
                    text = await r.text()
                assert "meshc_controlplane_propagation_seconds_bucket" in text
                assert 'le="0.1"' in text and 'le="30.0"' in text
            finally:
                beating = False
                if not beater.done():
                    await beater
        await cp_obj.stop()
        for fp in (mag, ben, bad):
            await fp.stop()

    asyncio.run(main())


def test_generations_grow_across_restarts(tmp_path: Path) -> None:
    g = Generations(tmp_path)
    a = [g.next() for _ in range(100)]
    assert a == sorted(a) and len(set(a)) == 100
    assert Generations(tmp_path).next() > a[-1]
    assert Generations(None).next() > 0


def _meshc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_status_without_control_plane_exits_2() -> None:
    r = _meshc("status", "--control-plane", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the control plane" in r.stderr


def test_demo_port_in_use_exits_2() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _meshc("demo", "--gateway-port", str(port), "--cp-port", str(free_port()))
    assert r.returncode == 2
    assert f"127.0.0.1:{port} (gateway) is in use" in r.stderr and "--gateway-port" in r.stderr


def test_controlplane_port_in_use_and_non_loopback_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _meshc(
            "controlplane",
            str(REPO / "policies"),
            "--out",
            str(tmp_path / "o"),
            "--listen",
            f"127.0.0.1:{port}",
        )
    assert r.returncode == 2 and "cannot listen" in r.stderr
    r = _meshc("controlplane", str(REPO / "policies"), "--out", str(tmp_path / "o"), "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "--token" in r.stderr


def test_status_table_and_json(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compiler.cli",
            "controlplane",
            str(REPO / "policies"),
            "--out",
            str(tmp_path / "o"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            r = _meshc("status", "--control-plane", f"http://127.0.0.1:{port}", "--format", "json")
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stderr
            assert proc.poll() is None
            time.sleep(0.1)
        data = json.loads(r.stdout)
        assert data["dataplanes"] == [] and set(data["digests"]) >= {"default", "default/benigno"}
        r = _meshc("status", "--control-plane", f"http://127.0.0.1:{port}")
        assert r.returncode == 0 and "no data plane registered" in r.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def test_generations_are_never_issued_ahead_of_the_clock(tmp_path: Path) -> None:
    """A control plane restarted without its state relies on the clock alone: generations issued
    by an earlier run (with state) must not lie in its future, or its pushes look like replays."""
    Generations(tmp_path).next()
    reloaded = Generations(tmp_path).next()
    stateless = Generations(None).next()
    assert stateless > reloaded
