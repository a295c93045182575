"""``meshc inject`` and ``meshc manifests``: YAML for ``kubectl apply``, written offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

_INJECT_DESC = """\
Add the meshc sidecar to the Deployments, StatefulSets, DaemonSets, Jobs and Pods of a manifest,
offline (no cluster is contacted) and deterministically, like `linkerd inject --manual`. Comments,
key order and document order are kept; everything that is not a workload passes through.

The sidecar is a native sidecar (an init container with restartPolicy: Always, Kubernetes 1.29+;
--classic for a plain container) that registers with the control plane using a projected
service-account token (audience "meshc"). The app's HTTP_PROXY points at it. Its mesh service is
Kuma's name of the Service that selects the workload (`<name>_<namespace>_svc_<port>`, found in the
input or in --policy-dir), or the workload's `meshc.io/service` annotation.

`kuma.io/sidecar-injection: enabled|disabled` on the pod template, the workload or its Namespace
decides; with --namespace-aware a workload with no setting anywhere is left alone.
Injecting an injected manifest changes nothing."""

_INJECT_EPILOG = """\
examples:
  meshc inject -f app.yaml | kubectl apply -f -
  meshc inject -f benigno-v2.yaml --policy-dir policies/ > benigno-v2.injected.yaml
  cat app.yaml | meshc inject --namespace-aware

exit codes: 0 written; 2 the input cannot be read or a workload has no service name"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inject",
        help="add the meshc sidecar to Kubernetes workloads (offline)",
        description=_INJECT_DESC,
        epilog=_INJECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-f", "--filename", default="-", metavar="FILE", help="the manifest (default: - for stdin)"
    )
    p.add_argument(
        "--namespace-aware",
        action="store_true",
        help="inject only where kuma.io/sidecar-injection is enabled (workload or Namespace)",
    )
    p.add_argument("--classic", action="store_true", help="a plain container instead of a native sidecar")
    p.add_argument(
        "--policy-dir",
        metavar="DIR",
        type=Path,
        help="also look up Services and Namespaces in the manifests under DIR",
    )
    p.add_argument("--control-plane", metavar="URL", help="the control plane the sidecars register with")
    p.add_argument("--image", metavar="IMAGE", help="the meshc image")
    p.set_defaults(run=_run_inject)

    m = sub.add_parser(
        "manifests",
        help="print the Kubernetes manifests that install meshc (control plane, gateway)",
        description="Print the control plane (Deployment of 3 with a PodDisruptionBudget and "
        "anti-affinity, Service, ServiceAccount, RBAC, the CA Secret, a git-sync container for the "
        "policy repo) and the gateway (Deployment and LoadBalancer Service) as plain YAML, or as a "
        "kustomization directory with --out.",
        epilog="examples:\n  meshc manifests --repo https://git.example/policies.git | kubectl apply -f -\n"
        "  meshc manifests --out deploy/meshc && kubectl apply -k deploy/meshc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--namespace", default="meshc-system", help="where meshc runs (default: meshc-system)")
    m.add_argument(
        "--repo",
        default="https://git.example.com/policies.git",
        metavar="URL",
        help="the policy repository git-sync clones",
    )
    m.add_argument("--ref", default="main", help="the branch git-sync follows (default: main)")
    m.add_argument(
        "--policy-dir", default="policies", help="the policy directory in the repo (default: policies)"
    )
    m.add_argument("--image", metavar="IMAGE", help="the meshc image")
    m.add_argument(
        "--policies",
        metavar="DIR",
        type=Path,
        help="a local copy of the policy directory: the gateway mounts each kubernetes.io/tls Secret "
        "its MeshGateways' HTTPS listeners name ({secret: NAME}; the Secret lives in --namespace) "
        "and listens on their ports",
    )
    m.add_argument(
        "--gateway-tls-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="also mount this kubernetes.io/tls Secret on the gateway (repeatable)",
    )
    m.add_argument(
        "--out", metavar="DIR", type=Path, help="write one file per object and a kustomization.yaml"
    )
    m.set_defaults(run=_run_manifests)


def _run_inject(args: argparse.Namespace) -> int:
    from compiler.kube.inject import (
        CONTROL_PLANE_URL,
        IMAGE,
        InjectError,
        Options,
        inject_text,
        known_objects,
    )

    opts = Options(
        namespace_aware=args.namespace_aware,
        classic=args.classic,
        control_plane=args.control_plane or CONTROL_PLANE_URL,
        image=args.image or IMAGE,
    )
    try:
        path = None if args.filename == "-" else Path(args.filename)
        text = sys.stdin.read() if path is None else path.read_text(encoding="utf-8")
        known = known_objects(args.policy_dir) if args.policy_dir else None
        out = inject_text(text, opts, known)
    except (OSError, UnicodeDecodeError) as e:
        print(f"meshc inject: {args.filename}: {e}", file=sys.stderr)
        return 2
    except InjectError as e:
        print(f"meshc inject: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


def _run_manifests(args: argparse.Namespace) -> int:
    from compiler.kinds.mesh_gateway import certificate
    from compiler.kube.manifests import GatewayTls, Settings, gateway_tls, render, write_kustomization
    from compiler.source import SourceError

    extra = tuple(args.gateway_tls_secret)
    for name in extra:
        if certificate({"secret": name}) is None:
            print(f"meshc manifests: --gateway-tls-secret {name!r} is not a Secret name", file=sys.stderr)
            return 2
    tls = GatewayTls(tuple(sorted(set(extra))))
    if args.policies is not None:
        try:
            tls = gateway_tls(args.policies, extra)
        except (OSError, SourceError) as e:
            print(f"meshc manifests: --policies {args.policies}: {e}", file=sys.stderr)
            return 2
    for note in tls.notes:
        print(f"meshc manifests: {note}", file=sys.stderr)
    settings = Settings(
        namespace=args.namespace,
        repo=args.repo,
        ref=args.ref,
        policy_dir=args.policy_dir,
        gateway_tls=tls,
        **({"image": args.image} if args.image else {}),
    )
    if args.out is not None:
        try:
            write_kustomization(settings, args.out)
        except OSError as e:
            print(f"meshc manifests: {e}", file=sys.stderr)
            return 2
        return 0
    sys.stdout.write(render(settings))
    return 0
