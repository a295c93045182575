"""The ``meshc`` command line.

Every subcommand imports what it needs when it runs, so ``meshc sidecar`` loads the runtime and
nothing of the compiler beyond this module (DESIGN §2). Exit codes (DESIGN §7): 0 success,
1 findings (errors, or warnings with ``--strict``) or, for ``plan --exit-code``, changes, 2 the
command could not do its job. They never depend on the output format.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

_DESCRIPTION = """\
meshc: a declarative, GitOps service mesh.

Policies (Kuma's kuma.io/v1alpha1 dialect plus meshc's Service catalog) live in a Git repo.
`validate` checks them the way CI would, with every finding at its file, line and column;
`compile` turns them into immutable, content-addressed routing bundles; the control plane pushes
changed bundles to the sidecars, which enforce them.
"""

_EPILOG = """\
exit codes: 0 success; 1 findings (errors, or warnings with --strict); 2 usage, I/O or a
plan side that does not compile. Run `meshc COMMAND --help` for each command.
"""


def _add_diag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("policy_dir", metavar="DIR", help="the policy directory (every *.yaml/*.yml under it)")
    p.add_argument(
        "--ref",
        metavar="REV",
        help="read DIR as committed at this Git revision (branch, tag, sha, HEAD~1) instead of the work tree",
    )
    p.add_argument(
        "--format",
        choices=("text", "json", "github", "sarif"),
        help="diagnostics format (default: text; github under GitHub Actions)",
    )
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")


def _add_compile_args(p: argparse.ArgumentParser) -> None:
    _add_diag_args(p)
    p.add_argument("--out", default="out", help="output directory (default: out)")


def _add_schemas_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="schemas", help="output directory (default: schemas)")
    p.add_argument("--check", action="store_true", help="only check that they are up to date")


def _run_validate(args: argparse.Namespace) -> int:
    from compiler.commands import validate

    return validate(args)


def _run_compile(args: argparse.Namespace) -> int:
    from compiler.commands import compile_cmd

    return compile_cmd(args)


def _run_schemas(args: argparse.Namespace) -> int:
    from compiler.schemagen import write_schemas

    changed = write_schemas(args.out, check=args.check)
    if args.check:
        if changed:
            print(f"schemas out of date: {', '.join(changed)}; run `meshc schemas`", file=sys.stderr)
            return EXIT_FINDINGS
        print("schemas are up to date")
        return EXIT_OK
    print(f"wrote {len(changed)} changed schema file(s) to {args.out}")
    return EXIT_OK


def _run_sidecar(args: argparse.Namespace) -> int:
    from runtime.cli import sidecar_main

    return int(sidecar_main(args.rest))


def _run_gateway(args: argparse.Namespace) -> int:
    from runtime.cli import gateway_main

    return int(gateway_main(args.rest))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshc",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]] = [
        (
            "validate",
            "check a policy directory; print every finding",
            "Parse and check every policy in DIR as one self-contained set: YAML, shapes, Kuma's\n"
            "validator rules, references to services and subsets, conflicts of equal specificity,\n"
            "shadowed matches, mTLS and permissions. Prints `file:line:col: severity CODE message`\n"
            "and a summary line. Codes are listed in docs/diagnostics.md.",
            _add_diag_args,
            _run_validate,
        ),
        (
            "compile",
            "validate, then write bundles and a release",
            "Compile DIR (or DIR at --ref) into OUT/bundles/<sha256>.json (one per mesh, one per\n"
            "service and gateway; written once, never changed) and OUT/releases/<id>.json (the\n"
            "`bundles` map and the provenance of each). A compile with errors writes nothing.",
            _add_compile_args,
            _run_compile,
        ),
        (
            "schemas",
            "regenerate the JSON Schemas in schemas/",
            "Write a JSON Schema per policy kind and one for the bundle, generated from the models.\n"
            "Editors use them through a `# yaml-language-server: $schema=...` first line.",
            _add_schemas_args,
            _run_schemas,
        ),
    ]
    for name, short, long, add, run in commands:
        p = sub.add_parser(
            name, help=short, description=long, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add(p)
        p.set_defaults(run=run)
    for name, short, run in (
        (
            "sidecar",
            "run a data plane proxy beside a service instance (see `meshc sidecar --help`)",
            _run_sidecar,
        ),
        ("gateway", "run the ingress gateway (see `meshc gateway --help`)", _run_gateway),
    ):
        p = sub.add_parser(name, help=short, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=run)
    _extend(sub)
    return parser


def _extend(sub: Any) -> None:
    """Subcommands that live in their own modules register here (plan, controlplane, status...).

    Imported here, not at the top: ``meshc sidecar`` never builds this parser, so it loads none
    of them.
    """
    from compiler import canary_cli, controlplane_cli, explain_cli, migrate_cli, plan_args
    from compiler.kube import cli as kube_cli

    plan_args.register(sub)
    controlplane_cli.register(sub)
    kube_cli.register(sub)
    migrate_cli.register(sub)
    explain_cli.register(sub)
    canary_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # sidecar/gateway take their own flags: hand them over before any compiler module loads.
    if args_list and args_list[0] in ("sidecar", "gateway"):
        ns = argparse.Namespace(rest=args_list[1:])
        return _run_sidecar(ns) if args_list[0] == "sidecar" else _run_gateway(ns)
    parser = _parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `meshc status | head -1`: the reader is gone. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit as a closed pipe does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
