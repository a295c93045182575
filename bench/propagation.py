"""Propagation benchmark (issue 5 item 8): not a test, a measurement.

Phase 1, propagation: a 1,000-service repo (``bench/compile.py``'s generator: per service a
Service, a TrafficRoute to the next service, a TrafficPermission, a Retry and a Timeout from any
source, one file per service); the control plane follows its work tree; **100 real sidecar
processes** (``meshc sidecar``, 10 instances of each of 10 services, with inbound, outbound and
admin listeners) register with it. Then one file is changed at a time and the time from the write
to the last ACK of every affected data plane is taken from the control plane's rollout record
(``/api/v1/rollouts``: wall-clock ``completed_at`` minus the bench's own write time). Two kinds of
one-file change alternate:

* ``route``: a TrafficRoute's weights: one service bundle changes, pushed to that service's 10
  sidecars;
* ``mesh``: a Timeout for any source: the mesh bundle (and the caller's service bundle) change,
  pushed to all 100 sidecars.

Phase 2, memory: a 10,000-service repo and 100 registered data planes; the control plane's RSS
once all are SYNCED. The data planes here are **stub admin servers sharing one process** (they
register, heartbeat, check each pushed bundle's digest and ACK), because 100 real sidecars each
parsing a ~7 MB mesh bundle would not fit 2 cores in reasonable time; the control plane does the
same work either way. Then two **real sidecars** join the same mesh, one scoped (delta pushes, the
default) and one with ``--full-mesh-bundle``, and their RSS is taken once both are SYNCED (issue 11
item 4: sidecar RSS at 10,000 services, target 60 MB).

    .venv/bin/python bench/propagation.py              # full run (several minutes)
    .venv/bin/python bench/propagation.py --quick      # 200 services, 20 sidecars, 6 changes
    .venv/bin/python bench/propagation.py --memory-only --out bench/results/sidecar_rss_10k.json
    .venv/bin/python bench/propagation.py --compare --dataplanes stub --skip-memory
        # each phase-1 mode twice in the same run: whole mesh bundles (``--full-mesh-bundle``,
        # the baseline, keys ``*_full``) and delta pushes with scoping (``runtime.pieces``)

Bytes pushed per change are the control plane's own count (``bytes`` of each rollout: every push
body sent for it, 422 re-sends included).

Writes ``bench/results/propagation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "propagation.json"
TARGET_P99_S = 1.0
"""Issue 11 item 4: p99 change -> all ACKs at 1,000 services (100 real sidecars)..."""
TARGET_P99_10K_S = 2.0
"""...and at 10,000 services (1,000 stub data planes)."""


def _target_p99(services: int) -> float:
    return TARGET_P99_10K_S if services >= 10_000 else TARGET_P99_S


sys.path.insert(0, str(ROOT))
from compiler.demo import Proc, free_port  # noqa: E402


def _gen() -> Any:
    spec = importlib.util.spec_from_file_location("_compile_bench", HERE / "compile.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _get(url: str, timeout: float = 10.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait(cond: Any, timeout: float, what: str, procs: list[Proc] = (), poll: float = 0.05) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (OSError, ValueError, KeyError):
            pass
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def _rss_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the figures held to targets), and RssAnon, RssFile and Pss: a
    process's own memory against the shared libraries' pages that every process on the host
    running the same files shares (Pss divides those among them)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = round(int(line.split()[1]) / 1024, 1)
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _token(work: Path, service: str) -> str:
    """A bootstrap token for ``service`` (DESIGN §6), from the control plane's state dir."""
    try:
        from compiler.ca import TokenIssuer
    except ImportError:  # pragma: no cover - before security landed
        return ""
    return TokenIssuer(work / "cp-state").mint("default", service)


HEARTBEAT_S = 1.0
"""The data planes' heartbeat interval (``--heartbeat-interval``)."""


def _controlplane(work: Path, repo: Path, port: int) -> Proc:
    work.mkdir(parents=True, exist_ok=True)
    _token(work, "-")  # create the token secret before the control plane starts
    p = Proc(
        "controlplane",
        [
            sys.executable,
            "-m",
            "compiler.cli",
            "controlplane",
            str(repo),
            "--out",
            str(work / "out"),
            "--listen",
            f"127.0.0.1:{port}",
            "--heartbeat-interval",
            str(HEARTBEAT_S),
            "--state-dir",
            str(work / "cp-state"),
        ],
        work / "controlplane.log",
        _env(),
    )
    p.start()
    return p


