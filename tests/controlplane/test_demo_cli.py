"""``meshc demo`` as a user runs it: a restart right after Ctrl-C, nothing left behind.

The port check must bind the way the real listeners do (``SO_REUSEADDR``), so a previous run's
connections in TIME_WAIT do not make it refuse a free port; the temporary work dir (it holds the
CA key and the token secret) goes when the demo stops; every process it started is gone.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cp_harness import REPO

from compiler.demo import PortInUse, check_port, free_port


def _time_wait_port() -> int:
    """A port with no listener but a connection in TIME_WAIT on it (the server closed first)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port: int = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = srv.accept()
    conn.close()  # the active close: this side's socket (local port = `port`) enters TIME_WAIT
    cli.recv(1)  # EOF: the client saw the FIN ...
    cli.close()  # ... and its FIN is acknowledged by the TIME_WAIT side
    srv.close()
    return port


def test_port_check_binds_like_the_real_listener() -> None:
    port = _time_wait_port()
    # The precondition that made the old check fail: a plain bind is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OSError) as e:
        s.bind(("127.0.0.1", port))
    assert e.value.errno == errno.EADDRINUSE
    check_port(port, "control plane", "--cp-port")  # no PortInUse: nothing listens


def test_port_check_refuses_a_listener() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=r"--cp-port"):
            check_port(port, "control plane", "--cp-port")


def _pids_mentioning(*needles: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(int(entry.name))
    return found


def _demo_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env["TMPDIR"] = str(tmp)
    return env


def _wait_ready(p: subprocess.Popen[bytes], log: Path, what: str) -> float:
    """Poll the demo's log for its banner; returns the deadline (3 minutes) for what follows."""
    deadline = time.monotonic() + 180
    while "Ctrl-C stops everything" not in log.read_text(errors="replace"):
        assert p.poll() is None, f"{what} exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what} not ready:\n{log.read_text()}"
        time.sleep(0.2)
    return deadline


def _stop(p: subprocess.Popen[bytes], log: Path, sig: signal.Signals = signal.SIGINT) -> None:
    """Ctrl-C (or SIGTERM, as a service manager stops it): a clean exit 0 (killed only if it
    hangs, and then it fails)."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            code = p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            raise
        assert code == 0, log.read_text()


@pytest.mark.timeout(300)
def test_demo_after_ctrl_c_restarts_and_leaves_nothing(tmp_path: Path) -> None:
    """Two runs back to back on the same ports, the first stopped by Ctrl-C, the second by
    SIGTERM; after each, no process and no work dir."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = _demo_env(tmp)
    cp_port, gw_port = free_port(), free_port()
    argv = [sys.executable, "-m", "compiler.cli", "demo", str(REPO / "policies")]
    argv += ["--cp-port", str(cp_port), "--gateway-port", str(gw_port)]
    for run in range(2):
        log = tmp_path / f"demo-{run}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            _wait_ready(p, log, f"demo run {run}")
            text = log.read_text()
            work = re.search(r"starting in (\S+)", text)
            assert work is not None and work.group(1).startswith(str(tmp)), text
            # the banner names a meshc the user can run, and no macOS-only `open`
            cmd = re.search(r"^\s+(\S+) status --control-plane", text, re.M)
            assert cmd is not None, text
            assert cmd.group(1) == "meshc" or (REPO / cmd.group(1)).exists()
            assert "  open " not in text
            ports = re.findall(r"app 127\.0\.0\.1:(\d+)", text)
            assert len(ports) == 3, text
        finally:
            _stop(p, log, signal.SIGINT if run == 0 else signal.SIGTERM)
        assert "all processes stopped" in log.read_text()
        assert not list(tmp.glob("meshc-demo-*")), "the temporary work dir (CA key, secrets) was left behind"
        left = _pids_mentioning(work.group(1), *(f"--port {port}" for port in ports))
        assert left == [], f"processes left after Ctrl-C: {left}"


def test_the_targetref_flag_picks_the_twin_which_compiles_to_the_seeds_bundles() -> None:
    from compiler.cli import _parser
    from compiler.demo import TARGETREF_DIR, demo_policy_dir
    from compiler.pipeline import compile_dir

    args = _parser().parse_args(["demo", "--targetref"])
    assert demo_policy_dir(args) == TARGETREF_DIR == Path("docs/examples/targetref")
    assert demo_policy_dir(_parser().parse_args(["demo"])) == Path("policies")
    twin, seed = compile_dir(REPO / TARGETREF_DIR), compile_dir(REPO / "policies")
    assert twin.digests and twin.digests == seed.digests
    kinds = {x["kind"] for p in twin.release["provenance"].values() for x in p}
    assert "MeshHTTPRoute" in kinds and "TrafficRoute" not in kinds  # the twin, not the seed


def test_a_dir_and_the_targetref_flag_together_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "demo", "policies", "--targetref"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "give DIR or --targetref, not both" in proc.stderr


def _start_demo(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], Path, int, int]:
    """``meshc demo FLAGS`` on free ports, its output in ``demo.log``: (process, log, cp, gateway)."""
    cp_port, gw_port = free_port(), free_port()
    argv = [sys.executable, "-m", "compiler.cli", "demo", *flags]
    argv += ["--cp-port", str(cp_port), "--gateway-port", str(gw_port)]
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_demo_env(tmp_path), cwd=REPO)
    return p, log, cp_port, gw_port


