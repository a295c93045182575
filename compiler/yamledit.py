"""Edits to policy YAML that keep everything else of the file: comments, order, quoting, the other
documents. ``meshc convert`` rewrites documents this way, and a Canary's promotion commit
(``controlplane --promote-commit``) changes nothing but a route's weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

__all__ = ["EditError", "chunks", "set_weights", "split_head"]

_DOC_SEP = re.compile(r"^---[ \t]*(?:#.*)?$")
_SCALAR = re.compile(r"""["']?[0-9]+["']?""")


class EditError(ValueError):
    """The document or a path in it is not where the compile said (a clear message, no edit)."""


def chunks(text: str) -> list[tuple[int, str]]:
    """The file's documents as (first line, text), separators kept with the document they open."""
    out: list[tuple[int, list[str]]] = [(1, [])]
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if _DOC_SEP.match(line.rstrip("\r\n")) and any(
            x.strip() and not x.lstrip().startswith("#") for x in out[-1][1]
        ):
            out.append((n, []))
        out[-1][1].append(line)
    return [(n, "".join(lines)) for n, lines in out]


def split_head(chunk: str) -> tuple[str, str]:
    """The leading separator, comment and blank lines, and the rest."""
    lines = chunk.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (
        not lines[i].strip() or lines[i].lstrip().startswith("#") or _DOC_SEP.match(lines[i].rstrip())
    ):
        i += 1
    return "".join(lines[:i]), "".join(lines[i:])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _step(node: Any, key: str | int) -> Any:
    if isinstance(key, int):
        if not isinstance(node, list) or key >= len(node):
            raise EditError(f"no item {key}")
        return node[key]
    if not isinstance(node, dict):
        raise EditError(f"no key {key!r}")
    for spelling in (key, _snake(key)):  # camelCase or proto snake_case, as the parser accepts
        if spelling in node:
            return node[spelling]
    raise EditError(f"no key {key!r}")


def set_weights(
    text: str, index: int, edits: Sequence[tuple[Sequence[str | int], Sequence[int]]], kind: str, name: str
) -> str:
    """The file with document ``index``'s weighted lists (each a path to a list whose items have a
    ``weight``) set to the given weights; the document must be the ``kind`` named ``name``."""
    parts = chunks(text)
    if index >= len(parts):
        raise EditError(f"the file has no document {index + 1}")
    first_line, chunk = parts[index]
    head, body = split_head(chunk)
    doc = YAML().load(body)  # round-trip: it knows each value's line and column
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    got_name = (meta or {}).get("name") if isinstance(meta, dict) else doc.get("name")
    if not isinstance(doc, dict) or doc.get("kind", doc.get("type")) != kind or got_name != name:
        raise EditError(f"document {index + 1} (line {first_line}) is not {kind} {name!r}")
    spots: list[tuple[int, int, int]] = []
    for path, weights in edits:
        node: Any = doc
        try:
            for key in path:
                node = _step(node, key)
        except EditError as e:
            raise EditError(f"{kind} {name!r}: {'.'.join(map(str, path))}: {e}") from None
        if not isinstance(node, list) or len(node) != len(weights):
            raise EditError(f"{kind} {name!r}: {'.'.join(map(str, path))} is not a list of {len(weights)}")
        for item, w in zip(node, weights, strict=True):
            if not isinstance(item, CommentedMap) or "weight" not in item:
                raise EditError(
                    f"{kind} {name!r}: a target without an explicit weight; set the weights by hand"
                )
            line, col = item.lc.value("weight")
            spots.append((line, col, int(w)))
    lines = body.splitlines(keepends=True)
    for line, col, w in sorted(spots, reverse=True):  # the scalar only: nothing else of the text moves
        text_line = lines[line]
        m = _SCALAR.match(text_line, col)
        if m is None:
            raise EditError(f"{kind} {name!r}: the weight at line {first_line + line} is not a plain number")
        lines[line] = text_line[: m.start()] + str(w) + text_line[m.end() :]
    parts[index] = (first_line, head + "".join(lines))
    return "".join(c for _, c in parts)
