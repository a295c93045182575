"""``meshc canary``: see and steer the control plane's Canaries (``status``, ``promote``, ``abort``,
``retry``), as ``kubectl argo rollouts`` does for Argo's, over the control plane's API."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from compiler.commands import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from compiler.controlplane_cli import DEFAULT_CP, call_api

__all__ = ["register", "render"]


def render(canaries: list[dict[str, Any]]) -> str:
    """The text view: one block per canary (phase, weights now and in Git, steps, last run)."""
    from compiler.canary import split_text, step_text  # here: `meshc --help` loads no compiler stage

    if not canaries:
        return "no Canary in the current release"
    out = []
    for c in canaries:
        out.append(
            f"{c['key']}  {c['phase']}  ({c['route']['kind']} {c['route']['name']} -> {c['destination']})"
        )
        out.append(f"  weights   {split_text(c['split'])}" + ("" if c["overridden"] else "  (as in Git)"))
        for i, s in enumerate(c["steps"]):
            mark = (
                ">"
                if i == c.get("step") and c["phase"] not in ("Succeeded", "RolledBack", "Aborted")
                else " "
            )
            out.append(f"  {mark} {i + 1}. {step_text(s)}")
        run = c.get("last_run")
        if run:
            out.append(f"  analysis  {run['result']}: {run['reason']} ({run['requests']} request(s))")
        out.append(
            f"  failed {c['failed']}, inconclusive {c['inconclusive']} in a row; {c.get('reason') or ''}"
        )
    return "\n".join(out)


def _run(args: argparse.Namespace) -> int:
    base = args.control_plane.rstrip("/")
    try:
        if args.action != "status":
            mesh, _, name = args.name.rpartition("/")
            status, body = call_api(
                f"{base}/api/v1/canaries/{mesh or args.mesh}/{name}/{args.action}", "POST"
            )
            if status != 200:
                print(f"meshc canary {args.action}: {body.get('error', status)}", file=sys.stderr)
                return EXIT_FINDINGS
            print(body.get("message", "done"))
            return EXIT_OK
        while True:
            _, body = call_api(f"{base}/api/v1/canaries")
            rows = [
                c for c in body.get("canaries", []) if not args.name or args.name in (c["key"], c["name"])
            ]
            if args.format == "json":
                print(json.dumps(rows, indent=2))
            else:
                print(render(rows), flush=True)
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)  # a terminal refresh, not synchronisation
            print()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"meshc: cannot reach the control plane at {args.control_plane}: {reason}", file=sys.stderr)
        return EXIT_ERROR


def register(sub: Any) -> None:
    p = sub.add_parser(
        "canary",
        help="see and steer Canaries: status, promote, abort, retry (over the control plane's API)",
        description="status: every Canary's phase, weights and steps; promote NAME: go past the pause "
        "(or low-traffic hold) it waits at; abort NAME: back to the weights in Git now; retry NAME: "
        "start an ended canary again. NAME is MESH/NAME or NAME (with --mesh).",
        epilog="exit codes: 0 done; 1 the control plane refused the action; 2 it cannot be reached.",
    )
    p.add_argument("action", choices=("status", "promote", "abort", "retry"))
    p.add_argument("name", nargs="?", default="", help="the Canary (MESH/NAME, or NAME with --mesh)")
    p.add_argument("--mesh", default="default", help="the mesh of NAME (default: default)")
    p.add_argument("--control-plane", default=DEFAULT_CP, metavar="URL", help=f"default: {DEFAULT_CP}")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--watch", type=float, default=0.0, metavar="S", help="status: refresh every S seconds")
    p.set_defaults(run=_check_name)


def _check_name(args: argparse.Namespace) -> int:
    if args.action != "status" and not args.name:
        print(f"meshc canary {args.action}: which canary? (NAME)", file=sys.stderr)
        return EXIT_ERROR
    return _run(args)
