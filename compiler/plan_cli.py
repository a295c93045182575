"""``meshc plan DIR --base REV [--head REV]``: the I/O side of ``compiler.plan``.

Both sides are read from the Git object store (``git ls-tree`` + ``git cat-file``; the head from
the work tree when ``--head`` is not given) and compiled in memory: nothing is written into the
repository, the work tree or an output directory. Files are parsed once per Git blob id, so the
files the two sides share (all but the edited ones) are parsed once.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
from dataclasses import replace
from typing import Any

from compiler.pipeline import CompileResult, ParsedFile, compile_parsed, parse_files
from compiler.plan import Plan, make_plan
from compiler.source import SourceError, SourceSet, read_policy_dir

__all__ = ["Planner", "compile_pair", "register", "run"]

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


class Planner:
    """Compiles the two sides of plans; keeps state between calls, so a long-lived process plans warm.

    * Results are kept by the content of the side (every path and Git blob id): a base planned
      again is not recompiled.
    * When ``compiler.incremental.IncrementalCompiler`` exists it compiles the sides: the head is
      then an incremental step from the base (only the files that differ are re-parsed, only the
      bundles they can affect rebuilt). It gets no output directory: a plan writes nothing.
    * Otherwise files are parsed once per Git blob id (a file both sides share is parsed once)
      and each side is compiled from the parsed files.
    """

    def __init__(self, incremental: bool = True) -> None:
        self._inc: Any = _incremental_compiler() if incremental else None
        self._parsed: dict[str, ParsedFile] = {}
        self._results: dict[str, CompileResult] = {}

    @property
    def incremental(self) -> bool:
        return self._inc is not None

    def compile(self, src: SourceSet) -> CompileResult:
        key = _content_key(src)
        hit = self._results.pop(key, None)
        if hit is not None:
            self._results[key] = hit  # most recently used last
            return replace(hit, commit=src.commit, release_id=src.commit or hit.release_id)
        result = None
        if self._inc is not None:
            result = _from_incremental(self._inc, src)
        if result is None:
            result = self._compile_parsed(src)
        self._results[key] = result
        while len(self._results) > 2:  # two sides are all a plan needs; keep memory flat
            del self._results[next(iter(self._results))]
        return result

    def _compile_parsed(self, src: SourceSet) -> CompileResult:
        # Diagnostics carry the path: a renamed file with the same blob is parsed again.
        missing = [f for f in src.files if (p := self._parsed.get(f.blob)) is None or p.file.path != f.path]
        for p in parse_files(missing):
            self._parsed[p.file.blob] = p
        live = {f.blob for f in src.files}
        result = compile_parsed(src, [self._parsed[f.blob] for f in src.files])
        if len(self._parsed) > 2 * len(live) + 64:
            self._parsed = {k: v for k, v in self._parsed.items() if k in live}
        return result

    def plan(
        self, base: SourceSet, head: SourceSet, base_label: str = "base", head_label: str = "head"
    ) -> tuple[CompileResult, CompileResult, Plan | None]:
        """Compile both sides; the plan is ``None`` when either side has errors."""
        b = self.compile(base)
        h = self.compile(head)
        if b.errors or h.errors:
            return b, h, None
        return b, h, make_plan(b, h, base_label, head_label)


def _content_key(src: SourceSet) -> str:
    h = hashlib.sha256()
    for f in src.files:
        h.update(f.path.encode() + b"\0" + f.blob.encode() + b"\n")
    return h.hexdigest()


def _incremental_compiler() -> Any:
    try:
        mod = importlib.import_module("compiler.incremental")
    except ImportError:
        return None
    cls = getattr(mod, "IncrementalCompiler", None)
    if cls is None:
        return None
    try:
        return cls()
    except TypeError:
        return None


def _from_incremental(inc: Any, src: SourceSet) -> CompileResult | None:
    out = inc.update(src)
    result = out[0] if isinstance(out, tuple) else getattr(out, "result", out)
    if not isinstance(result, CompileResult):
        return None
    # The compiler's next step may reuse its dicts: keep a copy of what the plan reads.
    release = dict(result.release)
    if "bundles" in release:
        release["bundles"] = dict(release["bundles"])
    return replace(result, bundles=dict(result.bundles), release=release)


def compile_pair(base: SourceSet, head: SourceSet) -> tuple[CompileResult, CompileResult]:
    planner = Planner()
    return planner.compile(base), planner.compile(head)


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
    from compiler.plan import render

    base_label = args.base
    head_label = args.head or "work tree"
    try:
        base_src = read_policy_dir(args.policy_dir, args.base)
    except SourceError as e:
        print(f"meshc plan: --base {args.base}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        head_src = read_policy_dir(args.policy_dir, args.head)
    except SourceError as e:
        print(f"meshc plan: {'--head ' + args.head if args.head else 'the work tree'}: {e}", file=sys.stderr)
        return EXIT_ERROR
    base, head, plan = Planner().plan(base_src, head_src, base_label, head_label)
    failed = False
    for side, label, result in (("base", base_label, base), ("head", head_label, head)):
        if result.errors:
            _diagnostics(side, label, result, args.format)
            failed = True
    if failed or plan is None:
        return EXIT_ERROR
    print(render(args.format, plan))
    if args.exit_code and plan.has_changes:
        return EXIT_CHANGES
    return EXIT_OK
