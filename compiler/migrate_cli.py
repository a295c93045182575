"""``meshc convert DIR [--out DIR2]``: rewrite a repo's legacy policies as targetRef policies.

The repo must validate first (a broken policy has no meaning to keep). Each YAML document is
converted on its own (``compiler.migrate``) or left byte for byte as it was: documents that are
not legacy policies, and policies with no exact translation (named with the reason). The
comments above a converted document are kept, its editor modeline pointed at the new kind's
schema; comments inside it are not (the document is written anew).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruamel.yaml import YAML

from compiler.yamledit import chunks as doc_chunks
from compiler.yamledit import split_head
from compiler.yamlload import load_fast

if TYPE_CHECKING:
    from compiler.migrate import Catalog

__all__ = ["convert_repo", "register", "run"]

_MODELINE = re.compile(r"(schemas/policy/)[a-z]+(\.schema\.json)")


def _dump(data: dict[str, Any]) -> str:
    y = YAML()
    y.indent(mapping=2, sequence=4, offset=2)
    y.default_flow_style = False
    y.width = 110
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def _catalog(docs: list[Any]) -> Catalog:
    """Service protocols and gateway names, from the documents of either form."""
    from compiler.migrate import Catalog as MigrateCatalog

    protocols: dict[str, str] = {}
    gateways: dict[str, str] = {}
    for d in docs:
        if not isinstance(d, dict):
            continue
        meta = d.get("metadata")
        name = str(meta.get("name") if isinstance(meta, dict) else d.get("name"))
        spec = d.get("spec", d)
        kind = d.get("kind", d.get("type"))
        if not isinstance(spec, dict):
            continue
        if kind == "Service":
            protocols[name] = str(spec.get("protocol", "http"))
        elif kind == "MeshGateway":
            for sel in spec.get("selectors") or []:
                service = (sel.get("match") or {}).get("kuma.io/service") if isinstance(sel, dict) else None
                if isinstance(service, str):
                    gateways[service] = name
    return MigrateCatalog(protocols, gateways)


def convert_repo(files: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Path -> text of a validated repo, to path -> new text and one report line per policy."""
    from compiler.migrate import NotExact, convert_document

    parsed = {
        p: [(n, c, load_fast(split_head(c)[1].encode())) for n, c in doc_chunks(t)] for p, t in files.items()
    }
    docs = [d[0] for chunks in parsed.values() for _, _, d in chunks if d]
    cat = _catalog(docs)
    out: dict[str, str] = {}
    report: list[str] = []
    for path, chunks in parsed.items():
        texts = []
        for line, chunk, data in chunks:
            doc = data[0] if data and len(data) == 1 else None
            if not isinstance(doc, dict):
                texts.append(chunk)
                continue
            kind = doc.get("kind", doc.get("type"))
            ref = f"{path}:{line}: {kind} {(doc.get('metadata') or {}).get('name', doc.get('name'))!r}"
            try:
                conv = convert_document(doc, cat)
            except NotExact as e:
                report.append(f"{ref} kept: no exact translation: {e}")
                texts.append(chunk)
                continue
            if conv is None:
                texts.append(chunk)
                continue
            head, _ = split_head(chunk)
            head = _MODELINE.sub(rf"\g<1>{conv.kind.lower()}\g<2>", head)
            texts.append(head + _dump(conv.data) + "".join("---\n" + _dump(x) for x in conv.also))
            report.append(f"{ref} -> {' + '.join([conv.kind, *(x['kind'] for x in conv.also)])}")
        out[path] = "".join(texts)
    return out, report


def _relative(display: str, repo_root: Path | None, policy_dir: Path) -> str:
    """A source file's path below the policy directory (display paths start at the repo root)."""
    if repo_root is None:
        return display
    return str((repo_root / display).resolve().relative_to(policy_dir))


def run(args: argparse.Namespace) -> int:
    # the compiler proper loads only when the command runs: building meshc's parser (every
    # command does) must stay light
    from compiler.pipeline import compile_sources
    from compiler.report import default_format, render
    from compiler.source import SourceError, read_policy_dir

    src_dir = Path(args.policy_dir)
    try:
        src = read_policy_dir(src_dir)
    except SourceError as e:
        print(f"meshc: {e}", file=sys.stderr)
        return 2
    result = compile_sources(src)
    if result.errors:
        summary = {"files": result.files, "documents": result.documents}
        summary |= {"errors": result.errors, "warnings": result.warnings}
        print(render(default_format(), result.diagnostics, summary), file=sys.stderr)
        print(f"meshc convert: {result.errors} error(s); fix them first (meshc validate)", file=sys.stderr)
        return 1
    root = src_dir.resolve()
    files = {_relative(f.path, src.repo_root, root): f.data.decode("utf-8") for f in src.files}
    converted, report = convert_repo(files)
    out_dir = Path(args.out) if args.out else src_dir
    for rel, text in converted.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    for line in report:
        print(line)
    done = sum(" -> " in r for r in report)
    print(f"{done} policy(ies) converted, {len(report) - done} kept -> {out_dir}")
    return 0


def register(sub: Any) -> None:
    """Add ``convert`` to ``meshc``'s subparsers (called by ``compiler.cli``)."""
    p = sub.add_parser(
        "convert",
        help="rewrite legacy policies (TrafficRoute, Timeout...) as targetRef policies (MeshHTTPRoute...)",
        description=__doc__,
        epilog="exit codes: 0 converted (what was kept is listed); 1 the repo has errors; 2 unreadable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("policy_dir", metavar="DIR", help="the policy directory")
    p.add_argument(
        "--out", metavar="DIR2", help="write the converted repo here (default: rewrite DIR in place)"
    )
    p.set_defaults(run=run)
