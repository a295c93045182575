"""Kuma 2.x inbound rules (``core/rules/inbound``, v2.14.3) for the kinds a bundle's inbound holds.

Kuma builds one list of inbound rules per proxy (``inbound.BuildRules``): every ``rules`` item of
the policies that select the proxy, and, for the kinds it marks ``IsFromAsRules`` (MeshAccessLog,
MeshCircuitBreaker, MeshRateLimit, MeshTimeout, MeshTLS), every ``from`` item as a rule without a
match (their ``from`` targetRef can only be ``Mesh``). The items are sorted as policies are (top
targetRef kind, origin, role, then the name inverted) and a rule with several ``matches`` becomes
one rule per match. Each plugin then reads that list its own way; the six a bundle holds:

* MeshRateLimit: the rules without a match merged, lowest precedence first, are the common limit
  (``MatchesAllIncomingTraffic``); a caller whose identity some ``spiffeID`` match covers gets the
  common limit merged with every covering rule, least specific first (Prefix, shorter prefixes
  first, then Exact).
* MeshFaultInjection: every rule is its own fault filter, gated by its match: a caller gets the
  faults of the rules without a match and of each rule that matches it, all of them.
* MeshTrafficPermission: any ``deny`` match beats any ``allow`` (Kuma writes the deny matchers
  first); nothing else is allowed.
* MeshTimeout: the rules without a match merged are the common timeouts (the listener and the
  local app's cluster); a caller some ``spiffeID`` match covers gets them merged with every
  covering rule that sets ``http.requestTimeout`` or ``streamIdleTimeout``, least specific first
  (Kuma copies the inbound route per match, ``mergeSubsumingMatchedRouteConfs``).
* MeshCircuitBreaker: its rules have no ``matches``; merged, they are the local app's connection
  limits and outlier detection for every caller (``MatchesAllIncomingTraffic``: Kuma configures
  the inbound cluster, whose one host is the app).
* MeshAccessLog: every rule is its own access logs, one per backend, gated by its match (Kuma's
  CEL filter): nothing merges, so the bundle's inbound ``traffic_log`` rules add up.

A meshc caller's identity is ``spiffe://<mesh>/<service>`` (its certificate's URI SAN), so a
``spiffeID`` match names the catalog's services it covers, and a caller-specific bundle rule
(``peer: {kuma.io/service: ...}``) is written for each. Without mTLS no caller has an identity
(``callers`` is empty): as in Kuma, a ``spiffeID`` match then matches nobody (W3006 says so). An
``sni`` match has no bundle equivalent (W3006). As in Kuma, where a policy with ``rules`` selects
a proxy, the MeshTrafficPermission and MeshFaultInjection ``from`` items of that proxy are not
used (their plugins read the rules alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from compiler.diagnostics import Diagnostic, Path
from compiler.kinds.base import SERVICE_TAG
from compiler.parse import Doc
from compiler.precedence import Ranked, in_order, merged, name_ties

__all__ = [
    "ALL_CALLERS",
    "CONCATENATED",
    "FROM_AS_RULES",
    "RULE_KINDS",
    "InboundRule",
    "Resolved",
    "compatible",
    "fault_rules",
    "limit_rules",
    "log_rules",
    "permission_rules",
    "rate_limit_rules",
    "rule_items",
    "tag_sets",
    "timeout_rules",
]

Tags = tuple[tuple[str, str], ...]
Convert = Callable[[dict[str, Any]], BaseModel | None]
Warn = Callable[[Doc, str, Path], Diagnostic]
Tie = Callable[[Ranked, Ranked, str, str], Diagnostic]

FROM_AS_RULES = frozenset({"MeshAccessLog", "MeshCircuitBreaker", "MeshRateLimit", "MeshTimeout", "MeshTLS"})
"""``IsFromAsRules`` in Kuma v2.14.3 (``+kuma:policy:is_from_as_rules=true``)."""
RULE_KINDS = frozenset(
    {
        "MeshAccessLog",
        "MeshCircuitBreaker",
        "MeshFaultInjection",
        "MeshRateLimit",
        "MeshTimeout",
        "MeshTLS",
        "MeshTrafficPermission",
    }
)
"""The kinds whose spec has ``rules`` in Kuma v2.14.3."""


@dataclass(frozen=True)
class InboundRule:
    """One Kuma inbound rule: the proxies it is for (``dst``, ``when``), its one match (None: all
    incoming traffic) and its item, ordered as Kuma orders policies."""

    dst: str
    when: Tags
    match: Any
    ranked: Ranked
    action: str = ""
    """MeshTrafficPermission: ``allow``, ``allow_with_shadow_deny`` or ``deny`` (the list of the match)."""


@dataclass(frozen=True)
class Resolved:
    """One bundle rule to write: for ``dst``'s instances carrying ``when``, callers carrying ``peer``."""

    dst: str
    when: Tags
    peer: Tags
    conf: BaseModel | None
    members: tuple[Ranked, ...]


