"""``meshc plan``: what a policy change does, bundle by bundle, as a reviewer reads it.

Pure functions: two ``CompileResult`` s (base and head) in, a ``Plan`` out, and the plan rendered
as text, JSON (terraform's ``actions`` vocabulary) or Markdown (a PR comment). Reading revisions and
compiling them is ``plan_cli``'s job.

Bundles are compared by digest (DESIGN §4: a bundle holds no commit, path or line, so an edit that
changes no behaviour keeps every digest). Only bundles whose digest differs are decoded, and their
semantic deltas are computed on a normalised tree of the decoded JSON:

* ordered rule lists become maps keyed by their tag conditions (``[on version=v2]``,
  ``[to v1]``, ``[from magnanimo]``), so a reordering or an unrelated rule does not show up;
* weighted targets (``split``, gateway ``backends``) become ``target -> weight`` maps, so a canary
  step reads ``split: v1 90→50, v2 10→50``;
* other lists of objects are keyed by what names them (listener port, route match, backend name),
  and lists of scalars compare as sets (``retry on +reset``).

A service bundle that gains or loses its own outbound entry for a destination is compared with
the mesh bundle's default for that destination (what the service's sidecar used before/after),
so adding a Retry for one caller shows ``benigno retries 2→3`` rather than a new blob.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from compiler.canary import plan_lines
from compiler.result import CompileResult

__all__ = [
    "FORMAT_VERSION",
    "Change",
    "Delta",
    "Plan",
    "Side",
    "make_plan",
    "render",
    "render_json",
    "render_markdown",
    "render_text",
]

FORMAT_VERSION = "1.0"
"""Version of the ``--format json`` document (terraform's ``format_version`` convention)."""

Action = Literal["create", "update", "delete", "no-op"]
_SYMBOL: dict[str, str] = {"create": "+", "update": "~", "delete": "-", "no-op": " "}
_ABSENT = "—"
_ARROW = "→"

# A normalised bundle: nested dicts whose leaves are scalars (str/int/float/bool) or tuples of str.
Tree = dict[str, Any]


@dataclass(frozen=True)
class Delta:
    """One behavioural difference inside a bundle."""

    scope: str
    """What it is about: a destination service name, ``inbound``, ``mesh``, ``catalog`` or ``gateway``."""
    path: tuple[str, ...]
    """Where in the normalised bundle (rule kind, condition, field...). An outbound rule with no
    condition is the empty segment here (so the text reads ``benigno retries``), ``*`` in JSON."""
    before: Any
    """The old value (``None`` when absent); a short summary when a whole rule was added/removed."""
    after: Any
    whole: bool = False
    """A whole rule or entry was added or removed (``before``/``after`` are summaries)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "path": [seg or "*" for seg in self.path],
            "before": _jsonable(self.before),
            "after": _jsonable(self.after),
            "text": f"{self.scope} {_delta_text(self)}",
        }


@dataclass(frozen=True)
class Change:
    address: str
    """The bundle key: ``<mesh>`` or ``<mesh>/<service>``."""
    type: Literal["mesh", "service", "gateway"]
    action: Action
    before: str | None
    """sha256 hex of the base bundle, ``None`` when created."""
    after: str | None
    deltas: tuple[Delta, ...] = ()

    def summary(self) -> str:
        """The deltas as one line: ``benigno split: v1 90→50, v2 10→50; retries 2→3``."""
        if self.action == "create":
            return f"(new {self.type})"
        if self.action == "delete":
            return f"(removed {self.type})"
        if self.action == "no-op":
            return ""
        return " · ".join(_scope_lines(self.deltas)) or "(bundle bytes changed; no field-level difference)"


@dataclass(frozen=True)
class Side:
    label: str
    """How the user named it (``origin/main``, ``work tree``)."""
    commit: str | None
    release_id: str

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.label, "commit": self.commit, "release_id": self.release_id}


@dataclass(frozen=True)
class Plan:
    base: Side
    head: Side
    changes: tuple[Change, ...]
    """Every bundle key of either side, sorted, no-ops included."""
    counts: dict[str, int] = field(default_factory=dict)
    canaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The head's Canaries (``compiler.canary``): each step's weights and the bundles it changes."""

    @property
    def has_changes(self) -> bool:
        return any(c.action != "no-op" for c in self.changes)

    @property
    def summary(self) -> dict[str, int]:
        n = {a: 0 for a in ("create", "update", "delete", "no-op")}
        for c in self.changes:
            n[c.action] += 1
        return {"add": n["create"], "change": n["update"], "remove": n["delete"], "unchanged": n["no-op"]}

    def summary_line(self) -> str:
        s = self.summary
        return (
            f"Plan: {s['add']} to add, {s['change']} to change, {s['remove']} to remove, "
            f"{s['unchanged']} unchanged."
        )


# --- building a plan ------------------------------------------------------------------------------


def make_plan(
    base: CompileResult, head: CompileResult, base_label: str = "base", head_label: str = "head"
) -> Plan:
    """Compare two successful compiles. Only bundles whose digests differ are decoded."""
    if base.errors or head.errors:
        raise ValueError("make_plan needs two compiles without errors")
    with _no_gc():
        return _make_plan(base, head, base_label, head_label)


def _make_plan(base: CompileResult, head: CompileResult, base_label: str, head_label: str) -> Plan:
    before, after = base.digests, head.digests
    views: dict[tuple[int, str], _MeshView | None] = {}

    def mesh_view(side: CompileResult, mesh: str) -> _MeshView | None:
        if (id(side), mesh) not in views:
            raw = side.bundles.get(mesh)
            views[id(side), mesh] = _MeshView(raw) if raw is not None else None
        return views[id(side), mesh]

    def default_dest(side: CompileResult, mesh: str, dest: str) -> Mapping[str, Any] | None:
        view = mesh_view(side, mesh)
        return view.destination(dest) if view is not None else None

    changes = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b == a:
            changes.append(Change(key, _type_of(key, base, head), "no-op", b, a))
            continue
        if b is None:
            changes.append(Change(key, _type_of(key, base, head), "create", None, a))
            continue
        if a is None:
            changes.append(Change(key, _type_of(key, base, head), "delete", b, None))
            continue
        if "/" not in key:
            vb, va = mesh_view(base, key), mesh_view(head, key)
            assert vb is not None and va is not None
            old, new = _pruned_mesh_pair(vb, va)
            deltas = tuple(bundle_deltas(old, new))
            changes.append(Change(key, "mesh", "update", b, a, deltas))
            continue
        old, new = json.loads(base.bundles[key]), json.loads(head.bundles[key])
        mesh = str(old.get("mesh", key.split("/", 1)[0]))
        deltas = tuple(
            bundle_deltas(
                old,
                new,
                # The mesh default for a destination is looked up (one slice of the large mesh
                # bundle decoded) only when a service gains or loses its own entry for it.
                mesh_before=partial(default_dest, base, mesh),
                mesh_after=partial(default_dest, head, mesh),
            )
        )
        changes.append(Change(key, _type_from(new), "update", b, a, deltas))
    return Plan(
        Side(base_label, base.commit, base.release_id),
        Side(head_label, head.commit, head.release_id),
        tuple(changes),
        canaries=head.canaries,
    )


_DESTS = b'"destinations":{'
_DEST_MARK = b'":{"circuit_breaker":'
_DESTS_END = b'},"format":'


def _split_mesh(raw: bytes) -> tuple[dict[str, bytes], bytes] | None:
    """A canonical mesh bundle cut, without decoding it, into one JSON slice per destination and
    the rest of the bundle (with ``"destinations":{}``); ``None`` when the layout is not the one
    expected (then the caller decodes the whole bundle).

    Canonical JSON sorts keys: a Destination object starts with ``{"circuit_breaker":`` and
    ``"format"`` follows ``"destinations"``. A false cut can only make a slice invalid JSON (its
    decode fails and the caller falls back) or split one unchanged destination in two equal parts.
    """
    i = raw.find(_DESTS)
    if i < 0:
        return None
    open_ = i + len(_DESTS) - 1
    end = raw.find(_DESTS_END, open_)
    if raw[open_ + 1 : open_ + 2] == b"}":
        return {}, raw
    if end < 0:
        return None
    marks: list[tuple[int, int]] = []
    j = raw.find(_DEST_MARK, open_, end)
    while j >= 0:
        marks.append((raw.rfind(b'"', open_, j), j))
        j = raw.find(_DEST_MARK, j + 1, end)
    if not marks or marks[0][0] != open_ + 1:
        return None
    slices: dict[str, bytes] = {}
    for n, (k, j) in enumerate(marks):
        last = n + 1 == len(marks)
        stop = end if last else marks[n + 1][0] - 1
        if raw[stop : stop + 1] != (b"}" if last else b","):
            return None
        slices[raw[k + 1 : j].decode()] = raw[j + 2 : stop]
    return slices, raw[:open_] + b"{}" + raw[end + 1 :]


class _MeshView:
    """A mesh bundle's bytes, decoded only as far as a plan needs."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._split = _split_mesh(raw)
        self._full: dict[str, Any] | None = None

    def full(self) -> dict[str, Any]:
        if self._full is None:
            self._full = json.loads(self.raw)
        return self._full

    def slices(self) -> dict[str, bytes] | None:
        return self._split[0] if self._split is not None else None

    def rest(self) -> dict[str, Any]:
        """The bundle with an empty ``destinations`` map."""
        if self._split is None:
            return {**self.full(), "destinations": {}}
        out: dict[str, Any] = json.loads(self._split[1])
        out["destinations"] = {}
        return out

    def destination(self, name: str) -> Mapping[str, Any] | None:
        if self._split is not None:
            piece = self._split[0].get(name)
            if piece is None:
                return None
            try:
                value = json.loads(piece)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        found = (self.full().get("destinations") or {}).get(name)
        return found if isinstance(found, dict) else None


def _pruned_mesh_pair(vb: _MeshView, va: _MeshView) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both mesh bundles with only the destinations that differ (compared as bytes) decoded."""
    sb, sa = vb.slices(), va.slices()
    if sb is not None and sa is not None:
        try:
            old, new = vb.rest(), va.rest()
            for name in sorted(sb.keys() | sa.keys()):
                x, y = sb.get(name), sa.get(name)
                if x == y:
                    continue
                if x is not None:
                    old["destinations"][name] = json.loads(x)
                if y is not None:
                    new["destinations"][name] = json.loads(y)
            return old, new
        except ValueError:
            pass
    return vb.full(), va.full()


def _type_from(bundle: Mapping[str, Any]) -> Literal["mesh", "service", "gateway"]:
    if bundle.get("type") == "mesh":
        return "mesh"
    return "gateway" if bundle.get("gateway") else "service"


def _type_of(key: str, base: CompileResult, head: CompileResult) -> Literal["mesh", "service", "gateway"]:
    if "/" not in key:
        return "mesh"
    raw = head.bundles.get(key) or base.bundles.get(key)
    if raw is None:
        return "service"
    # Cheap, no decode: canonical JSON sorts keys, so "gateway" comes right after "format".
    head_bytes = raw[:128]
    if b'"gateway":' not in head_bytes:
        head_bytes = raw
    return "service" if b'"gateway":null' in head_bytes else "gateway"


@contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic GC while planning: decoding a 10,000-service mesh bundle and recording 10,000
    changes allocate millions of objects (none in cycles that matter), and the collections they
    trigger walk the whole heap of the compiled sides, costing several times the work itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


MeshLookup = Callable[[str], Mapping[str, Any] | None]
"""Destination name -> the mesh bundle's default outbound config for it."""


def bundle_deltas(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    mesh_before: MeshLookup | None = None,
    mesh_after: MeshLookup | None = None,
) -> Iterator[Delta]:
    """The semantic deltas between two decoded bundles of the same key.

    ``mesh_before``/``mesh_after`` give each side's mesh default for a destination (called only
    when needed): a destination without a service-specific entry gets the mesh default.
    """
    if new.get("type") == "mesh" or old.get("type") == "mesh":
        yield from _mesh_deltas(old, new)
        return
    yield from _diff(
        "inbound", _norm_inbound(old.get("inbound") or {}), _norm_inbound(new.get("inbound") or {}), ()
    )
    out_b, out_a = old.get("outbound") or {}, new.get("outbound") or {}

    def default(lookup: MeshLookup | None, dest: str) -> Mapping[str, Any]:
        return (lookup(dest) if lookup is not None else None) or {}

    for dest in sorted(set(out_b) | set(out_a)):
        eff_b, eff_a = out_b.get(dest), out_a.get(dest)
        if eff_b is not None and eff_b == eff_a:
            continue
        eff_b = eff_b if eff_b is not None else default(mesh_before, dest)
        eff_a = eff_a if eff_a is not None else default(mesh_after, dest)
        yield from _diff(dest, _norm_destination(eff_b, dest), _norm_destination(eff_a, dest), ())
    gw_b, gw_a = old.get("gateway"), new.get("gateway")
    if gw_b or gw_a:
        yield from _diff("gateway", _norm_gateway(gw_b or {}), _norm_gateway(gw_a or {}), ())


def _mesh_deltas(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[Delta]:
    def settings(b: Mapping[str, Any]) -> Tree:
        t: Tree = {}
        if "mtls" in b:
            t["mtls"] = _norm(b["mtls"], "mtls", None)
        if "passthrough" in b:
            t["passthrough"] = b["passthrough"]
        t["logging"] = _norm(b.get("logging") or [], "logging", None)
        return _prune(t)

    yield from _diff("mesh", settings(old), settings(new), ())
    cat_b, cat_a = old.get("services") or {}, new.get("services") or {}
    differ = [k for k in _ordered_keys(cat_b, cat_a) if cat_b.get(k) != cat_a.get(k)]
    yield from _diff(
        "catalog",
        {k: _norm(cat_b[k], None, k) for k in differ if k in cat_b},
        {k: _norm(cat_a[k], None, k) for k in differ if k in cat_a},
        (),
    )
    dests_b, dests_a = old.get("destinations") or {}, new.get("destinations") or {}
    for dest in sorted(set(dests_b) | set(dests_a)):
        if dest not in dests_a:
            yield Delta(dest, ("destination",), "default outbound config", None, whole=True)
        elif dest not in dests_b:
            yield Delta(dest, ("destination",), None, "default outbound config", whole=True)
        elif dests_b[dest] != dests_a[dest]:
            yield from _diff(
                dest, _norm_destination(dests_b[dest], dest), _norm_destination(dests_a[dest], dest), ()
            )


# --- normalising ----------------------------------------------------------------------------------

_RULE_KINDS_OUT = ("route", "timeout", "retry", "circuit_breaker", "health_check", "traffic_log")
_RULE_KINDS_IN = ("permissions", "rate_limit", "fault_injection", "timeout", "circuit_breaker", "traffic_log")
_WEIGHTED = ("split", "backends", "tcp_backends")


def _tags(tags: Mapping[str, Any] | None) -> str:
    items = sorted((tags or {}).items())
    if len(items) == 1 and items[0][0] == "version":
        return str(items[0][1])
    return ",".join(f"{k}={v}" for k, v in items)


def _peer_label(tags: Mapping[str, Any]) -> str:
    """A caller or target: ``magnanimo``, ``magnanimo{v2}``, ``{zone=a}``, ``*``."""
    t = dict(tags)
    svc = t.pop("kuma.io/service", None)
    rest = _tags(t)
    if svc is None:
        return f"{{{rest}}}" if rest else "*"
    return f"{svc}{{{rest}}}" if rest else str(svc)


def _target_label(item: Mapping[str, Any], ctx: str | None) -> str:
    svc, tags = item.get("service"), item.get("tags") or {}
    rest = _tags(tags)
    if svc == ctx or svc is None:
        return rest or str(svc or "*")
    return f"{svc}{{{rest}}}" if rest else str(svc)


def _cond(rule: Mapping[str, Any], inbound: bool) -> str:
    when, peer = rule.get("when") or {}, rule.get("peer") or {}
    parts = []
    if peer:
        parts.append(_peer_label(peer) if inbound else f"to {_tags(peer)}")
    if when:
        parts.append(f"on {_tags(when)}")
    if inbound:
        return " ".join(parts) or "*"
    return f"[{' '.join(parts)}]" if parts else ""


def _rules(rules: list[Mapping[str, Any]], inbound: bool, ctx: str | None) -> Tree:
    out: Tree = {}
    for r in rules:
        key = _unique(out, _cond(r, inbound))
        out[key] = _norm(r.get("conf"), None, ctx) if r.get("conf") is not None else "allow"
    return out


def _unique(d: Mapping[str, Any], key: str) -> str:
    if key not in d:
        return key
    n = 2
    while f"{key} #{n}" in d:
        n += 1
    return f"{key} #{n}"


def _norm_destination(dest: Mapping[str, Any], name: str) -> Tree:
    return {k: _rules(dest.get(k) or [], False, name) for k in _RULE_KINDS_OUT}


def _norm_inbound(inbound: Mapping[str, Any]) -> Tree:
    return {k: _rules(inbound.get(k) or [], True, None) for k in _RULE_KINDS_IN}


def _norm_gateway(gw: Mapping[str, Any]) -> Tree:
    return _prune(_norm(gw, "gateway", None))


def _list_key(fieldname: str | None, item: Mapping[str, Any], ctx: str | None) -> str | None:
    if fieldname == "listeners":
        host = item.get("hostname", "*")
        return f":{item.get('port')} {item.get('protocol')}" + (f" {host}" if host != "*" else "")
    if fieldname == "rules":
        hosts = ",".join(item.get("hostnames") or [])
        matches = " | ".join(_match_label(m) for m in item.get("matches") or []) or "*"
        return f"{hosts} {matches}" if hosts else matches
    if fieldname == "http":
        return _match_label(item.get("match") or {})
    if fieldname in ("logging", "add", "set", "request_headers", "headers"):
        return str(item.get("name")) if "name" in item else None
    if fieldname == "filters":
        return str(item.get("type")) if "type" in item else None
    return None


def _match_label(m: Mapping[str, Any]) -> str:
    parts = []
    if m.get("method"):
        method = m["method"]
        parts.append(method["value"] if isinstance(method, dict) else str(method))
    path = m.get("path")
    if isinstance(path, dict):
        kind, value = path.get("kind"), path.get("value")
        parts.append(
            {"prefix": f"{value}*", "exact": f"={value}", "regex": f"~{value}"}.get(str(kind), value)
        )
    for h in m.get("headers") or []:
        parts.append(f"{h[0]}:{json.dumps(h[1:], separators=(',', ':'))}")
    for q in m.get("query") or []:
        parts.append(f"?{q[0]}")
    return " ".join(str(p) for p in parts) or "*"


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
        return _tags(v) if v else "{}"
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _norm(v: Any, fieldname: str | None, ctx: str | None) -> Any:
    """Scalars stay; dicts recurse; lists become keyed maps, weight maps or tuples of strings."""
    if isinstance(v, dict):
        if fieldname in ("tags", "when", "peer"):
            return _tags(v)
        return _prune({k: _norm(x, k, ctx) for k, x in v.items()})
    if isinstance(v, list):
        if fieldname == "subsets":
            return tuple(_scalar(x) for x in v)
        if fieldname == "filters":
            v = [_compact_filter(x) if isinstance(x, dict) else x for x in v]
        if fieldname in _WEIGHTED and all(isinstance(x, dict) for x in v):
            weights: dict[str, Any] = {}
            for x in v:
                label = _target_label(x, ctx)
                weights[label] = weights.get(label, 0) + x.get("weight", 0)
            return weights
        if v and all(isinstance(x, dict) for x in v):
            keyed: Tree = {}
            for i, x in enumerate(v):
                key = _list_key(fieldname, x, ctx)
                item = _norm(x, None, ctx)
                if fieldname == "filters" and key is not None:
                    item.pop("type", None)
                keyed[_unique(keyed, key if key is not None else f"#{i + 1}")] = item
            return keyed
        return tuple(_scalar(x) for x in v)
    return v


_FILTER_DEFAULTS: dict[str, Any] = {
    "set": [],
    "add": [],
    "remove": [],
    "mirror": None,
    "mirror_percentage": 100.0,
    "redirect_status": 302,
    "host_to_backend_hostname": False,
}


def _compact_filter(f: Mapping[str, Any]) -> dict[str, Any]:
    """A gateway filter without the defaults of the fields its type does not use."""
    return {k: v for k, v in f.items() if v is not None and _FILTER_DEFAULTS.get(k, object()) != v}


def _prune(t: Tree) -> Tree:
    """Absent, null and empty list mean the same thing to a reader: drop them."""
    return {k: v for k, v in t.items() if v is not None and v != ()}


# --- diffing --------------------------------------------------------------------------------------


def _diff(scope: str, old: Any, new: Any, path: tuple[str, ...]) -> Iterator[Delta]:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in _ordered_keys(old, new):
            if k not in new:
                yield _whole(scope, (*path, k), old[k], None)
            elif k not in old:
                yield _whole(scope, (*path, k), None, new[k])
            else:
                yield from _diff(scope, old[k], new[k], (*path, k))
        return
    yield Delta(scope, path, old, new)


def _ordered_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = list(old)
    keys += [k for k in new if k not in old]
    return keys


def _whole(scope: str, path: tuple[str, ...], old: Any, new: Any) -> Delta:
    if len(path) == 2 and path[0] == "permissions":
        return Delta(scope, path, old, new, whole=True)
    if not isinstance(old, dict) and not isinstance(new, dict):
        return Delta(scope, path, old, new)
    # A weight map entry or a rule that appeared/disappeared: one delta with a summary.
    if path and len(path) >= 2 and path[-2] in _WEIGHTED:
        return Delta(scope, path, old, new)
    return Delta(
        scope,
        path,
        _summarise(scope, path, old) if old is not None else None,
        _summarise(scope, path, new) if new is not None else None,
        whole=True,
    )


_HEADLINES: dict[str, tuple[tuple[str, ...], ...]] = {
    "route": (("split",), ("http",)),
    "timeout": (("connect_timeout_ms",), ("http_request_timeout_ms",)),
    "retry": (("http", "num_retries"), ("grpc", "num_retries"), ("tcp", "max_connect_attempts")),
    "circuit_breaker": (("detectors",), ("max_ejection_percent",)),
    "health_check": (("interval_ms",), ("timeout_ms",), ("http", "path"), ("grpc", "service_name")),
    "traffic_log": (("backend", "name"),),
    "rate_limit": (("requests",), ("interval_ms",)),
    "fault_injection": (("delay",), ("abort",), ("response_bandwidth",)),
    "rules": (("backends",), ("filters",)),
    "listeners": (("rules",), ("tcp_backends",)),
}


_INBOUND_HEADLINES: dict[str, tuple[tuple[str, ...], ...]] = {
    "circuit_breaker": (("thresholds",),),
}
"""Inbound, a circuit breaker is its connection limits (outlier detection is not used there)."""


def _summarise(scope: str, path: tuple[str, ...], tree: Any) -> str:
    if not isinstance(tree, dict):
        return _fmt(path[-1] if path else "", tree)
    if scope == "catalog" and len(path) == 1:
        subsets = tree.get("subsets") or ()
        return f":{tree.get('port')} {tree.get('protocol')}" + (
            f", subsets {' '.join(subsets)}" if subsets else ""
        )
    if path and path[-1] == "" and len(path) == 2:
        kind: str | None = path[0]
    else:
        kind = next((p for p in reversed(path) if p in _HEADLINES), None)
        if kind is None and len(path) >= 2 and path[-2] in _HEADLINES:
            kind = path[-2]
    leaves = list(_leaves(tree, ()))
    if kind in _HEADLINES:
        wanted = (_INBOUND_HEADLINES.get(kind) if scope == "inbound" else None) or _HEADLINES[kind]
        picked = [(p, v) for p, v in leaves if any(p[: len(w)] == w for w in wanted)]
        leaves = picked or leaves
    shown = []
    for p, v in leaves:
        if len(p) >= 2 and p[-2] in _WEIGHTED:
            shown.append(f"{_leaf_label(p[:-1])} {p[-1]} {_fmt('', v)}")
        else:
            shown.append(f"{_leaf_label(p)} {_fmt(p[-1], v)}".strip())
    return ", ".join(shown[:4]) + (", …" if len(shown) > 4 else "")


def _leaves(tree: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, tree


# --- text of a delta ------------------------------------------------------------------------------

_KIND_LABEL = {
    "route": "",
    "timeout": "timeout",
    "retry": "retry",
    "circuit_breaker": "circuit breaker",
    "health_check": "health check",
    "traffic_log": "traffic log",
    "rate_limit": "rate limit",
    "fault_injection": "fault injection",
    "permissions": "permission",
}
_FIELD_LABEL: dict[tuple[str, ...], str] = {
    ("retry", "http", "num_retries"): "retries",
    ("retry", "grpc", "num_retries"): "grpc retries",
    ("retry", "http", "per_try_timeout_ms"): "per-try timeout",
    ("retry", "grpc", "per_try_timeout_ms"): "grpc per-try timeout",
    ("retry", "tcp", "max_connect_attempts"): "tcp connect attempts",
    ("retry", "http", "retry_on"): "retry on",
    ("retry", "http", "retriable_status_codes"): "retriable statuses",
    ("retry", "http", "retriable_methods"): "retriable methods",
    ("retry", "http", "back_off", "base_interval_ms"): "retry back-off base",
    ("retry", "http", "back_off", "max_interval_ms"): "retry back-off max",
    ("health_check", "grpc", "service_name"): "grpc health service",
    ("timeout", "connect_timeout_ms"): "connect timeout",
    ("timeout", "http_request_timeout_ms"): "request timeout",
    ("timeout", "http_idle_timeout_ms"): "http idle timeout",
    ("timeout", "tcp_idle_timeout_ms"): "tcp idle timeout",
    ("timeout", "http_stream_idle_timeout_ms"): "stream idle timeout",
    ("timeout", "http_max_stream_duration_ms"): "max stream duration",
}


_PART_LABEL = {
    "listeners": "listener",
    "rules": "route",
    "filters": "filter",
    "backends": "→",
    "tcp_backends": "tcp →",
}


def _human(part: str) -> str:
    return _PART_LABEL.get(part) or part.removesuffix("_ms").replace("_", " ")


def _leaf_label(path: tuple[str, ...]) -> str:
    return " ".join(_human(p) for p in path if p)


def _split_path(d: Delta) -> tuple[str, str, tuple[str, ...]]:
    """(kind, condition, rest) for a destination/inbound delta; ("", "", path) otherwise."""
    if d.path and d.path[0] in _KIND_LABEL and len(d.path) >= 2:
        return d.path[0], d.path[1], d.path[2:]
    return "", "", d.path


def _cond_text(kind: str, cond: str) -> str:
    if kind in ("permissions", "rate_limit", "fault_injection"):
        return f"[from {cond}]" if cond != "*" else ""
    return cond


def _label(d: Delta) -> str:
    kind, cond, rest = _split_path(d)
    if not kind:
        return _leaf_label(d.path)
    named = _FIELD_LABEL.get((kind, *rest))
    if named is None:
        named = " ".join(x for x in (_KIND_LABEL[kind], _leaf_label(rest)) if x)
    cond = _cond_text(kind, cond)
    return f"{cond} {named}".strip() if cond else named


def _fmt(fieldname: str, v: Any) -> str:
    if v is None:
        return _ABSENT
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int) and fieldname.endswith("_ms"):
        return _duration(v)
    if isinstance(v, tuple):
        return ",".join(v) if v else "[]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _duration(ms: int) -> str:
    if ms == 0:
        return "0s"
    for unit, n in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % n == 0:
            return f"{ms // n}{unit}"
    return f"{ms}ms"


def _delta_text(d: Delta) -> str:
    last = d.path[-1] if d.path else ""
    if d.whole:
        kind, cond, rest = _split_path(d)
        sign = "+" if d.after is not None else "-"
        if kind == "permissions" and not rest:
            return f"permission {sign}{cond}"
        if kind and not rest:
            label = " ".join(x for x in (_human(kind), _cond_text(kind, cond)) if x)
        elif d.scope == "catalog" and len(d.path) == 1:
            label = f"service {d.path[0]}"
        else:
            label = _label(d)
        summary = d.after if d.after is not None else d.before
        return f"{sign}{label}" + (f" ({summary})" if summary else "")
    if isinstance(d.before, tuple) and isinstance(d.after, tuple):
        added = [x for x in d.after if x not in d.before]
        removed = [x for x in d.before if x not in d.after]
        if added or removed:
            items = [f"+{x}" for x in added] + [f"-{x}" for x in removed]
            return f"{_label(d)} {' '.join(items)}"
        return f"{_label(d)} order {','.join(d.before)}{_ARROW}{','.join(d.after)}"
    return f"{_label(d)} {_fmt(last, d.before)}{_ARROW}{_fmt(last, d.after)}"


def _group_key(d: Delta) -> tuple[str, ...] | None:
    if not d.whole and len(d.path) >= 2 and d.path[-2] in _WEIGHTED:
        return d.path[:-1]
    if d.whole and d.path and d.path[0] == "permissions":
        return ("permissions",)
    return None


def _scope_lines(deltas: tuple[Delta, ...]) -> list[str]:
    """One line per scope: ``benigno split: v1 90→50, v2 10→50; retries 2→3``."""
    by_scope: dict[str, list[str]] = {}
    groups: dict[tuple[str, tuple[str, ...]], list[Delta]] = {}
    order: list[tuple[str, Any]] = []
    for d in deltas:
        g = _group_key(d)
        if g is None:
            order.append((d.scope, d))
        else:
            if (d.scope, g) not in groups:
                groups[d.scope, g] = []
                order.append((d.scope, (d.scope, g)))
            groups[d.scope, g].append(d)
    for scope, item in order:
        parts = by_scope.setdefault(scope, [])
        if isinstance(item, Delta):
            parts.append(_delta_text(item))
            continue
        members = groups[item]
        first = members[0]
        if first.path[0] == "permissions":
            kind = "permissions"
            parts.append(
                f"{kind}: " + ", ".join(("+" if m.after is not None else "-") + m.path[1] for m in members)
            )
            continue
        prefix = Delta(first.scope, first.path[:-1], None, None)
        label = _label(prefix) or first.path[-2]
        parts.append(
            f"{label}: "
            + ", ".join(f"{m.path[-1]} {_fmt('', m.before)}{_ARROW}{_fmt('', m.after)}" for m in members)
        )
    return [f"{scope} {'; '.join(parts)}" for scope, parts in by_scope.items()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


# --- rendering ------------------------------------------------------------------------------------


def _short(digest: str | None) -> str:
    return f"{digest[:4]}…" if digest else _ABSENT


def render_text(plan: Plan) -> str:
    lines = [f"meshc plan: {plan.base.label} → {plan.head.label}", ""]
    changed = [c for c in plan.changes if c.action != "no-op"]
    if not changed:
        lines.append("No changes: the head compiles to the same bundles as the base.")
    width = max((len(c.address) for c in changed), default=0)
    for c in changed:
        scope_lines = _scope_lines(c.deltas) if c.action == "update" else [c.summary()]
        scope_lines = scope_lines or [c.summary()]
        digests = f"{_short(c.before)}{_ARROW}{_short(c.after)}"
        head = f"{_SYMBOL[c.action]} {c.address.ljust(width)}  {digests.ljust(11)}"
        lines.append(f"{head}  {scope_lines[0]}")
        lines.extend(" " * (len(head) + 2) + s for s in scope_lines[1:])
    for key, rec in sorted(plan.canaries.items()):
        lines += ["", *plan_lines(key, rec)]
    lines += ["", plan.summary_line()]
    return "\n".join(lines)


def render_json(plan: Plan) -> str:
    doc = {
        "format_version": FORMAT_VERSION,
        "base": plan.base.to_json(),
        "head": plan.head.to_json(),
        "resource_changes": [
            {
                "address": c.address,
                "type": c.type,
                "change": {
                    "actions": [c.action],
                    "before": c.before,
                    "after": c.after,
                    "deltas": [d.to_json() for d in c.deltas],
                },
            }
            for c in plan.changes
        ],
        "summary": {**plan.summary, "has_changes": plan.has_changes},
        "canaries": [
            {
                "canary": key,
                "route": rec["route"],
                "git_split": rec["git_split"],
                "steps": [
                    {
                        **s,
                        "split": rec["splits"][str(s["setWeight"])],
                        "changes": rec["overlays"][str(s["setWeight"])],
                    }
                    if "setWeight" in s
                    else s
                    for s in rec["steps"]
                ],
                "on_success": rec["on_success"],
            }
            for key, rec in sorted(plan.canaries.items())
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(plan: Plan) -> str:
    base = plan.base.label + (f" (`{plan.base.commit[:12]}`)" if plan.base.commit else "")
    head = plan.head.label + (f" (`{plan.head.commit[:12]}`)" if plan.head.commit else "")
    out = [f"### meshc plan: {_md(base)} → {_md(head)}", "", f"**{plan.summary_line()}**", ""]
    changed = [c for c in plan.changes if c.action != "no-op"]
    if not changed:
        out.append("No changes: the head compiles to the same bundles as the base.")
        return "\n".join([*out, "", *_canaries_md(plan)]) + "\n"
    out += ["| | Bundle | Digest | Changes |", "|---|---|---|---|"]
    for c in changed:
        out.append(
            f"| `{_SYMBOL[c.action]}` | `{c.address}` | `{_short(c.before)}{_ARROW}{_short(c.after)}` "
            f"| {_md(c.summary())} |"
        )
    detailed = [c for c in changed if c.deltas or c.action != "update"]
    out += ["", "<details><summary>Details</summary>", ""]
    for c in detailed:
        out.append(f"#### `{_SYMBOL[c.action]} {c.address}` ({c.type})")
        out.append("")
        out.append(f"- before: `{c.before or _ABSENT}`")
        out.append(f"- after: `{c.after or _ABSENT}`")
        out.extend(f"- {_md(line)}" for line in _scope_lines(c.deltas))
        out.append("")
    out += ["</details>", "", *_canaries_md(plan)]
    return "\n".join(out)


def _canaries_md(plan: Plan) -> list[str]:
    out: list[str] = []
    for key, rec in sorted(plan.canaries.items()):
        first, *rest = plan_lines(key, rec)
        out += [f"**{_md(first)}**", "", *(f"- {_md(x.strip())}" for x in rest), ""]
    return out


RENDERERS = {"text": render_text, "json": render_json, "markdown": render_markdown}


def render(fmt: str, plan: Plan) -> str:
    return RENDERERS[fmt](plan)
