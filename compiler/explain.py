"""``meshc explain``: which policies shape one service's bundle, in precedence order, and which lost.

Everything is read from a compile (``pipeline.compile_resolved``), never re-resolved: the entries
the resolver indexed for each bundle field, split as ``build`` takes them (``resolve.split_ranked``:
the listed rules, most specific first, and those after the first unconditional one, shadowed by
it), the targetRef items merged into each rule (``Entry.merged``, with ``precedence.contributions``
saying which of their settings a higher item replaced, and ``precedence.why`` why), and the rules
the bundle itself holds (the merged result). The explanation is plain JSON-ready data; the
format is documented in docs/explain.md and versioned by ``FORMAT``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from compiler import resolve_inbound as rin
from compiler.build import canon
from compiler.diagnostics import Diagnostic, Path
from compiler.gateway import GatewayBuild
from compiler.kinds import REGISTRY, KindDef
from compiler.parse import Doc
from compiler.pipeline import MeshResolved, ParsedFile, doc_lines
from compiler.precedence import Contribution, Ranked, contributions, why
from compiler.resolve import TARGETREF_INBOUND, Entry, split_ranked
from compiler.resolve_targetref import is_targetref
from compiler.result import CompileResult
from compiler.yamlload import Positions, load_positions

__all__ = ["FORMAT", "ExplainError", "explain", "find_service", "line_finder"]

FORMAT = 1
"""The version of the JSON this module writes (docs/explain.md)."""

LineOf = Callable[[Doc, Path], int]
"""The 1-based line of a path inside a document (the caller reads positions)."""


def line_finder(parsed: list[ParsedFile]) -> LineOf:
    """Lines from the parsed files: a document's first line (as the release's provenance has it),
    or the line of a path inside it (files composed with positions once, when first asked)."""
    data = {p.file.path: p.file.data for p in parsed}
    cache: dict[str, Positions | None] = {}

    def line_of(doc: Doc, path: Path) -> int:
        if path and doc.file not in cache:
            cache[doc.file] = load_positions(doc.file, data[doc.file])[0]
        pos = cache.get(doc.file) if path else None
        if pos is not None:
            return pos.locate(doc.loc(path)).line
        lines = doc_lines(data[doc.file])
        return lines[doc.index] if doc.index < len(lines) else lines[-1]

    return line_of


class ExplainError(Exception):
    """The service cannot be explained (unknown, or ambiguous between meshes)."""


def _kinds(direction: str) -> list[KindDef]:
    kinds = [d for d in REGISTRY.values() if d.indexed and d.direction == direction]
    return sorted(kinds, key=lambda d: d.bundle_field or "")


def find_service(resolved: dict[str, MeshResolved], wanted: str) -> tuple[str, str]:
    """(mesh, service) for ``NAME`` or ``MESH/NAME``; ExplainError names the closest services."""
    mesh_part, _, name = wanted.rpartition("/")
    found = [
        (m, name)
        for m, r in sorted(resolved.items())
        if (not mesh_part or m == mesh_part) and name in r.info.services
    ]
    if len(found) == 1:
        return found[0]
    if found:
        options = ", ".join(f"{m}/{n}" for m, n in found)
        raise ExplainError(f"service {wanted!r} is in several meshes; name one of {options}")
    names = sorted({n for r in resolved.values() for n in r.info.services})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or names[:3]
    hint = f"; closest: {', '.join(close)}" if close else " (the repo declares no services)"
    raise ExplainError(f"no service {wanted!r} in this repo{hint}")


@dataclass
class _Ctx:
    line_of: LineOf
    docs: dict[tuple[str, int], Doc]
    """The documents named so far, for the notes (diagnostics at them)."""

    def ref(self, doc: Doc, path: Path = ()) -> dict[str, Any]:
        self.docs[(doc.file, doc.index)] = doc
        return {
            "kind": doc.kind,
            "name": doc.name,
            "file": doc.file,
            "line": self.line_of(doc, path),
            "dialect": "targetRef" if hasattr(doc.spec, "target_ref") else "legacy",
        }


def _rule_index(rules: list[Any], e: Entry) -> int | None:
    for i, r in enumerate(rules):
        if canon(r) == e.rule_json:
            return i
    return None


def _item_ref(ctx: _Ctx, r: Ranked) -> dict[str, Any]:
    out = ctx.ref(r.policy, tuple(r.where or ()))
    out["targetRef"] = r.kinds[0]
    out["item"] = f"{r.where[0]}[{r.where[1]}] {r.kinds[1]}" if r.where else r.kinds[1]
    return out


def _field(path: tuple[str, ...]) -> str:
    """A merged key path as Kuma writes it: camelCase keys; a route rule by its ``matches``."""
    out = ""
    if path[:1] == ("load_balancing",):  # the keys ``resolve_targetref`` files each route kind under
        path = path[1:]
    elif path[:1] == ("tcp",):
        out, path = "rules[0].default", path[1:]
    for seg in path:
        if seg.startswith("["):
            out += f"[matches={seg}]"
        else:
            head, *rest = seg.split("_")
            out += ("." if out else "") + head + "".join(w[:1].upper() + w[1:] for w in rest)
    return out


def _winner(c: Contribution, members: tuple[Any, ...]) -> Ranked:
    """The highest-precedence item that replaced something of ``c`` (members: lowest first)."""
    by = [r for _, r in c.overridden]
    return max(by, key=lambda r: next(i for i, m in enumerate(members) if m is r))


def _inbound_rule(r: Ranked) -> bool:
    """Whether an item is a Kuma inbound rule (``compiler.resolve_inbound``)."""
    head = r.where[0] if isinstance(r.where, tuple) and r.where else None
    return head == "rules" or (head == "from" and r.policy.kind in rin.FROM_AS_RULES)


def _why(low: Ranked, high: Ranked) -> str:
    """``precedence.why``, but inbound rules for one caller go over those for all callers, and a
    more specific match over a broader one, whatever the policies' order."""
    if _inbound_rule(low) and _inbound_rule(high) and low.kinds[1] != high.kinds[1]:
        if low.kinds[1] == rin.ALL_CALLERS:
            return f"a rule matching the caller ({high.kinds[1]}) goes over the rules for all callers"
        return f"a more specific match: {high.kinds[1]} > {low.kinds[1]}"
    return why(low, high)


