"""Output formats for diagnostics: text, json, github and sarif (cfn-lint's formatters layer)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from compiler.diagnostics import CODES, Diagnostic

__all__ = ["FORMATS", "default_format", "render"]

FORMATS = ("text", "json", "github", "sarif")
_DOCS_URL = "https://github.com/meshc/meshc/blob/main/docs/diagnostics.md"


def default_format() -> str:
    """GitHub annotations under GitHub Actions when no format is given (as yamllint does)."""
    return "github" if os.environ.get("GITHUB_ACTIONS") == "true" else "text"


def _span(d: Diagnostic) -> tuple[int, int, int, int]:
    s = d.span
    return (s.line, s.column, s.end_line, s.end_column) if s else (1, 1, 1, 1)


def _text(diags: list[Diagnostic], summary: dict[str, int]) -> str:
    lines = []
    for d in diags:
        line, col, _, _ = _span(d)
        lines.append(f"{d.file}:{line}:{col}: {d.severity} {d.code} {d.message}")
        for r in d.related:
            lines.append(f"  {r.file}:{r.line}:{r.column}: note: {r.message}")
    errors, warnings = summary["errors"], summary["warnings"]
    verdict = "no problems" if not errors and not warnings else f"{errors} error(s), {warnings} warning(s)"
    lines.append(f"{summary['files']} file(s), {summary['documents']} document(s): {verdict}")
    return "\n".join(lines)


def _json(diags: list[Diagnostic], summary: dict[str, int]) -> str:
    items = []
    for d in diags:
        line, col, eline, ecol = _span(d)
        item: dict[str, Any] = {
            "code": d.code,
            "severity": d.severity,
            "file": d.file,
            "line": line,
            "column": col,
            "end_line": eline,
            "end_column": ecol,
            "message": d.message,
        }
        if d.related:
            item["related"] = [
                {"file": r.file, "line": r.line, "column": r.column, "message": r.message} for r in d.related
            ]
        items.append(item)
    return json.dumps({"diagnostics": items, "summary": summary}, indent=2)


def _escape(s: str, prop: bool = False) -> str:
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return s.replace(":", "%3A").replace(",", "%2C") if prop else s


def _github(diags: list[Diagnostic], summary: dict[str, int]) -> str:
    lines = []
    for d in diags:
        line, col, eline, ecol = _span(d)
        level = {"error": "error", "warning": "warning"}.get(d.severity, "notice")
        msg = d.message + "".join(f"\n{r.file}:{r.line}:{r.column}: {r.message}" for r in d.related)
        lines.append(
            f"::{level} file={_escape(d.file, True)},line={line},col={col},endLine={eline},endColumn={ecol},"
            f"title={d.code}::{_escape(msg)}"
        )
    return "\n".join(lines)


_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _uri(path: str) -> str:
    """A relative path as a SARIF ``uri-reference`` (RFC 3986): spaces, commas, colons... escaped."""
    return quote(path, safe="/")


def _sarif(diags: list[Diagnostic], summary: dict[str, int]) -> str:
    used = sorted({d.code for d in diags})
    rules = [
        {
            "id": c,
            "name": CODES[c].title,
            "shortDescription": {"text": CODES[c].title},
            "fullDescription": {"text": CODES[c].description},
            "helpUri": f"{_DOCS_URL}#{c.lower()}",
            "defaultConfiguration": {"level": _SARIF_LEVEL[CODES[c].severity]},
        }
        for c in used
    ]
    results = []
    for d in diags:
        line, col, eline, ecol = _span(d)
        res: dict[str, Any] = {
            "ruleId": d.code,
            "ruleIndex": used.index(d.code),
            "level": _SARIF_LEVEL[d.severity],
            "message": {"text": d.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": _uri(d.file), "uriBaseId": "%SRCROOT%"},
                        "region": {
                            "startLine": line,
                            "startColumn": col,
                            "endLine": eline,
                            "endColumn": ecol,
                        },
                    }
                }
            ],
        }
        if d.related:
            res["relatedLocations"] = [
                {
                    "id": i,
                    "physicalLocation": {
                        "artifactLocation": {"uri": _uri(r.file), "uriBaseId": "%SRCROOT%"},
                        "region": {"startLine": r.line, "startColumn": r.column},
                    },
                    "message": {"text": r.message},
                }
                for i, r in enumerate(d.related)
            ]
        results.append(res)
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "meshc",
                        "informationUri": _DOCS_URL,
                        "version": "0.1.0",
                        "rules": rules,
                    }
                },
                "results": results,
            }
        ],
    }
    return json.dumps(doc, indent=2)


FORMATS_FN: dict[str, Callable[[list[Diagnostic], dict[str, int]], str]] = {
    "text": _text,
    "json": _json,
    "github": _github,
    "sarif": _sarif,
}


def render(fmt: str, diags: list[Diagnostic], summary: dict[str, int]) -> str:
    return FORMATS_FN[fmt](diags, summary)
