"""``meshc controlplane``, ``meshc status``, ``meshc token`` and ``meshc demo`` (registered by
``compiler.cli``).

Each command imports its machinery only when it runs, so ``meshc --help`` stays fast and
``meshc sidecar`` never loads the control plane.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from runtime.limits import add_limit_arguments, limits_from_args

__all__ = ["parse_listen", "register"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
DEFAULT_CP = "http://127.0.0.1:5681"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SHUTDOWN_S = 4.0
"""SIGTERM to exit at most (a busy control plane included; each stop step is bounded too)."""

_CP_DESC = """\
Run the control plane: compile DIR on start, then follow changes and push what changed.

Sources: by default the work tree of DIR is watched (changes settle for 50-100 ms, then one
compile); with --ref REV the policies are read from that Git ref instead, and each new commit on
it is compiled (--fetch-interval also runs `git fetch`; follow `origin/main` then). A compile with
errors keeps the current release: nothing is pushed, and the diagnostics show in the log, the API
and the GUI. A good release is written to OUT (bundles/<sha256>.json, releases/<id>.json), and
only the bundles whose digest changed are pushed: a service's bundle to that service's data
planes, the mesh bundle to all, endpoints before the routes that use them.

Data planes (`meshc sidecar|gateway --control-plane URL`) register, heartbeat and deregister here;
they go Offline after 3 missed heartbeats. The API is under /api/v1/, Prometheus metrics at
/metrics, the dashboard at /gui. It listens on loopback unless told otherwise, and any other
address needs --token (or MESHC_CONTROLPLANE_TOKEN) for the API and the GUI (Authorization: Bearer;
the data plane protocol under /api/v1/ is authenticated by bootstrap tokens and certificates).

Security (DESIGN §6): one CA per mesh as the Mesh's mtls backend says (builtin: generated into the
state dir, key mode 0600; provided: conf.cert.file / conf.key.file on this machine). A data plane
registers with a bootstrap token (`meshc token --mesh M --service NAME`) the first time and with its
current certificate after that; it gets a certificate for its CSR (TTL: the Mesh's
dpCert.rotation.expiration), the CA bundle and this control plane's push-signing key. Every push
is signed for one data plane in one boot (mesh, service, instance, boot id, slot, digest,
generation). Keep the state dir: it holds the CAs, the
token secret and the signing key that data planes trust.