ALL_CALLERS = "all callers"
"""How an inbound rule without a match is described (``Ranked.kinds[1]``), for ``precedence.why``."""
CONCATENATED = frozenset({"MeshAccessLog", "MeshFaultInjection"})
"""Kinds whose inbound rules add up (each its own filter) rather than merge."""


def _describe(match: Any) -> str:
    if match is None:
        return ALL_CALLERS
    s = match.spiffe_id
    return f"spiffeID {s.type} {s.value}" if s is not None else f"sni {match.sni.value}"


def rule_items(
    d: Doc, dst: str, when: Tags, key: tuple[int, int, int, str], top_kind: str, section: str
) -> list[InboundRule]:
    """The inbound rules of one policy's ``section``: ``rules`` (one per match; a
    MeshTrafficPermission's matches are in its ``default`` lists) or ``from`` (no match)."""
    out = []
    for i, item in enumerate(getattr(d.spec, "from_" if section == "from" else section) or ()):
        default = item.default
        conf = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
        if d.kind == "MeshTrafficPermission" and section == "rules":
            for action in ("deny", "allow_with_shadow_deny", "allow"):
                for j, m in enumerate(getattr(default, action, None) or ()):
                    at: Path = ("rules", i, "default", _CAMEL[action], j)
                    r = Ranked(key, 0, conf, d, at, (top_kind, f"{action} {_describe(m)}"))
                    out.append(InboundRule(dst, when, m, r, action))
            continue
        matches = getattr(item, "matches", None) if section == "rules" else None
        for j, m in enumerate(matches or [None]):
            where: Path = (section, i) if m is None else (section, i, "matches", j)
            r = Ranked(key, 0, conf, d, where, (top_kind, _describe(m)))
            out.append(InboundRule(dst, when, m, r))
    return out


_CAMEL = {"deny": "deny", "allow": "allow", "allow_with_shadow_deny": "allowWithShadowDeny"}


def identity(mesh: str, service: str) -> str:
    """A meshc data plane's SPIFFE ID (``compiler.ca``, ``runtime.protocol``)."""
    return f"spiffe://{mesh}/{service}"


def _spiffe_covers(match: Any, mesh: str, service: str) -> bool:
    s = match.spiffe_id
    ident = identity(mesh, service)
    return bool(s.value == ident if s.type == "Exact" else ident.startswith(s.value))


def _covers_everyone(match: Any, mesh: str) -> bool:
    """Whether a match covers every identity of the mesh (a Prefix of ``spiffe://<mesh>/``)."""
    s = match.spiffe_id
    return (
        s is not None and match.sni is None and s.type == "Prefix" and identity(mesh, "").startswith(s.value)
    )


def _specificity(match: Any) -> tuple[int, int]:
    """Least specific first: Prefix (shorter first), then Exact (``compareMatchedRouteSpecificity``)."""
    s = match.spiffe_id
    return (1, 0) if s.type == "Exact" else (0, len(s.value))


def compatible(a: Tags, b: Tags) -> bool:
    """Whether some instance can carry both tag sets (no key with two values)."""
    da = dict(a)
    return all(da.get(k, v) == v for k, v in b)


MAX_TAG_SETS = 64
"""How many instance tag sets ``tag_sets`` closes under union before it stops adding unions."""


def tag_sets(sets: Iterable[Tags]) -> list[Tags]:
    """The policies' tag conditions and every union of compatible ones, most specific first.

    Kuma merges every policy that selects an instance; a bundle takes the first rule whose tags
    the instance carries. With each union listed (longer, so ranked before its parts), the first
    rule an instance matches is the one for all the conditions it meets (up to ``MAX_TAG_SETS``)."""
    found = set(sets)
    todo = list(found)
    while todo and len(found) < MAX_TAG_SETS:
        a = todo.pop()
        for b in list(found):
            u = tuple(sorted({*a, *b}))
            if u not in found and compatible(a, b) and len(found) < MAX_TAG_SETS:
                found.add(u)
                todo.append(u)
    return sorted(found, key=lambda w: (-len(w), w))