def _synced(cp: str, n: int) -> bool:
    rows = _get(f"{cp}/api/v1/status")["dataplanes"]
    return len(rows) >= n and sum(1 for r in rows if r["status"] == "SYNCED" and r["state"] == "Online") >= n


def _stop(procs: list[Proc]) -> None:
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        if not p.wait(max(0.1, deadline - time.monotonic())):
            p.signal(signal.SIGKILL)
            p.wait(5)


def _sidecar(work: Path, cp: str, service: str, k: int, tag: str, app_port: int, pieces: bool = True) -> Proc:
    """A real ``meshc sidecar`` process registered with ``cp`` (``pieces``: delta pushes, scoped)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    p = Proc(
        f"sidecar-{k}",
        [
            sys.executable,
            "-m",
            "compiler.cli",
            "sidecar",
            "--service",
            service,
            "--tag",
            tag,
            "--app",
            f"127.0.0.1:{app_port}",
            "--inbound",
            f"127.0.0.1:{free_port()}",
            "--outbound",
            f"127.0.0.1:{free_port()}",
            "--admin",
            f"127.0.0.1:{free_port()}",
            "--state-dir",
            str(work / "state" / str(k)),
            "--control-plane",
            cp,
            "--drain-seconds",
            "0.5",
            *([] if pieces else ["--full-mesh-bundle"]),
        ],
        work / "logs" / f"sidecar-{k}.log",
        {**_env(), "MESHC_TOKEN": _token(work, service)},
    )
    p.start()
    return p


# --- phase 1 -------------------------------------------------------------------------------------


def phase_propagation(
    n_services: int, n_sidecars: int, n_changes: int, work: Path, stub: bool = False, pieces: bool = True
) -> dict[str, Any]:
    gen = _gen()
    repo = work / "repo"
    gen.generate(repo, n_services)
    port = free_port()
    cp = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    cpp = _controlplane(work, repo, port)
    procs.append(cpp)
    try:
        t0 = time.monotonic()
        _wait(lambda: _get(f"{cp}/healthz")["release"] is not None, 600, "the first compile", procs)
        first_compile_s = time.monotonic() - t0
        n_svc = max(1, n_sidecars // 10)
        t1 = time.monotonic()
        if stub:
            p = Proc(
                "stubs",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--stubs",
                    str(n_sidecars),
                    "--cp",
                    cp,
                    "--stub-services",
                    ",".join(gen.service_name(i) for i in range(n_svc)),
                    "--stub-work",
                    str(work),
                    *(["--stub-pieces"] if pieces else []),
                ],
                work / "stubs.log",
                _env(),
            )
            p.start()
            procs.append(p)
        else:
            dead_app = free_port()  # nothing listens there: no traffic is sent in this benchmark
            for k in range(n_sidecars):
                name = gen.service_name(k % n_svc)
                procs.append(
                    _sidecar(work, cp, name, k, f"version=v{1 + k // n_svc % 2}", dead_app, pieces=pieces)
                )
        _wait(lambda: _synced(cp, n_sidecars), 900, f"{n_sidecars} sidecars SYNCED", procs, poll=0.5)
        converge_s = time.monotonic() - t1
        rss_1k = _rss_mib(cpp.pid or 0)
        sidecar_rss = sorted(_rss_mib(p.pid or 0)["VmRSS"] for p in procs[1:])
        sidecar_rss_summary = (
            {"min": sidecar_rss[0], "median": sidecar_rss[len(sidecar_rss) // 2], "max": sidecar_rss[-1]}
            if not stub
            else {"stub_process_total": sidecar_rss[0]}
        )

        samples: list[dict[str, Any]] = []
        for c in range(n_changes):
            kind = "route" if c % 2 == 0 else "mesh"
            i = (c // 2) % n_svc
            path = gen.service_path(repo, i)
            text = path.read_text()
            if kind == "route":
                w = 10 + (c * 7) % 80
                text = re.sub(
                    r"weight: \d+\n(\s+destination:\n\s+kuma.io/service: \S+\n\s+version: v1)",
                    f"weight: {w}\\n\\1",
                    text,
                    count=1,
                )
                text = re.sub(
                    r"weight: \d+\n(\s+destination:\n\s+kuma.io/service: \S+\n\s+version: v2)",
                    f"weight: {100 - w}\\n\\1",
                    text,
                    count=1,
                )
            else:
                text = re.sub(r"requestTimeout: \d+s", f"requestTimeout: {20 + c}s", text)
            before = _get(f"{cp}/api/v1/status")["release"]
            t_write = time.time()
            path.write_text(text)

            def done(before: str = before) -> bool:
                ros = _get(f"{cp}/api/v1/rollouts")["rollouts"]
                return bool(ros) and ros[0]["release"] != before and ros[0]["completed_at"] is not None

            _wait(done, 600, f"change {c} to reach every affected data plane", procs, poll=0.01)
            ro = _get(f"{cp}/api/v1/rollouts")["rollouts"][0]
            last = _get(f"{cp}/api/v1/diagnostics")["last"]
            samples.append(
                {
                    "kind": kind,
                    "file": path.name,
                    "written_at": round(t_write, 3),
                    "changed_bundles": ro["changed"],
                    "affected_acks": ro["targets"],
                    "acked": ro["acked"],
                    "nacked": ro["nacked"],
                    "change_to_all_acks_s": round(ro["completed_at"] - t_write, 4),
                    "bytes_pushed": ro.get("bytes"),
                    "detect_s": round(ro["seen_at"] - t_write, 4),
                    "compile_s": last["duration_s"],
                    "seen_to_all_acks_s": round(ro["completed_at"] - ro["seen_at"], 4),
                }
            )
            s = samples[-1]
            print(
                f"  change {c:2d} {kind:5s} {s['file']}: {s['affected_acks']:3d} ACKs "
                f"in {s['change_to_all_acks_s'] * 1000:7.1f} ms (detect {s['detect_s'] * 1000:.0f}, "
                f"compile {s['compile_s'] * 1000:.0f}), {s['bytes_pushed']} bytes",
                flush=True,
            )
        metrics = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{cp}/metrics").read()
        hist = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("meshc_controlplane_propagation_seconds_bucket")
        ]
        gc_pauses = _gc_pauses(metrics.decode())
        status = _get(f"{cp}/api/v1/status")
        all_synced = all(r["status"] == "SYNCED" for r in status["dataplanes"])
    finally:
        _stop(procs[1:])
        _stop(procs[:1])

    def summary(kind: str | None) -> dict[str, Any]:
        xs = [s for s in samples if kind is None or s["kind"] == kind]
        v = [s["change_to_all_acks_s"] for s in xs]
        return {
            "changes": len(xs),
            "p50_s": round(_pct(v, 0.5), 4),
            "p99_s": round(_pct(v, 0.99), 4),
            "max_s": round(max(v), 4) if v else None,
            "compile_p50_s": round(_pct([s["compile_s"] for s in xs], 0.5), 4),
            "push_p50_s": round(
                _pct([s["change_to_all_acks_s"] - s["detect_s"] - s["compile_s"] for s in xs], 0.5), 4
            ),
            "affected_acks": sorted({s["affected_acks"] for s in xs}),
            "bytes_pushed_p50": _pct([float(s["bytes_pushed"] or 0) for s in xs], 0.5),
            "bytes_pushed_max": max((s["bytes_pushed"] or 0 for s in xs), default=None),
        }

    return {
        "services": n_services,
        "sidecars": n_sidecars,
        "sidecar_kind": "stub admin servers sharing one process (digest check + ACK)"
        if stub
        else "real sidecar processes (meshc sidecar), one process each",
        "mesh_slot": "delta pushes, scoped (runtime.pieces)" if pieces else "whole mesh bundle",
        "first_compile_s": round(first_compile_s, 2),
        "sidecars_start_to_all_synced_s": round(converge_s, 2),
        "controlplane_rss_mib": rss_1k,
        "sidecar_rss_mib": sidecar_rss_summary,
        "all": summary(None),
        "route": summary("route"),
        "mesh": summary("mesh"),
        "all_synced_at_end": all_synced,
        "propagation_histogram": hist,
        "controlplane_gc_pauses": gc_pauses,
        "samples": samples,
    }


def _gc_pauses(text: str) -> dict[str, dict[str, float]]:
    """The control plane's cyclic GC passes over the whole run, per generation: how many, their
    total and how many took under 100 ms (``meshc_controlplane_gc_pause_seconds``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "meshc_controlplane_gc_pause_seconds":
            continue
        for sample in fam.samples:
            row = out.setdefault(sample.labels["generation"], {})
            if sample.name.endswith(("_count", "_sum")):
                row[sample.name.rsplit("_", 1)[1]] = round(sample.value, 4)
            elif sample.labels.get("le") == "0.1":
                row["under_100ms"] = sample.value
    return out


# --- phase 2 -------------------------------------------------------------------------------------


async def _stub_dataplanes(
    cp: str, n: int, services: list[str], work: Path, pieces: bool = False, endpoint_deltas: bool = False
) -> None:
    """n stub data planes: register, heartbeat, check digests and ACK every push (with
    ``pieces``: delta pushes, assembled and checked by ``runtime.pieces`` as a sidecar does; with
    ``endpoint_deltas``: per-service endpoint sets, applied by ``runtime.endpoints``)."""
    import aiohttp
    from aiohttp import web

    from runtime.bundle import BundleError
    from runtime.endpoints import EndpointsRefused, apply, running_digest
    from runtime.pieces import FORMATS, MeshSet, MissingPieces, assemble, split_lines
    from runtime.protocol import HDR_BUNDLE_ROLE, HDR_DIGEST, HDR_PIECES, EndpointSet, Heartbeat, Registration

    running: list[dict[str, str]] = [{} for _ in range(n)]
    sets: list[MeshSet | None] = [None] * n
    eps_gen = [0] * n
    eps_sets: list[EndpointSet | None] = [None] * n
    runners = []
    ports = []
    for k in range(n):

        async def bundle(request: web.Request, k: int = k) -> web.Response:
            body = await request.read()
            if request.headers.get(HDR_PIECES) == "1":
                lines = split_lines(body)
                digest = hashlib.sha256(lines[0]).hexdigest() if lines else ""
                if digest != request.headers.get(HDR_DIGEST):
                    return web.json_response({"nack": "digest mismatch"}, status=400)
                held = sets[k]
                try:
                    sets[k] = assemble(
                        lines[0],
                        lines[1:],
                        held.pieces if held else {},
                        tuple(held.held) if held else (),
                        held,
                    )
                except MissingPieces as e:
                    return web.json_response({"nack": str(e), "missing": list(e.digests)}, status=422)
                except BundleError as e:
                    return web.json_response({"nack": str(e)}, status=400)
                running[k]["mesh"] = digest
                return web.json_response({"ack": digest})
            digest = hashlib.sha256(body).hexdigest()
            if digest != request.headers.get(HDR_DIGEST):
                return web.json_response({"nack": "digest mismatch"}, status=400)
            running[k][request.headers.get(HDR_BUNDLE_ROLE, "service")] = digest
            return web.json_response({"ack": digest})

        async def endpoints(request: web.Request, k: int = k) -> web.Response:
            body = await request.read()
            try:
                whole, _ = apply(eps_sets[k], None, EndpointSet.model_validate_json(body))
            except EndpointsRefused as e:
                return web.json_response({"nack": str(e)}, status=e.status)
            eps_sets[k], eps_gen[k] = whole, whole.generation
            running[k]["endpoints"] = running_digest(whole)
            return web.json_response({"ack": hashlib.sha256(body).hexdigest()})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_put("/bundle", bundle)
        app.router.add_put("/endpoints", endpoints)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    async with aiohttp.ClientSession(trust_env=False) as s:
        # Each stub registers (16 at a time, as a fleet starting together would) and heartbeats
        # from its registration on, at the interval the control plane answers: registering all
        # before the first heartbeat made the first ones miss theirs (Offline) in large runs.
        gate = asyncio.Semaphore(16)

        async def stub(k: int) -> None:
            reg = Registration(
                service=services[k % len(services)],
                tags={"version": f"v{1 + k % 2}"},
                inbound_address=f"127.0.0.1:{free_port()}",
                admin_address=f"127.0.0.1:{ports[k]}",
                pieces=pieces,
                endpoint_deltas=endpoint_deltas,
                pieces_formats=list(FORMATS) if pieces else None,  # as a sidecar of this version
            )
            token = _token(work, reg.service)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            body = reg.model_dump_json()
            async with gate, s.post(f"{cp}/api/v1/register", data=body, headers=headers) as r:
                reply = await r.json()
                if r.status != 200:
                    raise SystemExit(f"registration refused: {reply}")
            name = reply["instance"]
            every = float(reply.get("heartbeat_interval_ms") or 1000) / 1000
            while True:
                await asyncio.sleep(every)
                hb = Heartbeat(instance=name, running=running[k], endpoints_generation=eps_gen[k])
                beat = hb.model_dump_json()
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.post(f"{cp}/api/v1/heartbeat", data=beat, headers=headers) as r:
                        await r.read()

        async def frozen() -> None:
            """1,000 sidecars are 1,000 processes, each collecting its own small heap; here they
            share one, whose full GC passes (up to 0.85 s, 17 in a 30-change run, timed with
            gc.callbacks) held every stub's ACKs at once, a pause no real fleet has. What lives
            is frozen every second (constant time), so passes walk only what is new."""
            while True:
                await asyncio.sleep(1.0)
                gc.freeze()

        await asyncio.gather(frozen(), *(stub(k) for k in range(n)))


def phase_memory(n_services: int, n_dataplanes: int, work: Path) -> dict[str, Any]:
    gen = _gen()
    repo = work / "repo"
    gen.generate(repo, n_services)
    port = free_port()
    cp = f"http://127.0.0.1:{port}"
    cpp = _controlplane(work, repo, port)
    procs = [cpp]
    try:
        t0 = time.monotonic()
        _wait(
            lambda: _get(f"{cp}/healthz")["release"] is not None, 1800, "the first compile", procs, poll=0.5
        )
        first_compile_s = time.monotonic() - t0
        rss_before = _rss_mib(cpp.pid or 0)
        services = [gen.service_name(i) for i in range(10)]
        stub = Proc(
            "stubs",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--stubs",
                str(n_dataplanes),
                "--cp",
                cp,
                "--stub-services",
                ",".join(services),
                "--stub-work",
                str(work),
            ],
            work / "stubs.log",
            _env(),
        )
        stub.start()
        procs.append(stub)
        t1 = time.monotonic()
        _wait(
            lambda: _synced(cp, n_dataplanes), 900, f"{n_dataplanes} stub data planes SYNCED", procs, poll=0.5
        )
        sync_s = time.monotonic() - t1
        rss_after = _rss_mib(cpp.pid or 0)
        # Real sidecars in the same mesh (issue 11 item 4: sidecar RSS at 10,000 services): one
        # scoped (delta pushes, the default) and one taking the whole mesh bundle, measured once
        # both are SYNCED and have handled their pushes.
        dead_app = free_port()
        sidecars = {
            "scoped": _sidecar(work, cp, services[0], 0, "version=v1", dead_app, pieces=True),
            "full_mesh_bundle": _sidecar(work, cp, services[1], 1, "version=v1", dead_app, pieces=False),
        }
        procs.extend(sidecars.values())
        t2 = time.monotonic()
        _wait(lambda: _synced(cp, n_dataplanes + 2), 900, "2 real sidecars SYNCED", procs, poll=0.5)
        sidecar_sync_s = time.monotonic() - t2
        time.sleep(2.0)  # not a synchronisation: let the heap settle after the last push
        sidecar_rss = {k: _rss_mib(p.pid or 0) for k, p in sidecars.items()}
        rel = _get(f"{cp}/api/v1/release")
        mesh_bundle = work / "out" / "bundles" / f"{rel['bundles']['default']}.json"
        mesh_bytes = mesh_bundle.stat().st_size if mesh_bundle.exists() else None
    finally:
        _stop(procs[1:])
        _stop(procs[:1])
    return {
        "services": n_services,
        "dataplanes": n_dataplanes,
        "dataplane_kind": "stub admin servers sharing one process (register, heartbeat, digest check, ACK)",
        "first_compile_s": round(first_compile_s, 2),
        "all_synced_s": round(sync_s, 2),
        "mesh_bundle_bytes": mesh_bytes,
        "controlplane_rss_mib_after_compile": rss_before,
        "controlplane_rss_mib_with_dataplanes": rss_after,
        "sidecar_synced_s": round(sidecar_sync_s, 2),
        "sidecar_rss_mib": sidecar_rss,
        "sidecar_target_rss_mib": 60,
        "sidecar_meets_target": sidecar_rss.get("scoped", {}).get("VmRSS", float("inf")) <= 60,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 services, 20 sidecars, 6 changes, 2,000 for RSS")
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--sidecars", type=int, default=100)
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--rss-services", type=int, default=10000)
    p.add_argument("--skip-memory", action="store_true", help="skip phase 2 (RSS with 10,000 services)")
    p.add_argument("--memory-only", action="store_true", help="phase 2 only (control plane and sidecar RSS)")
    p.add_argument(
        "--dataplanes",
        choices=("real", "stub", "both"),
        default="both",
        help="phase 1 with real sidecar processes, stub admin servers in one process, or both",
    )
    p.add_argument(
        "--stub-dataplanes", type=int, help="stub data planes in the stub mode (default: --sidecars)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=HEARTBEAT_S,
        help="seconds (default 1); 1,000 stubs in one process need more: a mesh change makes each "
        "assemble the 10,000-service catalog, and heartbeats queued behind that miss 3 intervals",
    )
    p.add_argument("--stubs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cp", help=argparse.SUPPRESS)
    p.add_argument("--stub-services", help=argparse.SUPPRESS)
    p.add_argument("--stub-work", help=argparse.SUPPRESS)
    p.add_argument("--stub-pieces", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stub-endpoint-deltas", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--compare",
        action="store_true",
        help="run each phase-1 mode with whole mesh bundles (baseline) and with delta pushes",
    )
    args = p.parse_args(argv)
    globals()["HEARTBEAT_S"] = args.heartbeat_interval  # read by _controlplane
    if args.stubs:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                _stub_dataplanes(
                    args.cp,
                    args.stubs,
                    args.stub_services.split(","),
                    Path(args.stub_work),
                    args.stub_pieces,
                    args.stub_endpoint_deltas,
                )
            )
        return 0

    def interrupted(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if args.quick:
        args.services, args.sidecars, args.changes, args.rss_services = 200, 20, 6, 2000
    out: dict[str, Any] = {
        "benchmark": "propagation",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "target": {"p99_change_to_all_acks_s": _target_p99(args.services)},
        "heartbeat_interval_s": HEARTBEAT_S,
    }
    tmp = tempfile.mkdtemp(prefix="meshc-bench-prop-")
    try:
        _phases(args, out, tmp)
    except BaseException:
        print(f"bench failed; logs kept in {tmp}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    out["verdict"] = {
        k: {
            "p99_s": out[k]["all"]["p99_s"],
            "meets_target": out[k]["all"]["p99_s"] <= _target_p99(args.services),
        }
        for k in ("propagation", "propagation_stub", "propagation_full", "propagation_stub_full")
        if k in out
    }
    for key in ("propagation", "propagation_stub"):
        base = out.get(f"{key}_full")
        if base is not None and key in out:
            new = out[key]
            out.setdefault("ratios", {})[key] = {
                kind: {
                    "p99_full_over_pieces": _ratio(base[kind]["p99_s"], new[kind]["p99_s"]),
                    "bytes_p50_full_over_pieces": _ratio(
                        base[kind]["bytes_pushed_p50"], new[kind]["bytes_pushed_p50"]
                    ),
                }
                for kind in ("route", "mesh", "all")
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _phases(args: argparse.Namespace, out: dict[str, Any], tmp: str) -> None:
    modes = ("real", "stub") if args.dataplanes == "both" else (args.dataplanes,)
    runs = [(m, p) for m in modes for p in ((False, True) if args.compare else (True,))]
    if args.memory_only:
        runs = []
    for mode, pieces in runs:
        key = ("propagation" if mode == "real" else "propagation_stub") + ("" if pieces else "_full")
        count = args.sidecars if mode == "real" else (args.stub_dataplanes or args.sidecars)
        print(
            f"phase 1 ({mode}, {'delta pushes' if pieces else 'whole mesh bundles'}): {args.services} "
            f"services, {count} "
            f"{'real sidecars' if mode == 'real' else 'stub data planes in one process'}, "
            f"{args.changes} one-file changes",
            flush=True,
        )
        pr = out[key] = phase_propagation(
            args.services, count, args.changes, Path(tmp) / key, stub=mode == "stub", pieces=pieces
        )
        for k in ("route", "mesh", "all"):
            s = pr[k]
            print(
                f"  {k:5s}: p50 {s['p50_s'] * 1000:.0f} ms, p99 {s['p99_s'] * 1000:.0f} ms "
                f"(compile p50 {s['compile_p50_s'] * 1000:.0f} ms, "
                f"push p50 {s['push_p50_s'] * 1000:.0f} ms; ACKs {s['affected_acks']}; "
                f"bytes p50 {s['bytes_pushed_p50']:.0f})",
                flush=True,
            )
        print(f"  control plane RSS {pr['controlplane_rss_mib']} MiB", flush=True)
    if not args.skip_memory:
        print(
            f"phase 2: control plane RSS with {args.rss_services} services and {args.sidecars} data planes",
            flush=True,
        )
        out["memory"] = phase_memory(args.rss_services, args.sidecars, Path(tmp) / "p2")
        print(f"  {out['memory']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