Replicas (--store postgres://USER@HOST:PORT/DB): every replica serves the data planes connected to
it; one leader (a lock row with a --lease and a fencing token) follows Git, compiles and publishes
releases, which the others adopt; give every replica the same policy repo and the same secrets
dir, and each data plane every replica's URL (`--control-plane URL1,URL2`).
"""

_CP_EPILOG = """\
examples:
  meshc controlplane policies/ --out out/                       # follow the work tree
  meshc controlplane --repo . --ref main --out out/ --listen 127.0.0.1:5681   # GitOps mode
exit codes: 0 stopped cleanly (SIGINT/SIGTERM); 2 could not start (address in use, no such
directory or revision, bad arguments).
"""

_STATUS_DESC = """\
Show every data plane the control plane knows, like `istioctl proxy-status`: its state
(Online/Offline), per slot (EDS = endpoints, MESH = mesh bundle, SERVICE-BUNDLE = its own bundle)
SYNCED (acknowledged the current digest), STALE (sent, not acknowledged: in flight, NACKed, or the
data plane did not answer) or NOT SENT, the digest it runs, when it was last seen, its last ACK
and its last NACK reason.
"""

_DEMO_DESC = """\
Run the seed scenario on 127.0.0.1: the control plane on DIR, stand-ins for magnanimo and
benigno v1 and v2 (each on its own free port, with its sidecar) and the ingress gateway.
Then:  curl http://127.0.0.1:8080/route1/hw2   (90% "Hello World, Benigno: ...", 10% the canary)
Edit the TrafficRoute's weights and save: the split follows. Ctrl-C stops every process.
With --targetref, the policies are docs/examples/targetref (run it from the repo root).
"""


def parse_listen(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host, int(port)


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from e
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _run_controlplane(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from compiler.controlplane.server import Config, ControlPlane, StoreError
    from compiler.source import SourceError

    try:
        host, port = parse_listen(args.listen, 5681)
    except argparse.ArgumentTypeError as e:
        print(f"meshc: --listen {e}", file=sys.stderr)
        return EXIT_ERROR
    token = args.token or os.environ.get("MESHC_CONTROLPLANE_TOKEN") or None
    if host not in _LOOPBACK and not token:
        print(
            f"meshc: listening on {host} (not loopback) needs --token or MESHC_CONTROLPLANE_TOKEN",
            file=sys.stderr,
        )
        return EXIT_ERROR
    repo = Path(args.repo)
    policy_dir = Path(args.policy_dir)
    if not policy_dir.is_absolute():
        policy_dir = repo / policy_dir
    if args.ref is None and not policy_dir.is_dir():
        print(f"meshc: {policy_dir}: not a directory", file=sys.stderr)
        return EXIT_ERROR
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else out / ".controlplane"
    if args.insecure_registration:
        print(
            "meshc: --insecure-registration: any process that reaches the API may register as any "
            "service and get its certificate",
            file=sys.stderr,
        )
    try:
        limits = limits_from_args(args)
    except ValueError as e:
        print(f"meshc controlplane: {e}", file=sys.stderr)
        return EXIT_ERROR
    config = Config(
        policy_dir=policy_dir,
        out=out,
        host=host,
        port=port,
        ref=args.ref,
        repo=repo,
        fetch_interval_s=args.fetch_interval,
        poll_interval_s=args.poll_interval,
        state_dir=state_dir,
        heartbeat_interval_s=args.heartbeat_interval,
        rejoin_window_s=args.rejoin_window,
        concurrency=args.concurrency,
        token=token,
        registration_auth=not args.insecure_registration,
        secrets_dir=Path(args.secrets_dir) if args.secrets_dir else None,
        kubernetes=args.kubernetes,
        kubernetes_token=os.environ.get("MESHC_KUBERNETES_TOKEN") or None,
        limits=limits,
        store=args.store or os.environ.get("MESHC_STORE") or None,
        replica_id=args.replica_id,
        lease_s=args.lease,
        promote_commit=args.promote_commit,
    )

    import faulthandler

    from compiler.controlplane.release import tune_heap

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    tune_heap()  # before any thread starts

    async def main() -> int:
        cp = ControlPlane(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, cp.request_stop)
        # A SIGTERM during the first compile (15 s for 10,000 services on a busy host) stops
        # it too: start races the stop request, and the compile thread is left to os._exit.
        starting = asyncio.ensure_future(cp.start())
        stop_asked = asyncio.ensure_future(cp._stop.wait())
        await asyncio.wait({starting, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
        stop_asked.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting}, timeout=1.0)
        try:
            if starting.done() and not starting.cancelled():
                starting.result()  # the start's own error, if it failed
        except OSError as e:
            await cp.stop()
            print(f"meshc: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return EXIT_ERROR
        except (SourceError, StoreError) as e:
            await cp.stop()
            print(f"meshc: {e}", file=sys.stderr)
            return EXIT_ERROR
        try:
            await cp._stop.wait()
        finally:
            # asyncio.wait, not wait_for: on timeout wait_for waits for the cancelled stop() to
            # finish, which is what took too long.
            stopping = asyncio.ensure_future(cp.stop())
            done, _ = await asyncio.wait({stopping}, timeout=SHUTDOWN_S)
            if not done:
                cp.log(f"shutdown took over {SHUTDOWN_S:.0f} s; exiting anyway")
        cp.log("stopped")
        # Exit now: asyncio.run would wait for worker threads (a compile in progress, the file
        # watcher's thread) that have nothing left to deliver.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)

    return asyncio.run(main())


def _run_token(args: argparse.Namespace) -> int:
    from compiler.ca import TokenIssuer
    from compiler.kinds.base import parse_duration

    try:
        valid_ms = parse_duration(args.valid_for)
    except ValueError as e:
        print(f"meshc: --valid-for: {e}", file=sys.stderr)
        return EXIT_ERROR
    if valid_ms <= 0:
        print("meshc: --valid-for must be positive", file=sys.stderr)
        return EXIT_ERROR
    state_dir = Path(args.state_dir) if args.state_dir else Path(args.out) / ".controlplane"
    try:
        token = TokenIssuer(state_dir).mint(args.mesh, args.service, valid_ms / 1000.0)
    except OSError as e:
        print(f"meshc: cannot read or create the token secret in {state_dir}: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(token)
    return EXIT_OK


def _run_secrets(args: argparse.Namespace) -> int:
    from compiler.ca import CAError, MeshCA, PushSigner, TokenIssuer

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        TokenIssuer(out)
        PushSigner(out)
        for mesh in args.mesh or ["default"]:
            MeshCA.builtin(out, mesh)
    except (OSError, CAError) as e:
        print(f"meshc: cannot create the control plane's secrets in {out}: {e}", file=sys.stderr)
        return EXIT_ERROR
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"meshc: {out}: {', '.join(names)} (existing files are kept)", file=sys.stderr)
    print(f"kubectl -n {args.namespace} create secret generic meshc-secrets --from-file={out}")
    return EXIT_OK


def call_api(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """One control-plane API call: (status, JSON body), never through a proxy, with
    ``MESHC_CONTROLPLANE_TOKEN`` as the bearer token when set; an HTTP error is an answer too."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    token = os.environ.get("MESHC_CONTROLPLANE_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    status, data = call_api(url.rstrip("/") + "/api/v1/status", timeout=timeout)
    if status != 200:
        raise OSError(f"the status API answered {status}: {data.get('error', '')}")
    return data


def _run_status(args: argparse.Namespace) -> int:
    from compiler.controlplane.status_table import render_table

    try:
        data = fetch_status(args.control_plane)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"meshc: cannot reach the control plane at {args.control_plane}: {reason}", file=sys.stderr)
        return EXIT_ERROR
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return EXIT_OK
    rows = data.get("dataplanes", [])
    rel = data.get("release")
    commit = f" commit {data['commit'][:12]}" if data.get("commit") else ""
    print(f"release {rel[:12] if rel else '(none)'}{commit}")
    ha = data.get("controlplane") or {}
    if ha.get("store") == "postgres":
        print(
            f"store postgres, leader {ha.get('leader') or '(none)'} (fencing token {ha.get('leader_token')})"
        )
        for r in ha.get("replicas", []):
            mark = "leader" if r.get("leader") else ("alive" if r.get("alive") else "gone")
            print(f"  replica {r['id']} {r['url']} {mark}, {r.get('dataplanes', 0)} data plane(s)")
    if rows:
        print(render_table(rows, wide=args.output == "wide"))
    else:
        print("no data plane registered")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from compiler.demo import run_demo

    return run_demo(args)


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "controlplane",
        help="watch policies (work tree or Git ref), push changed bundles, registry, API and GUI",
        description=_CP_DESC,
        epilog=_CP_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument(
        "policy_dir",
        metavar="DIR",
        nargs="?",
        default="policies",
        help="the policy directory, relative to --repo (default: policies)",
    )
    p.add_argument(
        "--repo", default=".", help="the Git repository (or plain directory) holding DIR (default: .)"
    )
    p.add_argument("--ref", metavar="REV", help="follow this Git ref (branch, tag) instead of the work tree")
    p.add_argument(
        "--fetch-interval",
        metavar="S",
        type=_positive,
        help="with --ref: run `git fetch` every S seconds (follow a remote-tracking ref such as origin/main)",
    )
    p.add_argument(
        "--poll-interval",
        metavar="S",
        type=_positive,
        default=0.2,
        help="with --ref: how often to look for a new commit (default: 0.2)",
    )
    p.add_argument("--out", default="out", help="where releases and bundles are written (default: out)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:5681",
        metavar="HOST:PORT",
        help="API, metrics and GUI address (default: 127.0.0.1:5681)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="registry and generation state kept across restarts (default: OUT/.controlplane)",
    )
    p.add_argument(
        "--heartbeat-interval",
        metavar="S",
        type=_positive,
        default=1.0,
        help="heartbeat interval asked of data planes; Offline after 3 missed (default: 1)",
    )
    p.add_argument(
        "--promote-commit",
        nargs="?",
        const="meshc/promote",
        metavar="PREFIX",
        help="with --ref: when a Canary is promoted, commit its weights to the route on branch "
        "PREFIX/<mesh>-<name> (default prefix meshc/promote) for a pull request; never on the "
        "followed ref, never pushed",
    )
    p.add_argument(
        "--rejoin-window",
        metavar="S",
        type=_positive,
        help="after a start without a saved registry, how long data planes have to register again; "
        "until then the endpoints they report running are kept, minus those that stop answering "
        "(default: 3.5 heartbeat intervals + 2 s)",
    )
    p.add_argument(
        "--concurrency", type=int, default=32, metavar="N", help="pushes in flight at most (default: 32)"
    )
    p.add_argument(
        "--token",
        help="required for the API and GUI (needed when not listening on loopback)",
    )
    p.add_argument(
        "--secrets-dir",
        metavar="DIR",
        help="where the mesh CAs, the bootstrap-token secret and the push-signing key are kept "
        "(mode 0600; default: the state dir)",
    )
    p.add_argument(
        "--kubernetes",
        metavar="API",
        nargs="?",
        const="in-cluster",
        help="run on Kubernetes: endpoints from EndpointSlices, registration by TokenReview of the "
        "projected service-account token, a Lease for the leader (API: in-cluster by default, or an "
        "API server URL, with its token in MESHC_KUBERNETES_TOKEN); needs meshc[kubernetes]",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        help="where the control plane's state lives: postgres://USER@HOST:PORT/DB for replicas "
        "sharing one PostgreSQL (one leader compiles and publishes, every replica serves data "
        "planes); default: the state dir (one replica)",
    )
    p.add_argument(
        "--replica-id",
        metavar="NAME",
        help="this replica's name in the store (default: HOSTNAME:PORT)",
    )
    p.add_argument(
        "--lease",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="the leader's lease with --store postgres://: another replica takes over within it "
        "when the leader stops renewing (default: 10)",
    )
    p.add_argument(
        "--insecure-registration",
        action="store_true",
        help="let data planes register without a bootstrap token or certificate (development only)",
    )
    add_limit_arguments(p, admin=False)
    p.set_defaults(run=_run_controlplane)

    t = sub.add_parser(
        "token",
        help="mint a data plane bootstrap token for a service of a mesh",
        description="Print the bootstrap token a data plane of SERVICE in MESH registers with the "
        "first time (`meshc sidecar --token`, or env MESHC_TOKEN). A token names one mesh, one "
        "service and an expiry, under an HMAC-SHA256 by a secret kept in the control plane's state "
        "dir (created with mode 0600), so this command must see the same state dir as `meshc "
        "controlplane`; it admits nothing else (another mesh or service: 403). After the first "
        "registration a data plane authenticates with its certificate.",
        epilog="exit codes: 0 printed; 2 bad --valid-for, or the state dir cannot be read or written.",
        formatter_class=fmt,
    )
    t.add_argument("--service", required=True, help="the service the token is for")
    t.add_argument("--mesh", default="default", help="the mesh the token is for (default: default)")
    t.add_argument(
        "--valid-for",
        default="720h",
        metavar="DURATION",
        help="how long the token admits registrations (Go duration, or d for days; default: 720h)",
    )
    t.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the control plane's --secrets-dir, or its state dir when it has none "
        "(default: OUT/.controlplane)",
    )
    t.add_argument("--out", default="out", help="the control plane's --out (default: out)")
    t.set_defaults(run=_run_token)

    k = sub.add_parser(
        "secrets",
        help="create the secrets every control plane replica must share (keys, token secret, CAs)",
        description="Create, in DIR, what every replica of one control plane must share: the "
        "push-signing key (data planes pin it; a replica with another key is refused by every "
        "sidecar that fails over to it), the bootstrap-token secret and a builtin CA per mesh "
        "(mode 0600; existing files are kept). Give DIR to each replica as --secrets-dir, or, on "
        "Kubernetes, as the Secret meshc-secrets that `meshc manifests` mounts (the command is "
        "printed).",
        epilog="example: meshc secrets --out secrets/ --mesh default | sh\n"
        "exit codes: 0 created or kept; 2 DIR cannot be written.",
        formatter_class=fmt,
    )
    k.add_argument("--out", required=True, metavar="DIR", help="where the secrets are written")
    k.add_argument(
        "--mesh",
        action="append",
        metavar="MESH",
        help="a mesh to create a builtin CA for (repeatable; default: default)",
    )
    k.add_argument("--namespace", default="meshc-system", help="the namespace in the printed kubectl command")
    k.set_defaults(run=_run_secrets)

    s = sub.add_parser(
        "status",
        help="per-proxy sync status from the control plane (like istioctl proxy-status)",
        description=_STATUS_DESC,
        epilog="exit codes: 0 shown; 2 the control plane cannot be reached.",
        formatter_class=fmt,
    )
    s.add_argument(
        "--control-plane",
        default=DEFAULT_CP,
        metavar="URL",
        help=f"control plane URL (default: {DEFAULT_CP})",
    )
    s.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    s.add_argument(
        "-o",
        "--output",
        choices=("wide",),
        help="wide: add the kind, each slot's state (EDS, MESH, SERVICE-BUNDLE), the admin and "
        "inbound addresses, the last ACK and the last NACK (the default fits 100 columns)",
    )
    s.set_defaults(run=_run_status)

    d = sub.add_parser(
        "demo",
        help="run the seed scenario locally: control plane, apps, sidecars, gateway",
        description=_DEMO_DESC,
        epilog="exit codes: 0 stopped with Ctrl-C; 2 could not start (a port in use, a process failed).",
        formatter_class=fmt,
    )
    d.add_argument(
        "policy_dir",
        metavar="DIR",
        nargs="?",
        default=None,
        help="the policy directory (default: policies)",
    )
    d.add_argument(
        "--targetref",
        action="store_true",
        help="run the same scenario in Kuma's targetRef dialect (docs/examples/targetref: MeshHTTPRoute, "
        "MeshTimeout...); it compiles to the same bundles",
    )
    d.add_argument(
        "--canary",
        action="store_true",
        help="also run a Canary of benigno v2 (docs/examples/canary) with light traffic through the "
        "gateway: watch it step in the GUI or with `meshc canary status --watch 2`",
    )
    d.add_argument("--gateway-port", type=int, default=8080, help="the gateway's port (default: 8080)")
    d.add_argument("--cp-port", type=int, default=5681, help="the control plane's port (default: 5681)")
    d.add_argument("--work-dir", help="where out/, state and logs go (default: a new temporary directory)")
    d.set_defaults(run=_run_demo)
