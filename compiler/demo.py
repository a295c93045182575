"""``meshc demo``: the seed scenario as plain processes on 127.0.0.1.

``DemoMesh`` starts and stops the pieces, each as its own process in its own process group (so a
stop reaches its children too, and a terminal's Ctrl-C reaches only this process, which then stops
everything in order): the control plane on the policy directory, the stand-in apps
(``compiler.demo_apps``: magnanimo, benigno v1 and the v2 canary, each on a free port), a sidecar
beside each app, and the ingress gateway. The end-to-end tests drive the same class. Children also
get SIGTERM if this process dies without cleaning up (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "APPS",
    "TARGETREF_DIR",
    "AppSpec",
    "DemoMesh",
    "PortInUse",
    "demo_policy_dir",
    "free_port",
    "run_demo",
]

EXIT_OK, EXIT_ERROR = 0, 2


@dataclass(frozen=True)
class AppSpec:
    name: str
    service: str
    tags: dict[str, str]
    argv: tuple[str, ...]


APPS = (
    AppSpec("magnanimo", "magnanimo", {}, ("magnanimo",)),
    AppSpec("benigno-v1", "benigno", {"version": "v1"}, ("benigno", "--version", "v1")),
    AppSpec("benigno-v2", "benigno", {"version": "v2"}, ("benigno", "--version", "v2")),
)


class PortInUse(Exception):
    pass


_HANDED_OUT: set[int] = set()
_RNG = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now, below the OS's ephemeral range.

    Ports handed out by ``bind(0)`` come from the ephemeral range, which every outgoing
    connection also draws from: with hundreds of listeners to start, a port picked early could be
    taken by a client's connection before its listener binds it. Below that range only listeners
    compete; a port is never handed out twice by this process.
    """
    lo, _ = _ephemeral_range()
    start = 20000 if lo > 25000 else 1024
    for _ in range(1000):
        port = _RNG.randrange(start, lo)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        got: int = s.getsockname()[1]
        return got


