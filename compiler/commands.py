"""``meshc validate`` and ``meshc compile``: the CI step, and the step that produces bundles."""

from __future__ import annotations

import argparse
import sys

from compiler.report import default_format, render
from compiler.result import CompileResult
from compiler.source import SourceError, read_policy_dir

__all__ = ["compile_cmd", "run_compile", "validate"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def run_compile(args: argparse.Namespace) -> CompileResult | None:
    from compiler.incremental import compile_cached

    try:
        src = read_policy_dir(args.policy_dir, args.ref)
    except SourceError as e:
        print(f"meshc: {e}", file=sys.stderr)
        return None
    return compile_cached(src, args.policy_dir)


def _report(args: argparse.Namespace, result: CompileResult) -> int:
    fmt = args.format or default_format()
    summary = {
        "files": result.files,
        "documents": result.documents,
        "errors": result.errors,
        "warnings": result.warnings,
    }
    text = render(fmt, result.diagnostics, summary)
    if text:
        print(text)
    if result.errors or (args.strict and result.warnings):
        return EXIT_FINDINGS
    return EXIT_OK


def validate(args: argparse.Namespace) -> int:
    result = run_compile(args)
    if result is None:
        return EXIT_ERROR
    return _report(args, result)


def compile_cmd(args: argparse.Namespace) -> int:
    from compiler.output import OutputError, write_release

    result = run_compile(args)
    if result is None:
        return EXIT_ERROR
    code = _report(args, result)
    if code != EXIT_OK:
        return code
    try:
        written, kept = write_release(result, args.out)
    except OutputError as e:
        print(f"meshc: {e}", file=sys.stderr)
        return EXIT_ERROR
    if (args.format or default_format()) == "text":
        print(
            f"release {result.release_id[:12]}: {len(result.bundles)} bundle(s), {written} written, "
            f"{kept} unchanged -> {args.out}/releases/{result.release_id}.json"
        )
    return EXIT_OK
