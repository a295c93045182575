"""``meshc plan DIR --base REV [--head REV]``: the I/O side of ``compiler.plan``.

Both sides are read from the Git object store (``git ls-tree`` + ``git cat-file``; the head from
the work tree when ``--head`` is not given) and compiled in memory: nothing is written into the
repository, the work tree or an output directory. Files are parsed once per Git blob id, so the
files the two sides share (all but the edited ones) are parsed once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from compiler.pipeline import CompileResult, ParsedFile, compile_parsed, parse_file
from compiler.source import SourceError, SourceSet, read_policy_dir

__all__ = ["compile_pair", "register", "run"]

EXIT_OK, EXIT_CHANGES, EXIT_ERROR = 0, 1, 2

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
    p.set_defaults(run=run)


class _ParseCache:
    """Parsed files by Git blob id: a file both sides share is parsed once."""

    def __init__(self) -> None:
        self._by_blob: dict[str, ParsedFile] = {}

    def compile(self, src: SourceSet) -> CompileResult:
        parsed = []
        for f in src.files:
            p = self._by_blob.get(f.blob)
            if p is None or p.file.path != f.path:
                # Diagnostics carry the path: a renamed file with the same blob is parsed again.
                p = parse_file(f)
                self._by_blob[f.blob] = p
            parsed.append(p)
        return compile_parsed(src, parsed)


def compile_pair(base: SourceSet, head: SourceSet) -> tuple[CompileResult, CompileResult]:
    cache = _ParseCache()
    return cache.compile(base), cache.compile(head)


def _diagnostics(side: str, label: str, result: CompileResult, fmt: str) -> None:
    from compiler.report import default_format, render

    summary = {
        "files": result.files,
        "documents": result.documents,
        "errors": result.errors,
        "warnings": result.warnings,
    }
    print(
        f"meshc plan: the {side} ({label}) does not compile: {result.errors} error(s); no plan made",
        file=sys.stderr,
    )
    text = render("json" if fmt == "json" else default_format(), result.diagnostics, summary)
    if text:
        print(text, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from compiler.plan import make_plan, render

    base_label = args.base
    head_label = args.head or "work tree"
    try:
        base_src = read_policy_dir(args.policy_dir, args.base)
        head_src = read_policy_dir(args.policy_dir, args.head)
    except SourceError as e:
        print(f"meshc: {e}", file=sys.stderr)
        return EXIT_ERROR
    base, head = compile_pair(base_src, head_src)
    failed = False
    for side, label, result in (("base", base_label, base), ("head", head_label, head)):
        if result.errors:
            _diagnostics(side, label, result, args.format)
            failed = True
    if failed:
        return EXIT_ERROR
    plan = make_plan(base, head, base_label, head_label)
    print(render(args.format, plan))
    if args.exit_code and plan.has_changes:
        return EXIT_CHANGES
    return EXIT_OK
