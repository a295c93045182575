"""``meshc plan DIR --base REV [--head REV]``: the I/O side of ``compiler.plan``.

Its flags live in ``compiler.plan_args`` (light, so ``meshc --help`` and ``meshc status`` do
not load the compiler).

Both sides are read from the Git object store (``git ls-tree`` + ``git cat-file``; the head from
the work tree when ``--head`` is not given) and compiled in memory: nothing is written into the
repository, the work tree or an output directory. Files are parsed once per Git blob id, so the
files the two sides share (all but the edited ones) are parsed once.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import replace

from compiler.incremental import IncrementalCompiler
from compiler.pipeline import ParsedFile, compile_parsed, parse_files
from compiler.plan import Plan, make_plan
from compiler.result import CompileResult
from compiler.source import SourceError, SourceSet, read_policy_dir

__all__ = ["Planner", "compile_pair", "run"]

EXIT_OK, EXIT_CHANGES, EXIT_ERROR = 0, 1, 2


class Planner:
    """Compiles the two sides of plans; keeps state between calls, so a long-lived process plans warm.

    * Results are kept by the content of the side (every path and Git blob id): a base planned
      again is not recompiled.
    * ``IncrementalCompiler`` compiles the sides: the head is then an incremental step from the
      base (only the files that differ are re-parsed, only the bundles they can affect rebuilt).
      It gets no output directory: a plan writes nothing.
    * With ``incremental=False`` files are parsed once per Git blob id (a file both sides share
      is parsed once) and each side is compiled from the parsed files.
    """

    def __init__(self, incremental: bool = True) -> None:
        self._inc = IncrementalCompiler() if incremental else None
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
        inc = self._inc
        result = _from_incremental(inc, src) if inc is not None else self._compile_parsed(src)
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


def _from_incremental(inc: IncrementalCompiler, src: SourceSet) -> CompileResult:
    result = inc.update(src).result
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
