"""Command lines of the data plane: ``meshc sidecar`` and ``meshc gateway``.

``compiler/cli.py`` hands its ``sidecar`` / ``gateway`` subcommands over to ``sidecar_main`` and
``gateway_main`` (lazy import: the data plane loads no compiler module); ``python -m
runtime.sidecar`` and ``python -m runtime.gateway`` run the same functions. Exit codes: 0 after a
clean drain, 2 when the data plane cannot start (usage, unreadable files, unbindable address).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from runtime.gatewaytls import DEFAULT_SECRETS_DIR
from runtime.limits import add_limit_arguments

__all__ = ["gateway_main", "sidecar_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        default="127.0.0.1:15002",
        metavar="HOST:PORT",
        help="admin API: pushes from the control plane, /config, /metrics, /ready "
        "(default %(default)s; loopback only unless --admin-allow-remote)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where accepted bundles, endpoints and the trusted key are kept: a restart serves "
        "from here while the control plane is down",
    )
    p.add_argument(
        "--control-plane",
        metavar="URL",
        action="append",
        help="register and heartbeat with this control plane; several (repeated or comma-separated: "
        "replicas sharing one store) for failover to the next when one is gone",
    )
    p.add_argument(
        "--bundle", type=Path, metavar="FILE", help="a bundle file to start with (service or mesh bundle)"
    )
    p.add_argument("--mesh-bundle", type=Path, metavar="FILE", help="the mesh bundle file to start with")
    p.add_argument(
        "--endpoints",
        type=Path,
        metavar="FILE",
        help="an endpoint set (JSON, as PUT /endpoints) to start with",
    )
    p.add_argument("--mesh", default="default", help="mesh name to register in (default %(default)s)")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM: stop accepting, deregister, and wait at most S seconds for in-flight "
        "requests (default %(default)s)",
    )
    p.add_argument(
        "--dataplane",
        choices=("fast", "aiohttp"),
        default=os.environ.get("MESHC_DATAPLANE", "fast"),
        help="HTTP forwarding layer: asyncio Protocols + httptools, or aiohttp (default %(default)s; "
        "env MESHC_DATAPLANE)",
    )
    sec = p.add_argument_group(
        "security",
        "Pushes to the admin API must be signed by the control plane: its key comes with the first "
        "registration and is kept in the state dir. Without a control plane, give the key with "
        "--trust-key, or --insecure-admin to accept unsigned pushes (development only). The "
        "mesh key and certificate stay in memory and are renewed at 2/3 of their life.",
    )
    sec.add_argument(
        "--token",
        default=os.environ.get("MESHC_TOKEN"),
        help="bootstrap token for the first registration (`meshc token --mesh M --service NAME`; "
        "env MESHC_TOKEN, which keeps it out of the process list)",
    )
    sec.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the bootstrap token from FILE (on Kubernetes: the projected service-account token, "
        "which the control plane checks by TokenReview)",
    )
    sec.add_argument(
        "--trust-key",
        metavar="HEX",
        help="the control plane's Ed25519 public key that pushes must be signed with",
    )
    sec.add_argument(
        "--insecure-admin",
        action="store_true",
        help="accept unsigned pushes on the admin API (no control plane; never in production)",
    )
    sec.add_argument(
        "--admin-allow-remote",
        action="store_true",
        help="allow --admin on a non-loopback address (it still needs signed pushes)",
    )
    add_limit_arguments(sec)


_DESCRIPTION = {
    "sidecar": """\
Run a sidecar: the data plane proxy beside one instance of a service. The app sends its calls to
--outbound (as its HTTP proxy); calls from other services arrive at --inbound and go to --app.
With --control-plane it registers (a bootstrap token the first time, its certificate after),
receives signed bundles and endpoint sets on --admin, and heartbeats; when the control plane is
down it keeps serving what it last accepted, and starts from --state-dir after a restart.
Without a control plane, give --bundle/--mesh-bundle/--endpoints files.""",
    "gateway": """\
Run the ingress gateway: a data plane that serves the listeners of a MeshGateway and routes each
request by its MeshGatewayRoutes to services in the mesh. With --control-plane it starts with no
bundle and binds its listeners when the first gateway bundle arrives (or from --state-dir after a
restart); a reload that adds a port binds it, one that drops a port closes it after draining.""",
}

_EPILOG = {
    "sidecar": """\
examples:
  # benigno v1 beside its app on :5001, steered by a local control plane
  MESHC_TOKEN=$(meshc token --service benigno) meshc sidecar --service benigno --tag version=v1 \\
      --app 127.0.0.1:5001 --inbound 127.0.0.1:15001 --outbound 127.0.0.1:15101 \\
      --admin 127.0.0.1:15201 --state-dir state/benigno-v1 --control-plane http://127.0.0.1:5681
  # no control plane: compiled bundles from `meshc compile` and an endpoints file
  meshc sidecar --service magnanimo --app 127.0.0.1:4001 --outbound 127.0.0.1:15100 \\
      --bundle out/bundles/<magnanimo>.json --mesh-bundle out/bundles/<mesh>.json \\
      --endpoints endpoints.json --insecure-admin

exit codes: 0 stopped after a clean drain; 2 could not start (usage, unreadable file, address in use).""",
    "gateway": """\
examples:
  # the seed's edge gateway; its bundle (listener :8080, /route1 -> magnanimo) comes by push
  MESHC_TOKEN=$(meshc token --service edge-gateway) meshc gateway --service edge-gateway \\
      --listen 127.0.0.1:8080 --admin 127.0.0.1:15300 --state-dir state/gateway \\
      --control-plane http://127.0.0.1:5681