def _groups(
    rules: list[InboundRule], services: Iterable[str]
) -> Iterable[tuple[str, Tags, list[InboundRule]]]:
    """(service, instance tags, the rules that select those instances), most specific tags first."""
    for svc in sorted(services):
        mine = [r for r in rules if r.dst in (svc, "*")]
        for when in tag_sets(r.when for r in mine):
            yield svc, when, [r for r in mine if set(r.when) <= set(when)]


Covers = dict[int, frozenset[str]]
"""``id`` of a rule with a ``spiffeID`` match -> the callers it covers."""


def _usable(
    rules: list[InboundRule], mesh: str, callers: list[str], out: list[Diagnostic], warn: Warn
) -> tuple[list[InboundRule], Covers]:
    """The rules a bundle can apply, with the callers each match covers: W3006 at an ``sni``
    match (left out), and at a ``spiffeID`` match that covers no caller (it matches nobody here)."""
    kept = []
    covers: Covers = {}
    for r in rules:
        m = r.match
        why = None
        if m is not None and m.sni is not None:
            why = "an `sni` match (meshc's sidecars do not match callers by SNI)"
        elif m is not None and not callers:
            why = "a spiffeID match on a mesh without mTLS (as in Kuma, no caller has an identity to match)"
        elif m is not None:
            covers[id(r)] = frozenset(c for c in callers if _spiffe_covers(m, mesh, c))
            if not covers[id(r)]:
                why = (
                    f"a spiffeID match ({m.spiffe_id.type} {m.spiffe_id.value}) that covers no service of "
                    f"the mesh: meshc's identities are {identity(mesh, '<service>')}"
                )
            kept.append(r)
        else:
            kept.append(r)
        if why is not None:
            d = warn(r.ranked.policy, why, r.ranked.where)
            if d not in out:
                out.append(d)
    return kept, covers


def _named(members: list[InboundRule], covers: Covers) -> list[str]:
    """The callers some member's match covers, sorted (the only ones that can differ from all)."""
    return sorted(set().union(*(covers.get(id(r), frozenset()) for r in members)))


def rate_limit_rules(
    rules: list[InboundRule],
    mesh: str,
    services: list[str],
    callers: list[str],
    convert: Convert,
    out: list[Diagnostic],
    warn: Warn,
    tie: Tie,
) -> list[Resolved]:
    """MeshRateLimit: the common limit, and a limit per caller a ``spiffeID`` match covers."""
    res: list[Resolved] = []
    gaps: list[_Gap] = []
    usable, covers = _usable(rules, mesh, callers, out, warn)
    for svc, when, members in _groups(usable, services):
        ordered = _in_order(members)
        common = [r for r in ordered if r.match is None]
        _ties([r.ranked for r in common], "*", svc, out, tie)
        base = merged(r.ranked.default for r in common)
        has_base = bool(_http(base))
        matched = [r for r in ordered if r.match is not None and _http(r.ranked.default)]
        per_caller: dict[str, list[InboundRule]] = {}
        for c in _named(matched, covers):
            mine = [r for r in matched if c in covers[id(r)]]
            if mine:
                per_caller[c] = sorted(mine, key=lambda r: _specificity(r.match))
                for spec in {_specificity(r.match) for r in mine}:
                    _ties([r.ranked for r in mine if _specificity(r.match) == spec], c, svc, out, tie)
        for c, mine in sorted(per_caller.items()):
            applied = [*(common if has_base else []), *mine]
            conf = convert(merged(r.ranked.default for r in applied))
            if conf is None or _no_limit(conf):
                gaps.append(_Gap(svc, when, ((SERVICE_TAG, c),), mine[-1].ranked, f"no limit for {c}"))
                continue
            res.append(Resolved(svc, when, ((SERVICE_TAG, c),), conf, tuple(r.ranked for r in applied)))
        if has_base:
            conf = convert(base)
            if conf is not None and not _no_limit(conf):
                res.append(Resolved(svc, when, (), conf, tuple(r.ranked for r in common)))
            else:
                gaps.append(_Gap(svc, when, (), common[-1].ranked, "no limit"))
    _check_gaps(res, gaps, out, warn)
    return res


@dataclass(frozen=True)
class _Gap:
    """A rule deliberately not written (a limit turned off, a caller denied), which a broader
    bundle rule would then stand in for."""

    dst: str
    when: Tags
    peer: Tags
    by: Ranked
    what: str