def _merged(ctx: _Ctx, e: Entry, rule: int | None, policies: list[Any], shadowed: list[Any]) -> None:
    """The items of one merged targetRef rule, highest precedence first (inbound rules of a kind
    whose rules add up, such as fault filters, override nothing)."""
    members = e.merged
    contribs = contributions(members)
    if all(_inbound_rule(r) and r.policy.kind in rin.CONCATENATED for r in members):
        contribs = [Contribution(c.item, c.sets, ()) for c in contribs]
    for c in reversed(contribs):
        item = _item_ref(ctx, c.item)
        if c.sets and c.shadowed:
            top = _winner(c, members)
            item["by"] = _item_ref(ctx, top)
            item["reason"] = f"every setting it makes is overridden: {_why(c.item, top)}"
            item["code"] = "W3004" if "name-order" in item["reason"] else None
            shadowed.append(item)
            continue
        item["rule"] = rule
        item["sets"] = [_field(x) for x in c.sets]
        item["overridden"] = [
            {"field": _field(leaf), "by": f"{r.policy.kind} {r.policy.name}", "reason": _why(c.item, r)}
            for leaf, r in c.overridden
        ]
        policies.append(item)


def _entry_reason(e: Entry, by: Entry) -> tuple[str, str | None]:
    if is_targetref(by) and not is_targetref(e):
        return "a targetRef policy shadows the legacy one (as in Kuma)", "W3005"
    if by.rank != e.rank:
        return (
            f"more specific selectors: {by.rank[0]} exact and {by.rank[1]} wildcard tag(s) > "
            f"{e.rank[0]} and {e.rank[1]}",
            None,
        )
    return "equal specificity; the rules are disjoint and ordered by content", None


def _section(
    ctx: _Ctx, field: str | None, entries: list[Entry], rules: list[Any], additive: bool
) -> dict[str, Any]:
    """One bundle field: its policies (the winner first), the shadowed ones, and its rules."""
    applied, rest = (
        (sorted(entries, key=lambda e: (e.when, e.peer)), []) if additive else split_ranked(entries)
    )
    policies: list[Any] = []
    shadowed: list[Any] = []
    used: set[int] = set()
    for e in applied:
        rule = _rule_index(rules, e)
        if rule is not None:
            used.add(rule)
        if e.merged:
            _merged(ctx, e, rule, policies, shadowed)
            continue
        p = ctx.ref(e.doc, e.path)
        p |= {"rule": rule, "when": dict(e.when), "peer": dict(e.peer)}
        policies.append(p)
    merged_in = {id(r.policy) for e in applied for r in e.merged}
    for e in rest:
        if e.merged and all(id(r.policy) in merged_in for r in e.merged):
            continue  # the same targetRef items, seen through a broader key: merged above
        by = applied[-1]
        reason, code = _entry_reason(e, by)
        s = ctx.ref(e.doc, e.path)
        s |= {"by": ctx.ref(by.doc, by.path), "reason": reason, "code": code}
        shadowed.append(s)
    default = next((i for i in range(len(rules)) if i not in used), None) if not additive else None
    return {
        "field": field,
        "policies": policies,
        "shadowed": shadowed,
        "rules": rules,
        "default_rule": default,
    }


