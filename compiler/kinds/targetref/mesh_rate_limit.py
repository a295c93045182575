"""MeshRateLimit: local rate limits on inbound HTTP requests and TCP connections.

Inbound (`from`, `rules`) for sidecars; `to` only when the top-level targetRef includes
gateways. A rate is `num` per `interval` (more than 50ms). `onRateLimit` sets the status
(default 429) and headers of the answer to a limited request.

meshc compiles `from` and `rules` as Kuma 2.14's inbound rules (`from` items are rules without a
match): those without a match, merged in policy order, are the common limit; a caller that a
`spiffeID` match covers (`spiffe://<mesh>/<service>`) gets the common limit merged with its
matching rules, least specific first. An `sni` match is not applied (W3006).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshRateLimit
    metadata: {name: benigno-rl, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: MeshService, name: benigno}
      from:
        - targetRef: {kind: Mesh}
          default: {local: {http: {requestRate: {num: 100, interval: 1s}}}}

Invalid (an interval too short)::

    default: {local: {http: {requestRate: {num: 100, interval: 10ms}}}}
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    U32,
    Bool,
    Found,
    GoDuration,
    KStr,
    Match,
    TargetRef,
    alias,
    at,
    includes_gateways,
    int_positive,
    kind_def,
    matches_with_spiffe,
    target_ref,
    top,
)


class Rate(Spec):
    num: U32 = 0
    """Requests (or connections) allowed per interval."""
    interval: GoDuration = 0
    """The interval (more than 50ms)."""


class HeaderKeyValue(Spec):
    name: KStr = ""
    value: KStr = ""


class HeaderModifier(Spec):
    set: list[HeaderKeyValue] | None = None
    add: list[HeaderKeyValue] | None = None


class OnRateLimit(Spec):
    status: U32 | None = None
    """The status of the answer (default 429)."""
    headers: HeaderModifier | None = None


class LocalHttp(Spec):
    disabled: Bool | None = None
    request_rate: Rate | None = None
    on_rate_limit: OnRateLimit | None = None


class LocalTcp(Spec):
    disabled: Bool | None = None
    connection_rate: Rate | None = None


class Local(Spec):
    http: LocalHttp | None = None
    tcp: LocalTcp | None = None


class Conf(Spec):
    local: Local | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    default: Conf | None = None


class MeshRateLimitSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    from_: list[From] | None = alias("from", "from_")
    to: list[To] | None = None
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "MeshHTTPRoute", "Dataplane")
_GATEWAY = (
    "must not be defined when the scope includes a Gateway, select only proxyType Sidecar "
    "or select only gateways and use spec.to"
)
_SPIFFE = (
    "can't be specified when matches contain spiffeID because this field cannot be conditioned on "
    "source identity"
)


def _rate(path: Path, r: Rate) -> Found:
    if r.num <= 0:
        yield (*path, "num"), "must be greater than 0"
    if r.interval <= 50:
        yield (*path, "interval"), "must be greater than: 50ms"


def _default(path: Path, conf: Conf | None) -> Found:
    p: Path = (*path, "local")
    local = (conf or Conf()).local
    if local is None:
        yield p, "must be defined"
        return
    if local.tcp is None and local.http is None:
        yield p, "must have at least one defined: tcp, http"
    if (h := local.http) is not None:
        if h.disabled is None and h.request_rate is None and h.on_rate_limit is None:
            yield (*p, "http"), "must have at least one defined: disabled, requestRate, onRateLimit"
        if h.request_rate is not None:
            yield from _rate((*p, "http", "requestRate"), h.request_rate)
        if h.on_rate_limit is not None:
            yield from int_positive((*p, "http", "onRateLimit", "status"), h.on_rate_limit.status)
    if (t := local.tcp) is not None:
        if t.disabled is None and t.connection_rate is None:
            yield (*p, "tcp"), "must have at least one defined: disabled, connectionRate"
        if t.connection_rate is not None:
            yield from _rate((*p, "tcp", "connectionRate"), t.connection_rate)


def _source_conditioned(path: Path, conf: Conf | None) -> Found:
    local = (conf or Conf()).local
    if local is not None and local.tcp is not None:
        yield (*path, "local", "tcp"), _SPIFFE


def check(spec: MeshRateLimitSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    if rules and (to or frm):
        yield (), "fields 'to' and 'from' must be empty when 'rules' is defined"
    if spec.target_ref is not None:
        yield from at(
            ("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True, inbound=bool(rules or frm))
        )
    ref = top(spec.target_ref)
    if includes_gateways(ref) and rules:
        yield ("rules",), "must not be defined"
    if ref.kind == "MeshHTTPRoute" and rules:
        yield ("rules",), "must not be defined"
    for i, r in enumerate(rules):
        p: Path = ("rules", i)
        yield from matches_with_spiffe(
            (*p, "matches"), r.matches, _source_conditioned((*p, "default"), r.default)
        )
        yield from _default((*p, "default"), r.default)
    if includes_gateways(ref) and frm:
        yield ("from",), _GATEWAY
    elif ref.kind == "MeshHTTPRoute" and frm:
        yield ("from",), "must not be defined when spec.kind is MeshHTTPRoute"
    else:
        for i, f in enumerate(frm):
            yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
            yield from _default(("from", i, "default"), f.default)
    if not includes_gateways(ref) and to:
        yield ("to",), "must not be defined"
    else:
        for i, t in enumerate(to):
            yield from at(("to", i, "targetRef"), target_ref(t.target_ref, ("Mesh",)))
            yield from _default(("to", i, "default"), t.default)


KIND = kind_def("MeshRateLimit", MeshRateLimitSpec, check, __doc__ or "", compiled=True)