def _check_gaps(res: list[Resolved], gaps: list[_Gap], out: list[Diagnostic], warn: Warn) -> None:
    """W3006 at each gap that a broader written rule fills (bundle rules cannot subtract)."""
    for g in gaps:
        for r in res:
            broader = set(r.when) <= set(g.when) and set(r.peer) <= set(g.peer)
            if r.dst == g.dst and broader and (r.when, r.peer) != (g.when, g.peer):
                inst = f"the instances of {g.dst} tagged {dict(g.when)}" if g.when else f"{g.dst}"
                what = f"{g.what} on {inst} under a broader rule (a bundle rule cannot take it back)"
                d = warn(g.by.policy, what, g.by.where)
                if d not in out:
                    out.append(d)
                break


def _ties(ranked: list[Ranked], src: str, dst: str, out: list[Diagnostic], tie: Tie) -> None:
    """W3004 where only two policies' names order rules merged for the same callers."""
    for a, z in name_ties(ranked):
        d = tie(a, z, src, dst)
        if d not in out:
            out.append(d)


def _in_order(rules: list[InboundRule]) -> list[InboundRule]:
    by_id = {id(r.ranked): r for r in rules}
    return [by_id[id(x)] for x in in_order(r.ranked for r in rules)]


def _http(conf: dict[str, Any]) -> Any:
    local = conf.get("local")
    return local.get("http") if isinstance(local, dict) else None


def _no_limit(conf: BaseModel) -> bool:
    return getattr(conf, "requests", 1) == 0


def fault_rules(
    rules: list[InboundRule],
    mesh: str,
    services: list[str],
    callers: list[str],
    convert: Convert,
    out: list[Diagnostic],
    warn: Warn,
) -> list[Resolved]:
    """MeshFaultInjection: each caller gets the faults of every rule that covers it."""
    res: list[Resolved] = []
    usable, covers = _usable(rules, mesh, callers, out, warn)
    for svc, when, members in _groups(usable, services):
        ordered = _in_order(members)
        common = [r for r in ordered if r.match is None]
        per_caller = {
            c: [r for r in ordered if r.match is None or c in covers[id(r)]] for c in _named(ordered, covers)
        }
        for c, applied in sorted(per_caller.items()):
            if len(applied) == len(common):
                continue  # the common faults: the rule for every caller below
            res.extend(_faults(svc, when, ((SERVICE_TAG, c),), applied, convert, out, warn))
        if common:
            res.extend(_faults(svc, when, (), common, convert, out, warn))
    return res


def _faults(
    svc: str,
    when: Tags,
    peer: Tags,
    applied: list[InboundRule],
    convert: Convert,
    out: list[Diagnostic],
    warn: Warn,
) -> list[Resolved]:
    faults = [f for r in applied for f in r.ranked.default.get("http") or ()]
    conf = convert({"http": faults})
    if conf is None:
        top = applied[-1].ranked
        d = warn(
            top.policy, "two faults of one kind for the same caller (a bundle holds one of each)", top.where
        )
        if d not in out:
            out.append(d)
        return []
    return [Resolved(svc, when, peer, conf, tuple(r.ranked for r in applied))]


def permission_rules(
    rules: list[InboundRule],
    mesh: str,
    services: list[str],
    callers: list[str],
    out: list[Diagnostic],
    warn: Warn,
) -> list[Resolved]:
    """MeshTrafficPermission: the callers some ``allow`` (or ``allowWithShadowDeny``) match covers
    and no ``deny`` match does; every caller of the mesh at once where that is all of them."""
    res: list[Resolved] = []
    gaps: list[_Gap] = []
    usable, covers = _usable(rules, mesh, callers, out, warn)
    for svc, when, members in _groups(usable, services):
        ordered = _in_order(members)
        deny = [r for r in ordered if r.action == "deny"]
        allow = [r for r in ordered if r.action != "deny"]
        denied = {c: r for r in deny for c in sorted(covers[id(r)])}
        if not denied and any(_covers_everyone(r.match, mesh) for r in allow):
            res.append(Resolved(svc, when, (), None, tuple(r.ranked for r in ordered)))
            continue
        for c in _named(ordered, covers):
            if c in denied:
                gaps.append(_Gap(svc, when, ((SERVICE_TAG, c),), denied[c].ranked, f"a deny of {c}"))
                continue
            by = [r for r in allow if c in covers[id(r)]]
            if by:
                shaped = (*(r.ranked for r in deny), *(r.ranked for r in by))  # explain: who shaped it
                res.append(Resolved(svc, when, ((SERVICE_TAG, c),), None, shaped))
    _check_gaps(res, gaps, out, warn)
    return res


