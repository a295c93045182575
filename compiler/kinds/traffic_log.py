"""TrafficLog: access logs for a source's requests to a destination, to a Mesh logging backend.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: TrafficLog
    mesh: default
    metadata: {name: all-traffic}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: '*'}}]
      conf: {backend: file}

Invalid (a backend the Mesh does not define, E2005)::

    conf: {backend: nowhere}
"""

from __future__ import annotations

from compiler.kinds.base import ConfContext, SelectorRules, SelectorSpec, Spec, selector_kind
from runtime import bundle as b


class Conf(Spec):
    backend: str | None = None
    """A name from the Mesh's ``logging.backends``; empty means the Mesh's default backend."""


class TrafficLogSpec(SelectorSpec):
    conf: Conf | None = None


def to_conf(spec: TrafficLogSpec, ctx: ConfContext) -> b.TrafficLogConf | None:
    """The named backend, else the mesh's first; no rule when the mesh has none (E2005 said so)."""
    name = spec.conf.backend if spec.conf else None
    backends = ctx.logging
    chosen = (
        next((x for x in backends if x.name == name), None) if name else (backends[0] if backends else None)
    )
    return b.TrafficLogConf(backend=chosen) if chosen is not None else None


KIND = selector_kind(
    "TrafficLog",
    TrafficLogSpec,
    None,
    "outbound",
    __doc__ or "",
    destinations=SelectorRules(),
    bundle_field="traffic_log",
    to_conf=to_conf,
)
