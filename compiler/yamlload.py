"""YAML 1.2 loading with one semantics and two speeds (DESIGN §3).

* ``load_fast`` reads every file with libyaml (PyYAML's C parser) into plain data. Scalars are
  resolved by the YAML 1.2 core-schema table below, not PyYAML's 1.1 rules (``yes`` stays a
  string, ``010`` is ten), and duplicate keys, explicit tags and aliases beyond a budget raise.
* ``load_positions`` reads a file with ruamel.yaml's composer, which keeps start and end marks on
  every node, resolves scalars with the *same* table and reports every duplicate key. It runs
  only for files that need positions (a finding to locate) or that the fast path refused.

Whatever the fast path accepts, the slow path accepts with equal data (a hypothesis test holds
them to it); a file the fast path refuses is always re-read slowly, so its diagnostics come from
the position-keeping parser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
import yaml.cyaml
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.tag import Tag

from compiler.diagnostics import Diagnostic, Loc, Span

__all__ = ["MAX_FILE_BYTES", "MAX_NODES", "Positions", "load_fast", "load_positions"]

MAX_FILE_BYTES = 4 * 1024 * 1024
"""A policy file larger than this is refused (E0004) before it is parsed."""
MAX_NODES = 200_000
"""Nodes a file may expand to through aliases (the billion-laughs bound)."""

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_PLAIN = "!meshc/plain"
"""What both loaders' resolvers call an untagged plain scalar, resolved later by ``resolve_plain``.

