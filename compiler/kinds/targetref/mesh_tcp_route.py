"""MeshTCPRoute: where outbound TCP connections to a destination go (weighted backends).

Each `to[]` entry names the destination and one rule whose `backendRefs` split connections by
`weight` (default 1). `to` only.

meshc compiles it into the route's split (what a TrafficRoute to a TCP service sets). A
MeshHTTPRoute to the same destination wins, as in Kuma (W3006 at the MeshTCPRoute); a second
rule is not applied (W3006).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshTCPRoute
    metadata: {name: benigno-tcp, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          rules:
            - default: {backendRefs: [{kind: MeshService, name: benigno-v2, weight: 1}]}

Invalid (a rule without backends)::

    rules: [{default: {}}]
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    BackendRef,
    Found,
    TargetRef,
    at,
    backend_ref,
    kind_def,
    target_ref,
    top,
)


class RuleConf(Spec):
    backend_refs: list[BackendRef] | None = None
    """Where connections go, split by weight."""


class Rule(Spec):
    default: RuleConf | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    """The destination: MeshService, MeshExternalService or MeshMultiZoneService (Mesh for gateways)."""
    rules: list[Rule] | None = None


class MeshTCPRouteSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None


TOP_KINDS = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
BACKEND_KINDS = ("MeshService", "MeshServiceSubset", "MeshExternalService", "MeshMultiZoneService")


def to_kinds(top_kind: str) -> tuple[str, ...]:
    """What a route's ``to[].targetRef`` may name (MeshHTTPRoute shares this rule)."""
    return (
        ("Mesh",)
        if top_kind == "MeshGateway"
        else ("MeshService", "MeshExternalService", "MeshMultiZoneService")
    )


def check(spec: MeshTCPRouteSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, TOP_KINDS, gateway_tags=True))
    kind = top(spec.target_ref).kind
    for i, t in enumerate(spec.to or []):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, to_kinds(kind)))
        for j, r in enumerate(t.rules or []):
            p: Path = ("to", i, "rules", j, "default", "backendRefs")
            refs = (r.default.backend_refs if r.default else None) or []
            if not refs:
                yield p, "must be defined"
            for k, b in enumerate(refs):
                yield from at((*p, k), target_ref(b, BACKEND_KINDS))
                yield from at((*p, k), backend_ref(b))


KIND = kind_def("MeshTCPRoute", MeshTCPRouteSpec, check, __doc__ or "", compiled=True)