def check_port(port: int, what: str, flag: str, host: str = "127.0.0.1") -> None:
    """Refuse a port some process listens on, as the real listener would.

    asyncio's ``create_server`` sets ``SO_REUSEADDR`` (on POSIX), so a previous run's connections
    in TIME_WAIT do not stop it from binding: this check binds the same way, or a restart right
    after Ctrl-C would be refused for a minute although nothing listens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(
                f"{host}:{port} ({what}) is in use: {e.strerror}. Stop whatever listens there "
                f"(another demo?) or choose another port with {flag}."
            ) from e


def _pdeathsig() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            out.close()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> bool:
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self.signal(signal.SIGTERM)
        if not self.wait(timeout):
            self.signal(signal.SIGKILL)
            self.wait(5.0)
        # anything left in its process group (none expected) goes too
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@dataclass
class Instance:
    spec: AppSpec
    app_port: int
    inbound: int
    outbound: int
    admin: int


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


@dataclass
class DemoMesh:
    policy_dir: Path
    work_dir: Path
    cp_port: int = 5681
    gateway_port: int = 8080
    cp_args: Sequence[str] = ()
    """Extra ``meshc controlplane`` arguments (``--ref main --repo R``, ``--heartbeat-interval``)."""
    apps: Sequence[AppSpec] = APPS
    """The stand-in apps, each with its sidecar (bench/chaos.py adds a second benigno v1)."""
    python: str = sys.executable
    drain_s: float = 1.0
    procs: dict[str, Proc] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    gateway_admin: int = 0

    def __post_init__(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "logs").mkdir(exist_ok=True)
        for spec in self.apps:
            self.instances[spec.name] = Instance(spec, free_port(), free_port(), free_port(), free_port())
        self.gateway_admin = free_port()
        self.token("-")  # the token secret exists before the control plane starts: no race

    @property
    def cp_url(self) -> str:
        return f"http://127.0.0.1:{self.cp_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _meshc(self, *args: str) -> list[str]:
        return [self.python, "-m", "compiler.cli", *args]

    def _proc(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, self.work_dir / "logs" / f"{name}.log", env or self._env())
        self.procs[name] = p
        return p

    # --- starting -----------------------------------------------------------------------------

    def start_controlplane(self) -> Proc:
        p = self._proc(
            "controlplane",
            self._meshc(
                "controlplane",
                str(self.policy_dir),
                "--out",
                str(self.work_dir / "out"),
                "--state-dir",
                str(self.work_dir / "controlplane-state"),
                "--secrets-dir",
                str(self.secrets_dir),
                "--listen",
                f"127.0.0.1:{self.cp_port}",
                *self.cp_args,
            ),
        )
        p.start()
        return p

    def start_app(self, name: str, *extra: str) -> Proc:
        """The stand-in app ``name`` (``extra``: more ``compiler.demo_apps`` flags)."""
        inst = self.instances[name]
        env = self._env()
        if inst.spec.service == "magnanimo":
            env["HTTP_PROXY"] = env["http_proxy"] = f"http://127.0.0.1:{inst.outbound}"
        p = self._proc(
            f"app-{name}",
            [self.python, "-m", "compiler.demo_apps", *inst.spec.argv, "--port", str(inst.app_port), *extra],
            env,
        )
        p.start()
        return p

    @property
    def secrets_dir(self) -> Path:
        """The control plane's CAs, token secret and signing key: kept apart from its state, so a
        control plane restarted without its registry is still the one the data planes trust."""
        return self.work_dir / "controlplane-secrets"

    def token(self, service: str) -> str:
        """The bootstrap token of ``service`` (``meshc token``), handed over in MESHC_TOKEN."""
        from compiler.ca import TokenIssuer

        return TokenIssuer(self.secrets_dir).mint("default", service)

    def start_sidecar(self, name: str) -> Proc:
        inst = self.instances[name]
        tags = [a for k, v in inst.spec.tags.items() for a in ("--tag", f"{k}={v}")]
        p = self._proc(
            f"sidecar-{name}",
            self._meshc(
                "sidecar",
                "--service",
                inst.spec.service,
                *tags,
                "--app",
                f"127.0.0.1:{inst.app_port}",
                "--inbound",
                f"127.0.0.1:{inst.inbound}",
                "--outbound",
                f"127.0.0.1:{inst.outbound}",
                "--admin",
                f"127.0.0.1:{inst.admin}",
                "--state-dir",
                str(self.work_dir / "state" / name),
                "--control-plane",
                self.cp_url,
                "--drain-seconds",
                str(self.drain_s),
            ),
            self._env(MESHC_TOKEN=self.token(inst.spec.service)),
        )
        p.start()
        return p

    def start_gateway(self) -> Proc:
        """The gateway starts with no bundle: it binds its listener when the control plane pushes
        its first gateway bundle (and serves from its state dir after a restart)."""
        p = self._proc(
            "gateway",
            self._meshc(
                "gateway",
                "--service",
                "edge-gateway",
                "--listen",
                f"127.0.0.1:{self.gateway_port}",
                "--admin",
                f"127.0.0.1:{self.gateway_admin}",
                "--state-dir",
                str(self.work_dir / "state" / "gateway"),
                "--control-plane",
                self.cp_url,
                "--drain-seconds",
                str(self.drain_s),
            ),
            self._env(MESHC_TOKEN=self.token("edge-gateway")),
        )
        p.start()
        return p

    def start_all(self) -> None:
        self.start_controlplane()
        for name in self.instances:
            self.start_app(name)
        for name in self.instances:
            self.start_sidecar(name)
        self.start_gateway()

    # --- observing ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        code, body = _http_get(f"{self.cp_url}/api/v1/status")
        if code != 200:
            raise OSError(f"status answered {code}")
        data: dict[str, Any] = json.loads(body)
        return data

    def api(self, path: str) -> dict[str, Any]:
        code, body = _http_get(f"{self.cp_url}{path}")
        if code != 200:
            raise OSError(f"{path} answered {code}")
        data: dict[str, Any] = json.loads(body)
        return data

    def synced(self) -> int:
        try:
            rows = self.status()["dataplanes"]
        except (OSError, ValueError):
            return 0
        return sum(1 for r in rows if r["status"] == "SYNCED" and r["state"] == "Online")

    def gateway_ok(self) -> bool:
        try:
            code, _ = _http_get(f"{self.gateway_url}/route1/hw2")
        except (OSError, ValueError):
            return False
        return code == 200

    def failed(self) -> Proc | None:
        """A process that exited although nobody stopped it."""
        for p in self.procs.values():
            if p.popen is not None and p.popen.poll() is not None:
                return p
        return None

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            bad = self.failed()
            if bad is not None:
                raise RuntimeError(
                    f"{bad.name} exited with {bad.popen.returncode if bad.popen else '?'} while waiting for "
                    f"{what}; its log ({bad.log}):\n{bad.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)

    def wait_ready(self, timeout: float = 60.0) -> None:
        want = len(self.instances) + 1
        self.wait_until(lambda: self.synced() >= want, timeout, f"{want} data planes SYNCED")
        self.wait_until(self.gateway_ok, timeout, "the gateway to answer /route1/hw2")

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, name: str, timeout: float = 5.0) -> None:
        p = self.procs.get(name)
        if p is not None:
            p.stop(timeout)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.signal(signal.SIGKILL)
        p.wait(10.0)

    def forget(self, name: str) -> None:
        """Stop watching a process that was stopped on purpose."""
        self.procs.pop(name, None)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Data planes first (they drain and deregister), then the apps, then the control plane."""
        waves = [
            [n for n in self.procs if n.startswith(("gateway", "sidecar-"))],
            [n for n in self.procs if n.startswith("app-")],
            [n for n in self.procs if n == "controlplane"],
        ]
        for wave in waves:
            ps = [self.procs[n] for n in wave]
            for p in ps:
                p.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in ps:
                if not p.wait(max(0.0, deadline - time.monotonic())):
                    p.signal(signal.SIGKILL)
                    p.wait(5.0)
                p.stop(0.1)