def _outbound(ctx: _Ctx, r: MeshResolved, src: str, dst: str, conf: dict[str, Any]) -> dict[str, Any]:
    idx = r.idx
    keys = [(src, dst), (src, "*"), ("*", dst), ("*", "*")] if src != "*" else [("*", dst), ("*", "*")]
    sections = []
    for kdef in _kinds("outbound"):
        field = kdef.bundle_field or ""
        entries = idx.entries(kdef.kind, keys)
        sections.append(_section(ctx, kdef.bundle_field, entries, list(conf.get(field) or ()), False))
    return {"destination": dst, "source": src, "kinds": sections}


def _inbound(ctx: _Ctx, r: MeshResolved, service: str, conf: dict[str, Any]) -> list[dict[str, Any]]:
    sections = []
    for kdef in _kinds("inbound"):
        table = r.idx.by_dst.get(kdef.kind, {})
        entries = [*table.get(service, ()), *table.get("*", ())]
        rules = list(conf.get(kdef.bundle_field or "") or ())
        sections.append(_section(ctx, kdef.bundle_field, entries, rules, kdef.additive))
    for field, kind in TARGETREF_INBOUND.items():  # filled by targetRef policies alone
        table = r.idx.by_dst.get(kind, {})
        entries = [*table.get(service, ()), *table.get("*", ())]
        rules = list(conf.get(field) or ())
        sections.append(_section(ctx, field, entries, rules, field == "traffic_log"))
    sections.sort(key=lambda x: str(x["field"]))
    return sections


def _gateway(ctx: _Ctx, gw: GatewayBuild, conf: dict[str, Any]) -> dict[str, Any]:
    """The gateway's policies and, per listener, each rule (in the order it is tried) with the
    route match it came from."""
    listeners = []
    for i, lst in enumerate(conf.get("listeners") or ()):
        origins = gw.origins[i] if i < len(gw.origins) else []
        rules = [
            {**ctx.ref(doc, path), "rule": j, "match": rule.get("matches")}
            for j, (rule, (doc, path)) in enumerate(zip(lst.get("rules") or (), origins, strict=True))
        ]
        listeners.append({"port": lst.get("port"), "protocol": lst.get("protocol"), "rules": rules})
    return {"policies": [ctx.ref(d) for d in gw.docs], "listeners": listeners, "conf": conf}


def _notes(diags: Iterable[Diagnostic], docs: dict[tuple[str, int], Doc]) -> list[dict[str, Any]]:
    out = []
    for d in diags:
        if d.severity != "error" and (d.loc.file, d.loc.doc) in docs:
            line = d.span.line if d.span is not None else 1
            out.append({"code": d.code, "file": d.file, "line": line, "message": d.message})
    return out


def explain(
    result: CompileResult,
    resolved: dict[str, MeshResolved],
    mesh: str,
    service: str,
    line_of: LineOf,
    only: str | None = None,
) -> dict[str, Any]:
    """The explanation of ``mesh/service``'s bundle (``only``: one outbound destination)."""
    r = resolved[mesh]
    ctx = _Ctx(line_of, {})
    key = f"{mesh}/{service}"
    bundle = json.loads(result.bundles[key])
    mesh_bundle = json.loads(result.bundles[mesh])
    svc = r.info.services[service]
    out: dict[str, Any] = {
        "format": FORMAT,
        "mesh": mesh,
        "service": service,
        "bundle": key,
        "digest": result.digests.get(key),
        "commit": result.commit,
        "service_doc": ctx.ref(svc.doc),
        "inbound": None if svc.gateway else _inbound(ctx, r, service, bundle["inbound"]),
    }
    outbound = []
    for dst in sorted(mesh_bundle["destinations"]):
        if only is not None and dst != only:
            continue
        if dst in bundle["outbound"]:
            outbound.append(_outbound(ctx, r, service, dst, bundle["outbound"][dst]))
        elif dst != service:
            # No policy names this service as a source: its sidecar uses the mesh bundle's entry.
            outbound.append(_outbound(ctx, r, "*", dst, mesh_bundle["destinations"][dst]))
    out["outbound"] = outbound
    gw = next((g for g in r.gateways if g.service == service), None)
    out["gateway"] = None if gw is None else _gateway(ctx, gw, bundle["gateway"])
    out["notes"] = _notes(result.diagnostics, ctx.docs)
    return out