Only untagged plain scalars go through the 1.2 table; quoted scalars, the non-specific ``!`` tag
and an explicit ``!!str`` are text. Any other explicit tag (``!!int``, ``!!binary``, ``!custom``)
is refused by the fast path and reported (E1002) by the slow one.
"""
_RESOLVERS: list[tuple[str, re.Pattern[str]]] = [
    ("null", re.compile(r"^(?:~|null|Null|NULL|)$")),
    ("bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")),
    ("int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")),
    (
        "float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
    ),
]


def resolve_plain(text: str) -> Any:
    """The YAML 1.2 core schema for a plain (unquoted, untagged) scalar (memoised: policy files
    repeat the same keys and values thousands of times, and the results are immutable)."""
    try:
        return _RESOLVED[text]
    except KeyError:
        pass
    value = _resolve_plain(text)
    if len(_RESOLVED) >= _RESOLVED_MAX:
        _RESOLVED.clear()
    _RESOLVED[text] = value
    return value


_RESOLVED: dict[str, Any] = {}
_RESOLVED_MAX = 1 << 16


def _resolve_plain(text: str) -> Any:
    for kind, rx in _RESOLVERS:
        if rx.match(text):
            if kind == "null":
                return None
            if kind == "bool":
                return text.lower() == "true"
            if kind == "int":
                if text.startswith("0o"):
                    return int(text[2:], 8)
                if text.startswith("0x"):
                    return int(text[2:], 16)
                try:
                    return int(text, 10)
                except ValueError:  # longer than Python's int-parsing limit: keep it as text
                    return text
            low = text.lower()
            if low.endswith("inf"):
                return -math.inf if low.startswith("-") else math.inf
            if low.endswith("nan"):
                return math.nan
            return float(text)
    return text


class _TooBig(Exception):
    def __init__(self) -> None:
        super().__init__()
        self.key: Any = None
        """The innermost mapping key whose value was being expanded (where to point)."""


class _Dup(Exception):
    pass


# --- fast path: libyaml -------------------------------------------------------------------------


_SCALAR, _SEQUENCE = yaml.ScalarNode, yaml.SequenceNode


class _Resolver12(yaml.resolver.BaseResolver):
    """Tags every untagged plain scalar ``_PLAIN``; ``_FastLoader`` resolves it with the 1.2 table.

    libyaml reports a plain scalar's style as ``''`` (PyYAML's Python parser says ``None``), so the
    style cannot tell plain from tagged: the resolver, called only for untagged nodes, can.
    """

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        # Called once per node, so spelled out: what ``BaseResolver.resolve`` gives with no
        # implicit or path resolvers (a quoted scalar is a str, a collection its default tag).
        if kind is _SCALAR:
            if implicit[0]:
                return _PLAIN
            # A bare `!` with no value: libyaml and ruamel disagree on it; refuse it here.
            return _STR if implicit[1] else "!meshc/unresolved"
        return _SEQ if kind is _SEQUENCE else _MAP


class _FastConstructor(yaml.constructor.BaseConstructor):
    def construct_document(self, node: Any) -> Any:
        self._budget = MAX_NODES
        return self._build(node)

    def _build(self, node: Any) -> Any:
        self._budget -= 1
        if self._budget < 0:
            raise _TooBig
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _PLAIN:
                return resolve_plain(node.value)
            if node.tag != _STR:
                raise yaml.constructor.ConstructorError(
                    None, None, f"tag {node.tag} is not allowed", node.start_mark
                )
            return node.value
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                raise yaml.constructor.ConstructorError(
                    None, None, f"tag {node.tag} is not allowed", node.start_mark
                )
            return [self._build(n) for n in node.value]
        if node.tag != _MAP:
            raise yaml.constructor.ConstructorError(
                None, None, f"tag {node.tag} is not allowed", node.start_mark
            )
        out: dict[Any, Any] = {}
        scalar, resolve = yaml.ScalarNode, resolve_plain
        for k, v in node.value:
            # Plain scalars (nearly every key and most values) are resolved inline: this loop is
            # the hot path of a cold compile. Collections recurse and check the node budget.
            if k.__class__ is scalar and k.tag == _PLAIN:
                self._budget -= 1
                key = resolve(k.value)
            else:
                key = self._build(k)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a scalar", k.start_mark)
            if key in out:
                raise _Dup
            if v.__class__ is scalar and v.tag == _PLAIN:
                self._budget -= 1
                out[key] = resolve(v.value)
            else:
                out[key] = self._build(v)
        return out


class _FastLoader(yaml.cyaml.CParser, _FastConstructor, _Resolver12):  # type: ignore[misc,name-defined]
    def __init__(self, stream: bytes) -> None:
        yaml.cyaml.CParser.__init__(self, stream)  # type: ignore[attr-defined]
        _FastConstructor.__init__(self)
        _Resolver12.__init__(self)
        # The composer calls these around every node, for path resolvers, which this loader has
        # none of: C builtins that take the same arguments and do nothing cost a fraction of the
        # Python methods (a cold compile of 10,000 services composes 1.8 million nodes).
        self.descend_resolver = slice  # type: ignore[method-assign,assignment]  # (parent, index)
        self.ascend_resolver = tuple  # type: ignore[method-assign,assignment]  # ()


_DIVERGENT = re.compile(
    rb"\t|\?|^%|[|>][0-9+-]*#|[&*][A-Za-z0-9_-]*[:%@`]|\xc2\x85|\xe2\x80[\xa8\xa9]|\xef\xbb\xbf", re.M
)
"""Bytes around which libyaml (YAML 1.1) and ruamel (1.2) read input differently (found by the
property tests): tabs, ``?`` (complex keys, plain scalars starting with ``?``), directives, a block
scalar header run into a comment, an anchor or alias name that libyaml ends at ``:`` (ruamel reads
on), the 1.1-only line breaks NEL, LS and PS, and byte order marks. A file with any of them takes
the careful path, which decides; it costs speed only for the rare file that has one."""


def load_fast(data: bytes) -> list[Any] | None:
    """Every document of a file as plain data, or None when the file needs the careful path."""
    if len(data) > MAX_FILE_BYTES or _DIVERGENT.search(data):
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    loader = _FastLoader(data)
    try:
        docs = []
        while loader.check_node():
            docs.append(loader.construct_document(loader.get_node()))
        return docs
    except (yaml.YAMLError, _TooBig, _Dup, RecursionError, ValueError):
        return None
    finally:
        loader.dispose()


# --- slow path: ruamel composer with marks ------------------------------------------------------


def _span(node: Node) -> Span:
    s, e = node.start_mark, node.end_mark
    return Span(s.line + 1, s.column + 1, e.line + 1, e.column + 1)


@dataclass
class Positions:
    """One file as composed nodes: data for checks, spans for diagnostics."""

    file: str
    docs: list[Node]

    def locate(self, loc: Loc) -> Span:
        """The span of the key or value at ``loc.path``, else of its nearest ancestor."""
        if loc.doc >= len(self.docs):
            return Span()
        node = self.docs[loc.doc]
        key_node: Node | None = None
        for i, step in enumerate(loc.path):
            nxt = _child(node, step)
            if nxt is None:
                # A missing key: point at the parent's key (or the parent) that should hold it.
                return _span(key_node) if key_node is not None else _span(node)
            key_node, node = nxt
            if loc.on_key and i == len(loc.path) - 1:
                return _span(key_node)
        if isinstance(node, MappingNode | SequenceNode) and key_node is not None and not loc.on_key:
            return _span(key_node)
        if _empty(node) and key_node is not None and key_node is not node:
            return _span(key_node)  # `key:` with no value: the empty scalar starts on the next line
        return _span(node)


def _empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.value == "" and node.style is None


def _child(node: Node, step: str | int) -> tuple[Node, Node] | None:
    if isinstance(node, MappingNode):
        found = None
        for k, v in node.value:
            if isinstance(k, ScalarNode) and (k.value == step or str(step) == k.value):
                found = (k, v)  # the last one wins, as in the data
        return found
    if isinstance(node, SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
        item = node.value[step]
        return item, item
    return None


class _PlainResolver(VersionedResolver):
    """ruamel's resolver, except that an untagged plain scalar is tagged ``_PLAIN`` (see above)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is ScalarNode and implicit[0]:
            return Tag(suffix=_PLAIN)
        return super().resolve(kind, value, implicit)


