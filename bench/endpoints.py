"""Endpoint pushes when one instance joins (issue 11): not a test, a measurement.

A 1,000-service repo (``bench/compile.py``'s generator: each service routes to the next one);
a control plane follows it; 100 stub data planes (one process, 10 instances of each of 10
services; they register, heartbeat, apply and ACK every push as a sidecar does) register and
get SYNCED. Then one more instance of the second service registers (the first service's 10 data
planes route to it, the other 90 do not), and the bytes of every
endpoint push body the control plane sends until all are SYNCED again are taken from its own
count (``meshc_controlplane_push_bytes_total{slot="endpoints"}``), with the number of pushes.

Two modes in the same run: ``whole`` (the data planes register without ``endpoint_deltas``:
every one gets the mesh's whole set again, the baseline) and ``scoped`` (per-service sets: only
the data planes whose scope holds the service get a push, carrying that service only). A third,
``scoped_after_restart``, restarts the control plane (its saved registry) once the data planes
are SYNCED, and counts what the restarted one pushes until they are SYNCED again (nothing
changed: it rebuilds what each runs from its heartbeat) and then for the same join (deltas, as
before the restart: ``ratio_bytes_after_restart_over_scoped``, 1.0 when nothing is re-sent).

    .venv/bin/python bench/endpoints.py            # 1,000 services, 100 data planes
    .venv/bin/python bench/endpoints.py --quick    # 200 services, 20 data planes

Writes ``bench/results/endpoints.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "endpoints.json"


def _prop() -> Any:
    spec = importlib.util.spec_from_file_location("_propagation_bench", HERE / "propagation.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


P = _prop()


def _cp_endpoint_pushes(cp: str) -> tuple[float, float]:
    """(bytes, pushes) of endpoint pushes the control plane counted so far."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{cp}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = sum(
        float(m.group(1))
        for m in re.finditer(r'^meshc_controlplane_push_bytes_total\{slot="endpoints"\} (\S+)$', text, re.M)
    )
    pushes = sum(
        float(m.group(1))
        for m in re.finditer(
            r'^meshc_controlplane_pushes_total\{[^}]*slot="endpoints"[^}]*\} (\S+)$', text, re.M
        )
    )
    return total, pushes


def _stubs(work: Path, cp: str, n: int, services: list[str], deltas: bool, name: str) -> Any:
    p = P.Proc(
        name,
        [
            sys.executable,
            str(HERE / "propagation.py"),
            "--stubs",
            str(n),
            "--cp",
            cp,
            "--stub-services",
            ",".join(services),
            "--stub-work",
            str(work),
            "--stub-pieces",
            *(["--stub-endpoint-deltas"] if deltas else []),
        ],
        work / f"{name}.log",
        P._env(),
    )
    p.start()
    return p


def phase(
    n_services: int, n_dataplanes: int, work: Path, deltas: bool, restart: bool = False
) -> dict[str, Any]:
    gen = P._gen()
    repo = work / "repo"
    gen.generate(repo, n_services)
    port = P.free_port()
    cp = f"http://127.0.0.1:{port}"
    cpp = P._controlplane(work, repo, port)
    procs = [cpp]
    try:
        P._wait(lambda: P._get(f"{cp}/healthz")["release"] is not None, 600, "the first compile", procs)
        services = [gen.service_name(i) for i in range(max(1, n_dataplanes // 10))]
        procs.append(_stubs(work, cp, n_dataplanes, services, deltas, "stubs"))
        P._wait(lambda: P._synced(cp, n_dataplanes), 600, f"{n_dataplanes} stubs SYNCED", procs, poll=0.5)
        restarted: dict[str, Any] = {}
        if restart:
            time.sleep(1.0)  # not a synchronisation: the registry file's write-behind interval
            P._stop(procs[:1])
            procs[0] = P._controlplane(work, repo, port)
            P._wait(lambda: P._get(f"{cp}/healthz")["release"] is not None, 600, "the restart", procs)
            P._wait(lambda: P._synced(cp, n_dataplanes), 600, "SYNCED after the restart", procs, poll=0.5)
            time.sleep(2.0)  # late pushes are counted too
            rb, rp = _cp_endpoint_pushes(cp)
            restarted = {"restart_endpoint_bytes_pushed": int(rb), "restart_endpoint_pushes": int(rp)}
        time.sleep(2.0)  # not a synchronisation: a quiet moment before the count starts
        bytes0, pushes0 = _cp_endpoint_pushes(cp)
        t0 = time.monotonic()
        procs.append(_stubs(work, cp, 1, [services[1 % len(services)]], deltas, "joiner"))
        P._wait(lambda: P._synced(cp, n_dataplanes + 1), 600, "the new instance SYNCED", procs, poll=0.1)
        settle_s = time.monotonic() - t0
        time.sleep(2.0)  # late pushes (a window's end) are counted too
        bytes1, pushes1 = _cp_endpoint_pushes(cp)
    finally:
        P._stop(procs[1:])
        P._stop(procs[:1])
    return {
        "mode": "scoped per-service deltas" if deltas else "whole mesh set to every data plane",
        "services": n_services,
        "dataplanes": n_dataplanes,
        "endpoint_bytes_pushed": int(bytes1 - bytes0),
        "endpoint_pushes": int(pushes1 - pushes0),
        "join_to_all_synced_s": round(settle_s, 2),
        **restarted,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 services, 20 data planes")
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--dataplanes", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.services, args.dataplanes = 200, 20
    out: dict[str, Any] = {
        "benchmark": "endpoints",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    tmp = tempfile.mkdtemp(prefix="meshc-bench-eps-")
    try:
        modes = (("whole", False, False), ("scoped", True, False), ("scoped_after_restart", True, True))
        for key, deltas, restart in modes:
            work = Path(tmp) / key
            print(
                f"{key}: {args.services} services, {args.dataplanes} data planes, one instance joins",
                flush=True,
            )
            r = out[key] = phase(args.services, args.dataplanes, work, deltas, restart)
            print(f"  {r}", flush=True)
    except BaseException:
        print(f"bench failed; logs kept in {tmp}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    whole, scoped = out["whole"]["endpoint_bytes_pushed"], out["scoped"]["endpoint_bytes_pushed"]
    out["ratio_bytes_whole_over_scoped"] = round(whole / scoped, 1) if scoped else None
    again = out["scoped_after_restart"]["endpoint_bytes_pushed"]
    out["ratio_bytes_after_restart_over_scoped"] = round(again / scoped, 2) if scoped else None
    out["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    ratio = out["ratio_bytes_whole_over_scoped"]
    print(f"bytes pushed: whole {whole}, scoped {scoped} (x{ratio}), after a restart {again}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
