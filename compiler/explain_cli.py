"""``meshc explain SERVICE [DIR] [--ref REV] [--format text|json]``: why a service's bundle is what it is.

Offline, from a compile of DIR (or DIR at --ref): for the service's inbound side, each outbound
destination and its gateway (when it is one), the policies that shape each bundle field, the one
that wins first, with file:line; the rules the bundle holds (the merged result); and the policies
that lost (shadowed) and why. Both dialects, and repos that mix them. The JSON is documented in
docs/explain.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

__all__ = ["register", "render_text", "run"]

WIDTH = 100
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _where(p: dict[str, Any]) -> str:
    return f"{p['file']}:{p['line']}"


def _name(p: dict[str, Any]) -> str:
    return f"{p['kind']} {p['name']}"


def _wrap(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(
        text, WIDTH, initial_indent=pad, subsequent_indent=pad + "  ", break_on_hyphens=False
    )


def _tags(t: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(t.items()))


def _policy_line(i: int, p: dict[str, Any]) -> list[str]:
    head = f"{i}. {_name(p)}  {_where(p)}"
    extra = []
    if "item" in p:
        extra.append(f"targetRef {p['targetRef']}, {p['item']}")
    if p.get("when"):
        extra.append(f"when {_tags(p['when'])}")
    if p.get("peer"):
        extra.append(f"from {_tags(p['peer'])}")
    if p.get("rule") is not None:
        extra.append(f"rule {p['rule']}")
    lines = _wrap(head + (f"  ({'; '.join(extra)})" if extra else ""), 6)
    if p.get("sets"):
        lines += _wrap("sets " + ", ".join(p["sets"]), 9)
    for o in p.get("overridden") or ():
        lines += _wrap(f"{o['field']} overridden by {o['by']}: {o['reason']}", 9)
    return lines


def _section_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"    {s['field']}"]
    if not s["policies"] and not s["shadowed"]:
        if s["rules"]:
            lines[0] += "  (meshc default; no policy)"
        else:
            lines[0] += "  (no rule)"
    for i, p in enumerate(s["policies"], 1):
        lines += _policy_line(i, p)
    for sh in s["shadowed"]:
        code = f" [{sh['code']}]" if sh.get("code") else ""
        lines += _wrap(
            f"shadowed: {_name(sh)}  {_where(sh)} by {_name(sh['by'])}  {_where(sh['by'])}: "
            f"{sh['reason']}{code}",
            6,
        )
    for i, rule in enumerate(s["rules"]):
        label = " (meshc default)" if i == s.get("default_rule") else ""
        body = json.dumps(rule, sort_keys=True, separators=(", ", ": "))
        lines += _wrap(f"rule {i}{label}: {body}", 6)
    return lines


def render_text(x: dict[str, Any]) -> str:
    """The explanation for a reader, at most 100 columns (JSON values wrap at their spaces)."""
    digest = (x.get("digest") or "")[:12]
    out = [f"{x['bundle']}  digest {digest}  (service at {_where(x['service_doc'])})"]
    out.append("each field: its policies, the one that wins first; shadowed ones; the bundle's rules")
    if x["inbound"] is not None:
        out += ["", "inbound"]
        for s in x["inbound"]:
            out += _section_lines(s)
    for o in x["outbound"]:
        via = "" if o["source"] != "*" else "  (mesh bundle: no policy names this service as a source)"
        out += ["", f"outbound -> {o['destination']}{via}"]
        for s in o["kinds"]:
            out += _section_lines(s)
    if x["gateway"] is not None:
        out += ["", "gateway"]
        for p in x["gateway"]["policies"]:
            out += _wrap(f"{_name(p)}  {_where(p)}", 4)
        for lst in x["gateway"]["listeners"]:
            out += [f"    listener {lst['protocol']} :{lst['port']}  (rules in the order they are tried)"]
            for r in lst["rules"]:
                match = json.dumps(r["match"], sort_keys=True, separators=(", ", ": "))
                out += _wrap(f"{r['rule']}. {_name(r)}  {_where(r)}  match {match}", 6)
    if x["notes"]:
        out += ["", "notes"]
        for n in x["notes"]:
            out += _wrap(f"{n['file']}:{n['line']}: {n['code']} {n['message']}", 2)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from compiler.explain import ExplainError, explain, find_service, line_finder
    from compiler.pipeline import compile_resolved
    from compiler.report import default_format, render
    from compiler.source import SourceError, read_policy_dir

    try:
        src = read_policy_dir(args.policy_dir, args.ref)
    except SourceError as e:
        print(f"meshc: {e}", file=sys.stderr)
        return EXIT_ERROR
    result, resolved, parsed = compile_resolved(src)
    if result.errors:
        summary = {"files": result.files, "documents": result.documents}
        summary |= {"errors": result.errors, "warnings": result.warnings}
        print(render(default_format(), result.diagnostics, summary), file=sys.stderr)
        print(f"meshc explain: {result.errors} error(s); fix them first (meshc validate)", file=sys.stderr)
        return EXIT_FINDINGS
    try:
        mesh, service = find_service(resolved, args.service)
    except ExplainError as e:
        print(f"meshc explain: {e}", file=sys.stderr)
        return EXIT_ERROR
    x = explain(result, resolved, mesh, service, line_finder(parsed), args.to)
    if args.to is not None and not x["outbound"]:
        print(f"meshc explain: {service} has no outbound destination {args.to!r}", file=sys.stderr)
        return EXIT_ERROR
    if args.format == "json":
        print(json.dumps(x, indent=2, sort_keys=True))
    else:
        print(render_text(x))
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``explain`` to ``meshc``'s subparsers (called by ``compiler.cli``)."""
    p = sub.add_parser(
        "explain",
        help="which policies shape a service's bundle, in precedence order, and which lost",
        description=__doc__,
        epilog="exit codes: 0 explained; 1 the repo has errors; 2 unknown service or unreadable DIR.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("service", metavar="SERVICE", help="the service (NAME, or MESH/NAME)")
    p.add_argument(
        "policy_dir",
        metavar="DIR",
        nargs="?",
        default="policies",
        help="the policy directory (default: policies)",
    )
    p.add_argument("--ref", metavar="REV", help="read DIR as committed at this Git revision")
    p.add_argument("--to", metavar="DEST", help="only this outbound destination")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    p.set_defaults(run=run)
