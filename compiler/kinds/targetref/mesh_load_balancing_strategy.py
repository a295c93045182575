"""MeshLoadBalancingStrategy: how clients pick an endpoint of a destination, and across zones.

`loadBalancer.type`: RoundRobin (Kuma's default), LeastRequest, RingHash, Random or Maglev;
`hashPolicies` feed RingHash and Maglev. `localityAwareness` keeps traffic in the local zone
and orders the failover to others. `to` only.

meshc compiles it into the route's load balancer (what TrafficRoute's `loadBalancer` sets),
beside the destination's MeshHTTPRoute or MeshTCPRoute split. `localityAwareness`,
`hashPolicies`, `activeRequestBias` and a Maglev `tableSize` have no place there and are not
applied (W3006 at each).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshLoadBalancingStrategy
    metadata: {name: benigno-lb, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          default: {loadBalancer: {type: LeastRequest, leastRequest: {choiceCount: 3}}}

Invalid (an unknown failover type)::

    default: {localityAwareness: {crossZone: {failover: [{to: {type: Somewhere}}]}}}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    U32,
    Bool,
    Found,
    GoDuration,
    IntOrString,
    KStr,
    TargetRef,
    alias,
    at,
    decimal_of,
    int_positive,
    kind_def,
    percentage,
    target_ref,
    top,
)
from runtime import bundle as b


class AffinityTag(Spec):
    key: KStr = ""
    """A tag whose value the client shares with preferred endpoints."""
    weight: U32 | None = None


class LocalZone(Spec):
    affinity_tags: list[AffinityTag] | None = None


class FromZone(Spec):
    zones: list[KStr] | None = None


class ToZone(Spec):
    type: KStr = ""
    """``None``, ``Only``, ``Any`` or ``AnyExcept``."""
    zones: list[KStr] | None = None


class Failover(Spec):
    from_: FromZone | None = alias("from", "from_")
    to: ToZone = ToZone()


class FailoverThreshold(Spec):
    percentage: IntOrString = 0


class CrossZone(Spec):
    failover: list[Failover] | None = None
    failover_threshold: FailoverThreshold | None = None


class LocalityAwareness(Spec):
    disabled: Bool | None = None
    local_zone: LocalZone | None = None
    cross_zone: CrossZone | None = None


class HashHeader(Spec):
    name: KStr = ""


class Cookie(Spec):
    name: KStr = ""
    ttl: GoDuration | None = None
    path: KStr | None = None


class Connection(Spec):
    source_ip: Bool | None = alias("sourceIP", "source_ip")


class FilterState(Spec):
    key: KStr = ""


class HashPolicy(Spec):
    type: KStr = ""
    """Header, Cookie, Connection, SourceIP, QueryParameter or FilterState."""
    terminal: Bool | None = None
    header: HashHeader | None = None
    cookie: Cookie | None = None
    connection: Connection | None = None
    query_parameter: HashHeader | None = None
    filter_state: FilterState | None = None


class RoundRobin(Spec):
    pass


class LeastRequest(Spec):
    choice_count: U32 | None = None
    """Endpoints compared per pick (default 2)."""
    active_request_bias: IntOrString | None = None


class RingHash(Spec):
    hash_function: KStr | None = None
    """``XXHash`` (default) or ``MurmurHash2``."""
    min_ring_size: U32 | None = None
    max_ring_size: U32 | None = None
    hash_policies: list[HashPolicy] | None = None


class Maglev(Spec):
    table_size: U32 | None = None
    hash_policies: list[HashPolicy] | None = None


class LoadBalancer(Spec):
    type: KStr = ""
    """RoundRobin, LeastRequest, RingHash, Random or Maglev."""
    round_robin: RoundRobin | None = None
    least_request: LeastRequest | None = None
    ring_hash: RingHash | None = None
    random: RoundRobin | None = None
    maglev: Maglev | None = None


class Conf(Spec):
    locality_awareness: LocalityAwareness | None = None
    load_balancer: LoadBalancer | None = None
    hash_policies: list[HashPolicy] | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class MeshLoadBalancingStrategySpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
_ROUTE_ONLY = "field is not allowed when targetRef.kind is MeshHTTPRoute, only hashPolicies is supported"


def _hash_policies(path: Path, policies: list[HashPolicy] | None) -> Found:
    for i, p in enumerate(policies or []):
        pp: Path = (*path, i)
        if p.type == "Header" and p.header is None:
            yield (*pp, "header"), "must be defined"
        elif p.type == "Cookie":
            if p.cookie is None:
                yield (*pp, "cookie"), "must be defined"
            elif p.cookie.path is not None and not p.cookie.path.startswith("/"):
                yield (*pp, "cookie", "path"), "must be an absolute path"
        elif p.type == "QueryParameter" and p.query_parameter is None:
            yield (*pp, "queryParameter"), "must be defined"
        elif p.type == "FilterState" and p.filter_state is None:
            yield (*pp, "filterState"), "must be defined"
        elif p.type in ("Connection", "SourceIP") and p.connection is None:
            yield (*pp, "connection"), "must be defined"


def _load_balancer(path: Path, lb: LoadBalancer) -> Found:
    if lb.type == "RingHash" and lb.ring_hash is not None:
        yield from _hash_policies((*path, "ringHash", "hashPolicies"), lb.ring_hash.hash_policies)
    elif lb.type == "Maglev" and lb.maglev is not None:
        yield from _hash_policies((*path, "maglev", "hashPolicies"), lb.maglev.hash_policies)
    elif lb.type == "LeastRequest" and lb.least_request is not None:
        bias = lb.least_request.active_request_bias
        if bias is not None:
            dec = decimal_of(bias)
            if dec is None:
                yield (*path, "leastRequest", "activeRequestBias"), "string must be a valid number"
            elif dec < 0:
                yield (*path, "leastRequest", "activeRequestBias"), "must be greater or equal then: 0"


def _cross_zone(path: Path, cz: CrossZone, to: To) -> Found:
    ref = to.target_ref
    if ref.kind == "MeshService" and (ref.section_name or ref.labels):
        yield path, "must not be set: MeshService traffic is local"
    for i, f in enumerate(cz.failover or []):
        fp: Path = (*path, "failover", i)
        if f.from_ is not None:
            if not f.from_.zones:
                yield (*fp, "from", "zones"), "must not be empty"
            for j, z in enumerate(f.from_.zones or []):
                if z == "":
                    yield (*fp, "from", "zones", j), "must not be empty"
        t = f.to.type
        if t in ("Any", "None"):
            if f.to.zones:
                yield (*fp, "to", "zones"), f"must be empty when type is {t}"
        elif t in ("AnyExcept", "Only"):
            if not f.to.zones:
                yield (*fp, "to", "zones"), f"must not be empty when type is {t}"
        else:
            yield (*fp, "to", "type"), "unrecognized type"
    if cz.failover_threshold is not None:
        yield from percentage(
            (*path, "failoverThreshold", "percentage"),
            cz.failover_threshold.percentage,
            required=True,
            allow0=False,
        )


def _locality(path: Path, la: LocalityAwareness, to: To) -> Found:
    if la.local_zone is not None:
        tags = la.local_zone.affinity_tags or []
        weighted = 0
        for i, t in enumerate(tags):
            tp: Path = (*path, "localZone", "affinityTags", i)
            if t.key == "":
                yield (*tp, "key"), "must not be empty"
            if t.weight is not None:
                yield from int_positive((*tp, "weight"), t.weight)
                weighted += 1
        if 0 < weighted != len(tags):
            yield (*path, "localZone", "affinityTags"), "all or none affinity tags should have weight"
    if la.cross_zone is not None:
        yield from _cross_zone((*path, "crossZone"), la.cross_zone, to)


def _conf(path: Path, to: To) -> Found:
    c = to.default or Conf()
    if to.target_ref.kind == "MeshHTTPRoute":
        yield from _hash_policies((*path, "hashPolicies"), c.hash_policies)
        if c.load_balancer is not None:
            yield (*path, "loadBalancer"), _ROUTE_ONLY
        if c.locality_awareness is not None:
            yield (*path, "localityAwareness"), _ROUTE_ONLY
        return
    if c.load_balancer is not None:
        yield from _load_balancer((*path, "loadBalancer"), c.load_balancer)
    if c.locality_awareness is not None:
        yield from _locality((*path, "localityAwareness"), c.locality_awareness, to)
    yield from _hash_policies((*path, "hashPolicies"), c.hash_policies)
    if c.hash_policies is not None and (lb := c.load_balancer) is not None:
        if lb.ring_hash is not None and lb.ring_hash.hash_policies is not None:
            yield (
                (*path, "loadBalancer", "ringHash", "hashPolicies"),
                "hashPolicies already specified in the root level",
            )
        if lb.maglev is not None and lb.maglev.hash_policies is not None:
            yield (
                (*path, "loadBalancer", "maglev", "hashPolicies"),
                "hashPolicies already specified in the root level",
            )


def check(spec: MeshLoadBalancingStrategySpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True))
    kind = top(spec.target_ref).kind
    for i, t in enumerate(spec.to or []):
        p: Path = ("to", i)
        error = None
        if kind == "MeshGateway":
            if t.default is not None and t.default.load_balancer is not None:
                kinds: tuple[str, ...] = ("Mesh",)
                error = f"value '{kind}' is not supported, only Mesh is allowed if loadBalancer is set"
            else:
                kinds = ("Mesh", "MeshService", "MeshMultiZoneService")
        else:
            kinds = ("Mesh", "MeshService", "MeshMultiZoneService", "MeshHTTPRoute")
        yield from at((*p, "targetRef"), target_ref(t.target_ref, kinds, kinds_error=error))
        if t.target_ref.kind == "MeshExternalService" and kind != "Mesh":
            yield (
                (*p, "targetRef", "kind"),
                (
                    "kind MeshExternalService is only allowed with targetRef.kind: Mesh as it is configured "
                    "on the Zone Egress and shared by all clients in the mesh"
                ),
            )
        yield from _conf((*p, "default"), t)


_TYPES: dict[str, Any] = {
    "RoundRobin": "round_robin",
    "LeastRequest": "least_request",
    "RingHash": "ring_hash",
    "Random": "random",
    "Maglev": "maglev",
}
_HASH = {"XXHash": "XX_HASH", "MurmurHash2": "MURMUR_HASH_2"}


def load_balancer(m: dict[str, Any]) -> b.LoadBalancer:
    """A merged ``default`` (snake_case) as the legacy load balancer the route bundle carries;
    what has no place there is named by ``not_applied``."""
    lb = m.get("load_balancer") or {}
    kind = _TYPES.get(lb.get("type") or "RoundRobin", "round_robin")
    d = b.LoadBalancer()
    if kind == "least_request":
        return b.LoadBalancer(
            type=kind, choice_count=(lb.get("least_request") or {}).get("choice_count") or 2
        )
    if kind == "ring_hash":
        ring = lb.get("ring_hash") or {}
        return b.LoadBalancer(
            type=kind,
            hash_function=_HASH.get(ring.get("hash_function") or "XXHash", d.hash_function),
            min_ring_size=ring.get("min_ring_size") or d.min_ring_size,
            max_ring_size=ring.get("max_ring_size") or d.max_ring_size,
        )
    return b.LoadBalancer(type=kind)


def not_applied(conf: Conf | None) -> Iterator[tuple[Path, str]]:
    """(path under ``default``, what) for each setting the bundle's load balancer cannot hold."""
    if conf is None:
        return
    if conf.locality_awareness is not None and not conf.locality_awareness.disabled:
        yield ("localityAwareness",), "`localityAwareness` (zone-aware routing and failover)"
    if conf.hash_policies:
        yield ("hashPolicies",), "`hashPolicies` (the sidecar hashes no request attribute)"
    lb = conf.load_balancer
    if lb is None:
        return
    if lb.least_request is not None and lb.least_request.active_request_bias is not None:
        yield ("loadBalancer", "leastRequest", "activeRequestBias"), "`activeRequestBias`"
    if lb.ring_hash is not None and lb.ring_hash.hash_policies:
        yield (
            ("loadBalancer", "ringHash", "hashPolicies"),
            "`hashPolicies` (the sidecar hashes no request attribute)",
        )
    if lb.maglev is not None and lb.maglev.table_size is not None:
        yield ("loadBalancer", "maglev", "tableSize"), "a Maglev `tableSize`"
    if lb.maglev is not None and lb.maglev.hash_policies:
        yield (
            ("loadBalancer", "maglev", "hashPolicies"),
            "`hashPolicies` (the sidecar hashes no request attribute)",
        )


KIND = kind_def(
    "MeshLoadBalancingStrategy", MeshLoadBalancingStrategySpec, check, __doc__ or "", compiled=True
)