def timeout_rules(
    rules: list[InboundRule],
    mesh: str,
    services: list[str],
    callers: list[str],
    convert: Convert,
    out: list[Diagnostic],
    warn: Warn,
    tie: Tie,
) -> list[Resolved]:
    """MeshTimeout: the rules without a match merged are the common timeouts (Kuma applies them
    where such a rule exists); a caller some ``spiffeID`` match covers gets them merged with every
    covering rule's ``http.requestTimeout``/``streamIdleTimeout``, least specific first (Kuma's
    per-caller route copies, ``mergeSubsumingMatchedRouteConfs``)."""
    res: list[Resolved] = []
    usable, covers = _usable(rules, mesh, callers, out, warn)
    for svc, when, members in _groups(usable, services):
        ordered = _in_order(members)
        common = [r for r in ordered if r.match is None]
        _ties([r.ranked for r in common], "*", svc, out, tie)
        matched = [r for r in ordered if r.match is not None and _route_timeouts(r.ranked.default)]
        for c in _named(matched, covers):
            mine = sorted((r for r in matched if c in covers[id(r)]), key=lambda r: _specificity(r.match))
            for spec in {_specificity(r.match) for r in mine}:
                _ties([r.ranked for r in mine if _specificity(r.match) == spec], c, svc, out, tie)
            applied = [*common, *mine]
            conf = convert(merged(r.ranked.default for r in applied))
            if conf is not None:
                res.append(Resolved(svc, when, ((SERVICE_TAG, c),), conf, tuple(r.ranked for r in applied)))
        if common:
            conf = convert(merged(r.ranked.default for r in common))
            if conf is not None:
                res.append(Resolved(svc, when, (), conf, tuple(r.ranked for r in common)))
    return res


def _route_timeouts(conf: dict[str, Any]) -> bool:
    """Whether a matched rule sets what Kuma's per-caller routes carry (``matchedRouteTimeoutRules``)."""
    http = conf.get("http")
    return isinstance(http, dict) and any(
        http.get(k) is not None for k in ("request_timeout", "stream_idle_timeout")
    )


def limit_rules(
    rules: list[InboundRule],
    services: list[str],
    convert: Convert,
    out: list[Diagnostic],
    tie: Tie,
) -> list[Resolved]:
    """MeshCircuitBreaker: the rules (none has a match) merged are the connection limits and
    outlier detection of the local app for every caller (``MatchesAllIncomingTraffic``); no rule
    where they set neither limits nor a detector the sidecar runs."""
    res: list[Resolved] = []
    for svc, when, members in _groups(rules, services):
        common = [r for r in _in_order(members) if r.match is None]
        _ties([r.ranked for r in common], "*", svc, out, tie)
        m = merged(r.ranked.default for r in common)
        if not m.get("connection_limits") and not _ejects(m.get("outlier_detection")):
            continue
        conf = convert(m)
        if conf is not None:
            res.append(Resolved(svc, when, (), conf, tuple(r.ranked for r in common)))
    return res


def _ejects(od: Any) -> bool:
    """Whether a merged outlierDetection has a consecutive detector on (the ones the sidecar runs)."""
    if not isinstance(od, dict) or od.get("disabled"):
        return False
    det = od.get("detectors") or {}
    return any(det.get(k) for k in ("total_failures", "gateway_failures", "local_origin_failures"))


def log_rules(
    rules: list[InboundRule],
    mesh: str,
    callers: list[str],
    convert: Callable[[dict[str, Any]], list[BaseModel]],
    out: list[Diagnostic],
    warn: Warn,
) -> list[Resolved]:
    """MeshAccessLog: every rule is its own access logs, gated by its match (Kuma writes one log
    per rule and backend, with the match as a CEL filter): a bundle rule per backend, for all
    callers or for each caller the match covers. Nothing merges, so rules are not grouped."""
    res: list[Resolved] = []
    usable, covers = _usable(rules, mesh, callers, out, warn)
    for r in _in_order(usable):
        peers = [()] if r.match is None else [((SERVICE_TAG, c),) for c in sorted(covers[id(r)])]
        for conf in convert(r.ranked.default):
            res.extend(Resolved(r.dst, r.when, peer, conf, (r.ranked,)) for peer in peers)
    return res