def _follow(path: Path, stop: threading.Event, prefix: str) -> None:
    """Echo a growing log file to the console (the control plane's decisions)."""
    pos = 0
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
        except OSError:
            chunk = b""
        for line in chunk.decode(errors="replace").splitlines():
            line = line.removeprefix("meshc controlplane: ")
            print(f"{prefix}{line}", flush=True)
        stop.wait(0.25)


TARGETREF_DIR = Path("docs") / "examples" / "targetref"
"""The seed scenario in Kuma's targetRef dialect (``--targetref``), from the repo root."""
CANARY_FILE = Path("docs") / "examples" / "canary" / "benigno-v2.yaml"
"""The Canary ``--canary`` adds to a copy of the policies (the user's directory is not changed)."""
DEMO_LOAD_RPS = 5.0
DEMO_LOAD_MAX = 6000
"""``--canary``'s background traffic: a few requests a second, at most this many (20 minutes)."""


def _demo_load(url: str, stop: threading.Event) -> None:
    """Light traffic for the canary's analysis, bounded in count; stops with the demo."""
    for _ in range(DEMO_LOAD_MAX):
        if stop.wait(1.0 / DEMO_LOAD_RPS):
            return
        with contextlib.suppress(OSError):
            _http_get(url, timeout=5.0)


def demo_policy_dir(args: argparse.Namespace) -> Path:
    """DIR, ``policies`` by default, or the targetRef twin with ``--targetref`` (ValueError: both)."""
    if getattr(args, "targetref", False):
        if args.policy_dir is not None:
            raise ValueError("give DIR or --targetref, not both")
        return TARGETREF_DIR
    return Path(args.policy_dir or "policies")


