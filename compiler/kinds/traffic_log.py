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

from collections.abc import Iterator

from compiler.kinds._base import Finding, KindDef, Selector, Spec, check_selectors


class Conf(Spec):
    backend: str | None = None
    """A name from the Mesh's ``logging.backends``; empty means the Mesh's default backend."""


class TrafficLogSpec(Spec):
    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None
    conf: Conf | None = None


def check(spec: TrafficLogSpec) -> Iterator[Finding]:
    yield from check_selectors("sources", spec.sources)
    yield from check_selectors("destinations", spec.destinations)


KIND = KindDef("TrafficLog", "kuma.io/v1alpha1", TrafficLogSpec, check, "outbound", __doc__ or "")