@pytest.mark.timeout(300)
def test_demo_targetref_serves_the_canary_through_the_gateway(tmp_path: Path) -> None:
    """The real demo on the twin: the gateway answers through MeshHTTPRoute-compiled bundles."""
    import urllib.request

    p, log, _, gw_port = _start_demo(tmp_path, "--targetref")
    try:
        deadline = _wait_ready(p, log, "demo --targetref")
        assert "docs/examples/targetref/traffic-route.yaml" in log.read_text()
        body = ""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy
        while "Benigno" not in body:
            assert time.monotonic() < deadline, f"no answer through the gateway: {body!r}\n{log.read_text()}"
            try:
                with opener.open(f"http://127.0.0.1:{gw_port}/route1/hw2", timeout=10) as r:
                    body = r.read().decode()
            except OSError as e:
                body = str(e)
                time.sleep(0.2)
        assert "Hello World, Benigno" in body
    finally:
        _stop(p, log)


@pytest.mark.timeout(300)
def test_demo_canary_steps_benigno_v2_on_its_own_traffic(tmp_path: Path) -> None:
    """``meshc demo --canary``: the Canary of docs/examples/canary steps to 20% and its analysis
    runs on the demo's own light traffic; the user's policies/ is not changed."""
    import json
    import urllib.request

    before = {p.name: p.read_bytes() for p in (REPO / "policies").iterdir()}
    p, log, cp_port, _ = _start_demo(tmp_path, "--canary")
    try:
        deadline = _wait_ready(p, log, "demo --canary")
        assert "canary promote default/benigno-v2" in log.read_text()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        c: dict[str, object] = {}
        # the demo's own traffic reaches the canary and analysis judges it: a run with at least
        # minRequests requests (its verdict depends on this machine's latency, so any verdict)
        run: dict[str, object] = {}
        while int(str(run.get("requests", 0))) < 5:
            assert p.poll() is None and time.monotonic() < deadline, f"no run: {c}\n{log.read_text()}"
            with opener.open(f"http://127.0.0.1:{cp_port}/api/v1/canaries", timeout=10) as r:
                c = json.loads(r.read())["canaries"][0]
            run = c.get("last_run") or {}  # type: ignore[assignment]
            time.sleep(0.2)
        assert c["key"] == "default/benigno-v2" and run["weight"] == 20, c
        assert run["result"] in ("succeeded", "failed"), run  # enough traffic: never inconclusive
    finally:
        _stop(p, log)
    assert {p.name: p.read_bytes() for p in (REPO / "policies").iterdir()} == before
