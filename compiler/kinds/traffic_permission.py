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

from compiler.kinds.base import ANY_TAGS, SelectorSpec, selector_kind


class TrafficPermissionSpec(SelectorSpec):
    pass


KIND = selector_kind(
    "TrafficPermission",
    TrafficPermissionSpec,
    None,
    "inbound",
    __doc__ or "",
    sources=ANY_TAGS,
    destinations=ANY_TAGS,
    bundle_field="permissions",
    additive=True,
)
