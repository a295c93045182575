"""The ``meshc plan`` subcommand's flags and help; ``compiler.plan_cli`` runs it.

Kept apart so that building ``meshc``'s parser (every command does) loads no compiler stage.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]

_HELP = "show what a policy change does to each bundle, between two revisions"
_DESCRIPTION = """\
Compile DIR at --base and at --head (default: the work tree) from the Git object store, with
nothing written anywhere, and show bundle by bundle what changes:

  ~ default/magnanimo  07e8…→cc28…  benigno split: v1 90→50, v2 10→50; retries 2→3
  + default/payments   —→cce2…      (new service)

  Plan: 1 to add, 1 to change, 0 to remove, 2 unchanged.

Bundles carry no commit, path or line, so an edit that changes no behaviour (a comment, a file
renamed or split) plans as no change. Deltas cover routes and splits, timeouts, retries,
circuit breakers, health checks, traffic logs, permissions, rate limits, fault injection,
gateway listeners and routes, mTLS, passthrough, logging and the catalog (ports, subsets).

  meshc plan policies/ --base origin/main
  meshc plan policies/ --base HEAD~1 --head HEAD --format markdown > plan.md
  meshc plan policies/ --base v1.4 --format json --exit-code
"""
_EPILOG = """\
exit codes: 0 planned (with --exit-code: no changes); 1 with --exit-code: changes; 2 a revision
or DIR cannot be read, or a side does not compile (its diagnostics go to stderr).
"""


def register(sub: Any) -> None:
    """Add the ``plan`` subcommand to ``meshc``'s subparsers (called by ``compiler.cli``)."""
    p = sub.add_parser(
        "plan",
        help=_HELP,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("policy_dir", metavar="DIR", help="the policy directory (every *.yaml/*.yml under it)")
    p.add_argument(
        "--base",
        required=True,
        metavar="REV",
        help="the revision to compare against (branch, tag, sha, origin/main, HEAD~1)",
    )
    p.add_argument(
        "--head",
        metavar="REV",
        help="the revision to plan (default: the work tree, uncommitted edits included)",
    )
    p.add_argument(
        "--format",
        choices=("text", "json", "markdown"),
        default="text",
        help="text (default), json (terraform-like resource_changes) or markdown (a PR comment)",
    )
    p.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when there are changes, 0 when there are none (as git diff --exit-code)",
    )
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from compiler.plan_cli import run

    return run(args)