class _Builder:
    """Node tree -> plain data, collecting duplicate keys and bounding alias expansion."""

    def __init__(self, file: str, doc: int) -> None:
        self.file, self.doc = file, doc
        self.budget = MAX_NODES
        self.findings: list[Diagnostic] = []
        self.bad_tag = False

    def build(self, node: Node, path: tuple[str | int, ...] = ()) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _TooBig
        tag = str(node.tag) if node.tag is not None else None
        if isinstance(node, ScalarNode):
            if tag == _PLAIN:
                return resolve_plain(node.value)
            if tag not in (_STR, "!"):
                self._tag(node, path, str(tag))
            if node.style == ">":  # ruamel marks folds with BEL to round-trip them
                return str(node.value).replace("\a", "")
            return node.value
        if isinstance(node, SequenceNode):
            if tag not in (_SEQ, "!"):
                self._tag(node, path, str(tag))
            return [self.build(n, (*path, i)) for i, n in enumerate(node.value)]
        if tag not in (_MAP, "!"):
            self._tag(node, path, str(tag))
        out: dict[Any, Any] = {}
        first: dict[Any, Node] = {}
        assert isinstance(node, MappingNode)
        for k, v in node.value:
            key = self.build(k, path)
            if isinstance(key, list | dict):
                self.findings.append(
                    Diagnostic("E1002", "a mapping key must be a scalar", Loc(self.file, self.doc), _span(k))
                )
                continue
            if key in first:
                prev = _span(first[key])
                self.findings.append(
                    Diagnostic(
                        "E0002",
                        f"duplicate key {key!r} (first at line {prev.line}); remove one of them",
                        Loc(self.file, self.doc),
                        _span(k),
                    )
                )
            else:
                first[key] = k
            try:
                out[key] = self.build(v, (*path, str(key)))
            except _TooBig as e:
                if e.key is None:
                    e.key = k
                raise
        return out

    def _tag(self, node: Node, path: tuple[str | int, ...], tag: str) -> None:
        self.findings.append(
            Diagnostic(
                "E1002",
                f"explicit tag {tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in policy YAML; "
                "remove it",
                Loc(self.file, self.doc),
                _span(node),
            )
        )


def load_positions(file: str, data: bytes) -> tuple[Positions | None, list[Any], list[Diagnostic]]:
    """Compose a file keeping marks; returns positions, the documents' data and YAML findings."""
    if len(data) > MAX_FILE_BYTES:
        return None, [], [_whole(file, "E0004", f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        msg = f"byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8"
        return None, [], [Diagnostic("E0003", msg, Loc(file), Span(line, col, line, col + 1))]
    y = YAML(typ="rt")
    y.Resolver = _PlainResolver
    y.allow_duplicate_keys = True
    nodes: list[Node] = []
    try:
        nodes.extend(_compose_all(y, text))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and (mark is None or mark.index >= len(text.rstrip())):
            mark = e.context_mark  # "found the end of the file": point at what is left open
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = (e.problem or "syntax error").strip()
        ctx = f" ({e.context.strip()})" if e.context else ""
        diag = Diagnostic("E0001", f"YAML syntax: {problem}{ctx}", Loc(file), Span(line, col, line, col + 1))
        return None, [], [diag]
    except (YAMLError, RecursionError, ValueError) as e:
        return None, [], [_whole(file, "E0001", f"YAML error: {e}")]
    docs: list[Any] = []
    findings: list[Diagnostic] = []
    for i, node in enumerate(nodes):
        b = _Builder(file, i)
        try:
            docs.append(b.build(node))
        except (_TooBig, RecursionError) as e:
            where = e.key if isinstance(e, _TooBig) and e.key is not None else node
            findings.append(
                Diagnostic(
                    "E0004",
                    f"document expands to more than {MAX_NODES} nodes through aliases (an alias bomb?); "
                    "remove the aliases",
                    Loc(file, i),
                    _span(where),
                )
            )
            docs.append(None)
        findings.extend(b.findings)
    return Positions(file, nodes), docs, findings


def _compose_all(y: YAML, text: str) -> Iterator[Node]:
    yield from y.compose_all(text)


def _whole(file: str, code: str, message: str) -> Diagnostic:
    return Diagnostic(code, message, Loc(file), Span(1, 1, 1, 1))
