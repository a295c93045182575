"""Service (meshc's catalog kind): a service, the port clients use and the subsets it runs.

Routes may target only declared subsets, so a typo in a canary's tags is caught before merge.

Valid::

    apiVersion: meshc/v1alpha1
    kind: Service
    mesh: default
    metadata: {name: benigno}
    spec:
      port: 5000
      protocol: http
      subsets: [{version: v1}, {version: v2}]

Invalid (a port out of range)::

    spec: {port: 70000}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from compiler.kinds.base import Finding, KindDef, Spec, tag_findings


class ServiceSpec(Spec):
    port: int
    """The port clients use in URLs (``http://benigno:5000``)."""
    protocol: Literal["http", "tcp"] = "http"
    """``http`` gets L7 routing; ``tcp`` is proxied per connection."""
    subsets: list[dict[str, str]] = []
    """The tag sets that instances carry; routes may target only these."""


def check(spec: ServiceSpec) -> Iterator[Finding]:
    if not 1 <= spec.port <= 65535:
        yield Finding(("port",), "E1005", "port must be in the range [1, 65535]")
    for i, subset in enumerate(spec.subsets):
        if not subset:
            yield Finding(("subsets", i), "E1005", "a subset needs at least one tag")
        if "kuma.io/service" in subset:
            yield Finding(
                ("subsets", i, "kuma.io/service"), "E1005", "a subset must not set kuma.io/service", True
            )
        yield from tag_findings(("subsets", i), dict(subset))
        if subset in spec.subsets[:i]:
            yield Finding(("subsets", i), "E1005", "this subset is declared twice")


KIND = KindDef("Service", "meshc/v1alpha1", ServiceSpec, check, "none", __doc__ or "")