exit codes: 0 stopped after a clean drain; 2 could not start (usage, unreadable file, address in use).""",
}


def _token_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as e:
        raise _UsageError(f"--token-file {path}: {e.strerror}") from None


def _tags(values: list[str], flag: str = "--tag") -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise _UsageError(f"{flag} {value!r} is not key=value")
        tags[key] = val
    return tags


def _run(kind: str, argv: list[str]) -> int:
    from runtime.limits import limits_from_args
    from runtime.server import Options, parse_addr, run

    p = _Parser(
        prog=f"meshc {kind}",
        description=_DESCRIPTION[kind],
        epilog=_EPILOG[kind],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if kind == "sidecar":
        p.add_argument("--service", required=True, help="the service this instance belongs to")
        p.add_argument("--tag", action="append", default=[], metavar="K=V", help="instance tag (repeatable)")
        p.add_argument(
            "--label",
            action="append",
            default=[],
            metavar="K=V",
            help="Dataplane label, as a Dataplane targetRef selects it (repeatable; "
            "kuma.io/display-name=NAME is its name, k8s.kuma.io/namespace=NS its namespace)",
        )
        p.add_argument("--app", metavar="HOST:PORT", help="where the local app listens")
        p.add_argument(
            "--inbound",
            metavar="HOST:PORT",
            help="where other data planes reach this instance (mTLS when the mesh has it on); "
            "registered as the instance's endpoint; needs --app",
        )
        p.add_argument(
            "--outbound",
            metavar="HOST:PORT",
            help="the proxy the app sends its calls to (set HTTP_PROXY=http://HOST:PORT in the app)",
        )
        p.add_argument(
            "--reachable-services",
            metavar="A,B,...",
            help="Kuma's reachableServices: the destinations this app calls besides those its "
            "policies name; pushed ahead, the others fetched at their first request",
        )
        p.add_argument(
            "--full-mesh-bundle",
            action="store_true",
            help="take the whole mesh bundle at every change (no delta pushes, no scoping), as data "
            "planes did before pieces; for comparisons",
        )
        p.add_argument(
            "--pieces-formats",
            metavar="N,M,...",
            help="the mesh manifest formats to declare on registration (default: every format this "
            "version runs); for tests of mixed-version meshes",
        )
    else:
        p.add_argument(
            "--service",
            help="the gateway's kuma.io/service, as its MeshGateway selects it (default: from its bundle)",
        )
        p.add_argument("--tag", action="append", default=[], metavar="K=V", help="instance tag (repeatable)")
        p.add_argument(
            "--listen",
            action="append",
            default=[],
            metavar="HOST:PORT",
            help="address for a listener: the one with this port, else the next unbound one (repeatable)",
        )
        p.add_argument(
            "--tls-secrets-dir",
            default=DEFAULT_SECRETS_DIR,
            metavar="DIR",
            help="where HTTPS listeners' Secret certificates are mounted: secret NAME is read from "
            "DIR/NAME/tls.crt and DIR/NAME/tls.key (a kubernetes.io/tls Secret volume) and reloaded "
            "when it changes (default %(default)s)",
        )
    _common(p)
    try:
        ns = p.parse_args(argv)
        opts = Options(
            kind="sidecar" if kind == "sidecar" else "gateway",
            service=ns.service,
            tags=_tags(ns.tag),
            admin=parse_addr(ns.admin),
            state_dir=ns.state_dir,
            control_plane=",".join(ns.control_plane) if ns.control_plane else None,
            bundle=ns.bundle,
            mesh_bundle=ns.mesh_bundle,
            endpoints=ns.endpoints,
            drain_s=ns.drain_seconds,
            dataplane=ns.dataplane,
            mesh=ns.mesh,
            token=ns.token or _token_file(ns.token_file),
            trust_key=ns.trust_key,
            insecure_admin=ns.insecure_admin,
            admin_allow_remote=ns.admin_allow_remote,
            limits=limits_from_args(ns),
        )
        if ns.trust_key is not None and (
            len(ns.trust_key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in ns.trust_key)
        ):
            raise _UsageError("--trust-key must be 64 hex digits (an Ed25519 public key)")
        if kind == "sidecar":
            opts.app = ns.app
            opts.labels = _tags(ns.label, "--label")
            opts.inbound = parse_addr(ns.inbound) if ns.inbound else None
            opts.outbound = parse_addr(ns.outbound) if ns.outbound else None
            opts.pieces = not ns.full_mesh_bundle
            if ns.pieces_formats is not None:
                try:
                    opts.pieces_formats = tuple(int(f) for f in ns.pieces_formats.split(",") if f.strip())
                except ValueError:
                    raise _UsageError("--pieces-formats must be a comma list of integers") from None
            if ns.reachable_services is not None:
                opts.reachable = [s.strip() for s in ns.reachable_services.split(",") if s.strip()]
            if opts.inbound is not None and not opts.app:
                raise _UsageError("--inbound needs --app")
            if opts.app:
                parse_addr(opts.app)
        else:
            opts.listen = [parse_addr(a) for a in ns.listen]
            opts.tls_secrets_dir = ns.tls_secrets_dir
    except (_UsageError, ValueError) as e:
        print(f"meshc {kind}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    return run(opts)


def sidecar_main(argv: list[str]) -> int:
    """``meshc sidecar ...``: run a sidecar until SIGTERM; the process exit code."""
    return _run("sidecar", argv)


def gateway_main(argv: list[str]) -> int:
    """``meshc gateway ...``: run an ingress gateway until SIGTERM; the process exit code."""
    return _run("gateway", argv)
