"""MeshFaultInjection: inject aborts, delays and bandwidth limits into HTTP traffic.

Inbound (`from`, `rules`) for sidecars; `to` only when the top-level targetRef includes
gateways. Each `http[]` entry may set `abort`, `delay` and `responseBandwidth`, each with a
`percentage` of the requests (0-100, decimals as strings).

meshc compiles `rules` as Kuma 2.x does: every rule is its own fault filter, so a caller gets the
faults of the rules without a match and of each rule whose `spiffeID` match covers it
(`spiffe://<mesh>/<service>`); at most one abort, delay and bandwidth limit each (W3006
otherwise). Where a policy with `rules` selects a proxy, `from` has no effect there (W3007).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshFaultInjection
    metadata: {name: benigno-faults, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: MeshService, name: benigno}
      from:
        - targetRef: {kind: Mesh}
          default: {http: [{abort: {httpStatus: 503, percentage: 10}}]}

Invalid (a status code out of range)::

    default: {http: [{abort: {httpStatus: 700, percentage: 10}}]}
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    I32,
    Found,
    GoDuration,
    IntOrString,
    KStr,
    Match,
    TargetRef,
    alias,
    at,
    includes_gateways,
    kind_def,
    percentage,
    status_code,
    target_ref,
    top,
    validate_match,
)


class Abort(Spec):
    http_status: I32 = 0
    """The status to answer with (100-599)."""
    percentage: IntOrString = 0
    """The share of requests, 0-100 (default 0: none)."""


class Delay(Spec):
    value: GoDuration = 0
    """How long to delay."""
    percentage: IntOrString = 0
    """The share of requests, 0-100 (default 0: none)."""


class ResponseBandwidth(Spec):
    limit: KStr = ""
    """A rate in kbps, Mbps or Gbps (e.g. ``100kbps``)."""
    percentage: IntOrString = 0
    """The share of requests, 0-100 (default 0: none)."""


class Fault(Spec):
    abort: Abort | None = None
    delay: Delay | None = None
    response_bandwidth: ResponseBandwidth | None = None


class Conf(Spec):
    http: list[Fault] | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    default: Conf | None = None


class MeshFaultInjectionSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    from_: list[From] | None = alias("from", "from_")
    to: list[To] | None = None
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
_GATEWAY = (
    "must not be defined when the scope includes a Gateway, select only proxyType Sidecar "
    "or select only gateways and use spec.to"
)


def _default(path: Path, conf: Conf | None) -> Found:
    """Kuma puts the index after the fault type (``http.abort[0]``); meshc points at the input."""
    import re

    for i, f in enumerate((conf or Conf()).http or []):
        p: Path = (*path, "http", i)
        if f.abort is not None:
            yield from status_code((*p, "abort", "httpStatus"), f.abort.http_status)
            yield from percentage((*p, "abort", "percentage"), f.abort.percentage, required=True)
        if f.delay is not None:
            if f.delay.value < 0:
                yield (*p, "delay", "value"), "must not be negative when defined"
            yield from percentage((*p, "delay", "percentage"), f.delay.percentage, required=True)
        if (b := f.response_bandwidth) is not None:
            if b.limit == "":
                yield (*p, "responseBandwidth", "limit"), "must be defined"
            elif not re.match(r"^(\d*)\s?([GMk]+bps)$", b.limit):
                yield (*p, "responseBandwidth", "limit"), "must be in kbps/Mbps/Gbps units"
            yield from percentage((*p, "responseBandwidth", "percentage"), b.percentage, required=True)


def check(spec: MeshFaultInjectionSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    if spec.target_ref is not None:
        yield from at(
            ("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True, inbound=bool(rules or frm))
        )
    ref = top(spec.target_ref)
    if frm and rules:
        yield (), "field 'from' must be empty when 'rules' is defined"
    for i, r in enumerate(rules):
        for j, m in enumerate(r.matches or []):
            yield from at(("rules", i, "matches", j), validate_match(m))
        yield from _default(("rules", i, "default"), r.default)
    if includes_gateways(ref) and frm:
        yield ("from",), _GATEWAY
    else:
        for i, f in enumerate(frm):
            kinds = ("Mesh", "MeshSubset", "MeshServiceSubset", "MeshService")
            yield from at(("from", i, "targetRef"), target_ref(f.target_ref, kinds))
            yield from _default(("from", i, "default"), f.default)
    if not includes_gateways(ref) and to:
        yield ("to",), "must not be defined"
    else:
        for i, t in enumerate(to):
            yield from at(("to", i, "targetRef"), target_ref(t.target_ref, ("Mesh",)))
            yield from _default(("to", i, "default"), t.default)


KIND = kind_def("MeshFaultInjection", MeshFaultInjectionSpec, check, __doc__ or "", compiled=True)
