"""TrafficPermission: which callers may reach a service (inbound; enforced once mTLS is on).

Permissions add up: a caller is allowed when any permission allows it (Kuma's silent shadowing,
kumahq/kuma#2417, is not reproduced).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: TrafficPermission
    mesh: default
    metadata: {name: magnanimo-to-benigno}
    spec:
      sources: [{match: {kuma.io/service: magnanimo}}]
      destinations: [{match: {kuma.io/service: benigno}}]

Invalid (no sources)::

    spec: {destinations: [{match: {kuma.io/service: benigno}}]}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.kinds._base import Finding, KindDef, Selector, Spec, check_selectors


class TrafficPermissionSpec(Spec):
    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None


def check(spec: TrafficPermissionSpec) -> Iterator[Finding]:
    yield from check_selectors("sources", spec.sources, require_service=False)
    yield from check_selectors("destinations", spec.destinations, require_service=False)


KIND = KindDef(
    "TrafficPermission", "kuma.io/v1alpha1", TrafficPermissionSpec, check, "inbound", __doc__ or ""
)
