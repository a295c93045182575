"""A throw-away PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temp dir on a free port.

The Debian ``postgresql`` package provides the binaries (``scripts/ensure-system-deps.sh``
installs it when missing; the bin dir is found by globbing ``/usr/lib/postgresql/*/bin``).
``initdb`` refuses to run as root, so as root the cluster runs as ``nobody`` (via ``runuser``) in
a temp dir owned by it. Stopped by the postmaster's PID (SIGINT, PostgreSQL's fast shutdown).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from compiler.demo import free_port

__all__ = ["PostgresCluster", "pg_bin_dir", "unavailable_reason"]

_DEADLINE_S = 60.0


def pg_bin_dir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    found = [p for p in found if (Path(p) / "initdb").exists()]
    return Path(found[-1]) if found else None


def _run_as() -> str | None:
    """The user the cluster runs as: None when we are not root, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    return "nobody"


def unavailable_reason() -> str | None:
    if pg_bin_dir() is None:
        return (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; "
            "scripts/ensure-system-deps.sh installs the Debian postgresql package)"
        )
    user = _run_as()
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"running as root and there is no user {user!r} to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (util-linux)"
    return None


class PostgresCluster:
    def __init__(self) -> None:
        bin_dir = pg_bin_dir()
        assert bin_dir is not None, unavailable_reason()
        self.bin = bin_dir
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="meshc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._cmd("initdb", "-D", str(self.data), "-U", "meshc", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _cmd(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        out = subprocess.run(
            argv, cwd=self.root, capture_output=True, text=True, timeout=_DEADLINE_S, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    @property
    def url(self) -> str:
        return f"postgresql://meshc@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://meshc@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), waiting for the postmaster to exit."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + _DEADLINE_S
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> str:
        """A fresh database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
