"""MeshMetric: which metrics proxies expose (sidecar profiles, applications) and to which backends.

A single top-level `default`: `sidecar.profiles` (`appendProfiles` All/Basic/None, regex,
prefix, exact or contains `include`/`exclude` selectors), application endpoints to scrape, and
Prometheus or OpenTelemetry backends.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshMetric
    metadata: {name: metrics, labels: {kuma.io/mesh: default}}
    spec:
      default:
        sidecar: {profiles: {appendProfiles: [{name: Basic}]}}
        backends: [{type: Prometheus, prometheus: {port: 5670, path: /metrics}}]

Invalid (an unknown profile)::

    default: {sidecar: {profiles: {appendProfiles: [{name: Everything}]}}}
"""

from __future__ import annotations

import re

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    U32,
    BackendResourceRef,
    Bool,
    Found,
    GoDuration,
    KStr,
    TargetRef,
    at,
    kind_def,
    otel_endpoint_or_ref,
    target_ref,
)


class Profile(Spec):
    name: KStr = ""
    """``All``, ``Basic`` or ``None``."""


class Selector(Spec):
    type: KStr = ""
    """``Prefix``, ``Regex``, ``Exact`` or ``Contains``."""
    match: KStr = ""


class Profiles(Spec):
    append_profiles: list[Profile] | None = None
    exclude: list[Selector] | None = None
    include: list[Selector] | None = None


class Sidecar(Spec):
    profiles: Profiles | None = None
    include_unused: Bool | None = None


class Application(Spec):
    name: KStr | None = None
    path: KStr = ""
    address: KStr | None = None
    port: U32 = 0


class PrometheusTls(Spec):
    mode: KStr = ""
    """``Disabled``, ``ProvidedTLS`` or ``ActiveMTLSBackend``."""


class Prometheus(Spec):
    client_id: KStr | None = None
    port: U32 = 0
    path: KStr = ""
    tls: PrometheusTls | None = None


class OpenTelemetry(Spec):
    endpoint: KStr = ""
    backend_ref: BackendResourceRef | None = None
    refresh_interval: GoDuration | None = None


class Backend(Spec):
    type: KStr = ""
    """``Prometheus`` or ``OpenTelemetry``."""
    prometheus: Prometheus | None = None
    open_telemetry: OpenTelemetry | None = None


class Conf(Spec):
    sidecar: Sidecar | None = None
    applications: list[Application] | None = None
    backends: list[Backend] | None = None


class MeshMetricSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    default: Conf | None = None


_TOP = ("Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "MeshGateway", "Dataplane")
_PORT = "port must be a valid (1-65535)"


def _selectors(path: Path, selectors: list[Selector]) -> Found:
    for i, s in enumerate(selectors):
        if s.type == "Regex":
            try:
                re.compile(s.match)
            except re.error:
                yield (*path, i, "match"), "invalid regex"
        elif s.type not in ("Prefix", "Exact", "Contains"):
            yield (
                (*path, i, "type"),
                f"unrecognized type '{s.type}' - 'Regex', 'Prefix', 'Exact' are supported",
            )


def _host_port(endpoint: str) -> Found:
    """Go's ``net.SplitHostPort``: a host (IPv6 in brackets) and a port after the last colon."""
    ok = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*):([^:]*)", endpoint) is not None
    if not ok:
        yield ("endpoint",), "must be in host:port format"


def check(spec: MeshMetricSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True))
    c = spec.default or Conf()
    if c.sidecar is not None and (p := c.sidecar.profiles) is not None:
        pp: Path = ("default", "sidecar", "profiles")
        if p.exclude is not None:
            yield from _selectors((*pp, "exclude"), p.exclude)
        if p.include is not None:
            yield from _selectors((*pp, "include"), p.include)
        for i, prof in enumerate(p.append_profiles or []):
            if prof.name not in ("All", "None", "Basic"):
                msg = f"unrecognized profile name '{prof.name}' - 'All', 'None', 'Basic' are supported"
                yield (*pp, "appendProfiles", i, "name"), msg
    for i, a in enumerate(c.applications or []):
        if not 0 < a.port <= 65535:
            yield ("default", "applications", i, "port"), _PORT
    for i, b in enumerate(c.backends or []):
        bp: Path = ("default", "backends", i)
        if b.type == "Prometheus":
            if b.prometheus is None:
                yield (*bp, "prometheus"), "must be defined"
            elif not 0 < b.prometheus.port <= 65535:
                yield (*bp, "prometheus", "port"), _PORT
        elif b.type == "OpenTelemetry":
            if b.open_telemetry is None:
                yield (*bp, "openTelemetry"), "must be defined"
            else:
                o = b.open_telemetry
                yield from at(
                    (*bp, "openTelemetry"), otel_endpoint_or_ref(o.endpoint, o.backend_ref, _host_port)
                )
        else:
            yield bp, "unrecognized type"


KIND = kind_def("MeshMetric", MeshMetricSpec, check, __doc__ or "")
