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


@pytest.mark.timeout(300)
def test_demo_after_ctrl_c_restarts_and_leaves_nothing(tmp_path: Path) -> None:
    """Two runs back to back on the same ports; after each Ctrl-C no process and no work dir."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env["TMPDIR"] = str(tmp)
    cp_port, gw_port = free_port(), free_port()
    argv = [sys.executable, "-m", "compiler.cli", "demo", str(REPO / "policies")]
    argv += ["--cp-port", str(cp_port), "--gateway-port", str(gw_port)]
    for run in range(2):
        log = tmp_path / f"demo-{run}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 180
            while "Ctrl-C stops everything" not in log.read_text(errors="replace"):
                assert p.poll() is None, f"demo run {run} exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"demo run {run} not ready:\n{log.read_text()}"
                time.sleep(0.2)
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
            p.send_signal(signal.SIGINT)
            assert p.wait(60) == 0, log.read_text()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        assert "all processes stopped" in log.read_text()
        assert not list(tmp.glob("meshc-demo-*")), "the temporary work dir (CA key, secrets) was left behind"
        left = _pids_mentioning(work.group(1), *(f"--port {port}" for port in ports))
        assert left == [], f"processes left after Ctrl-C: {left}"