def run_demo(args: argparse.Namespace) -> int:
    try:
        policy_dir = demo_policy_dir(args)
    except ValueError as e:
        print(f"meshc demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not policy_dir.is_dir():
        print(f"meshc demo: {policy_dir}: not a directory", file=sys.stderr)
        return EXIT_ERROR
    try:
        check_port(args.cp_port, "control plane", "--cp-port")
        check_port(args.gateway_port, "gateway", "--gateway-port")
    except PortInUse as e:
        print(f"meshc demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    # A temporary work dir holds the CA key, the token secret and the push-signing key: it goes
    # when the demo stops. One given with --work-dir is the user's, and stays.
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="meshc-demo-"))
    keep_work = bool(args.work_dir)
    canary = bool(getattr(args, "canary", False))
    if canary:
        if not CANARY_FILE.is_file():
            print(f"meshc demo: {CANARY_FILE}: not found (run it from the repo root)", file=sys.stderr)
            return EXIT_ERROR
        copy = work / "policies"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(policy_dir, copy)
        shutil.copy(CANARY_FILE, copy / "canary.yaml")
        policy_dir = copy
    mesh = DemoMesh(
        policy_dir.resolve(), work.resolve(), cp_port=args.cp_port, gateway_port=args.gateway_port
    )

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    follower = threading.Thread(
        target=_follow, args=(work / "logs" / "controlplane.log", stopping, "[controlplane] "), daemon=True
    )
    code = EXIT_OK
    try:
        print(f"meshc demo: starting in {work} (logs in {work / 'logs'})", flush=True)
        mesh.start_all()
        follower.start()
        mesh.wait_ready(timeout=90.0)
        _banner(mesh, policy_dir)
        if canary:
            _canary_banner(mesh)
            threading.Thread(
                target=_demo_load, args=(f"{mesh.gateway_url}/route1/hw2", stopping), daemon=True
            ).start()
        while True:
            bad = mesh.failed()
            if bad is not None:
                print(
                    f"meshc demo: {bad.name} exited unexpectedly "
                    f"({bad.popen.returncode if bad.popen else '?'}); "
                    f"its log:\n{bad.tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                code = EXIT_ERROR
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nmeshc demo: stopping...", flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"meshc demo: could not start: {e}", file=sys.stderr, flush=True)
        code = EXIT_ERROR
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mesh.stop_all()
        stopping.set()
        print("meshc demo: all processes stopped", flush=True)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
            print(f"meshc demo: removed {work} (keep it with --work-dir DIR)", flush=True)
    return code


def _canary_banner(mesh: DemoMesh) -> None:
    meshc = meshc_command()
    lines = [
        "A Canary of benigno v2 is running (a few requests a second go through the gateway):",
        f"  {meshc} canary status --watch 2 --control-plane {mesh.cp_url}",
        f"  {meshc} canary promote default/benigno-v2 --control-plane {mesh.cp_url}   # past its pause",
        f"  {meshc} canary abort default/benigno-v2 --control-plane {mesh.cp_url}     # back to 90/10",
        f"  {mesh.cp_url}/gui    # the Canaries section follows each step",
        "",
    ]
    print("\n".join(lines), flush=True)


def meshc_command() -> str:
    """How the user can run ``meshc`` from their shell: bare when it is on PATH, else the path of
    this interpreter's script (``.venv/bin/meshc`` after ``make demo``), relative when shorter."""
    script = Path(sys.executable).parent / "meshc"
    on_path = shutil.which("meshc")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "meshc"
    if not script.exists():
        return f"{sys.executable} -m compiler.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _banner(mesh: DemoMesh, policy_dir: Path) -> None:
    meshc = meshc_command()
    lines = [
        "",
        "meshc demo is running: the seed scenario on 127.0.0.1",
        f"  control plane  {mesh.cp_url}   (pid {mesh.procs['controlplane'].pid})",
    ]
    for name, inst in mesh.instances.items():
        lines.append(
            f"  {name:<13}  app 127.0.0.1:{inst.app_port}, sidecar inbound :{inst.inbound} "
            f"outbound :{inst.outbound} admin :{inst.admin}"
        )
    lines += [
        f"  gateway        {mesh.gateway_url}   (admin :{mesh.gateway_admin})",
        "",
        "Try:",
        f"  curl {mesh.gateway_url}/route1/hw2   # 9 in 10: Hello World, Benigno: ...; 1 in 10: the canary",
        f"  for i in $(seq 20); do curl -s {mesh.gateway_url}/route1/hw2; echo; done",
        f"  {meshc} status --control-plane {mesh.cp_url}",
        f"  {mesh.cp_url}/gui    # the dashboard: open it in a browser",
        f"  {mesh.cp_url}/api/v1/    # the API index (OpenAPI at /api/v1/openapi.json)",
        f"  edit {policy_dir}/traffic-route.yaml (weights 50/50) and save: the split follows, no restart",
    ]
    if meshc != "meshc":
        lines.append(f"  (to run `meshc` bare: source {Path(sys.executable).parent / 'activate'})")
    lines += ["", "Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)
