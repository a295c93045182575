"""Timeout: connect, request and idle timeouts from a source to a destination.

Defaults (Kuma's ``timeout-all-default``): connectTimeout 5s, tcp.idleTimeout 1h,
http.requestTimeout 15s, http.idleTimeout 1h, http.streamIdleTimeout 30m.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: Timeout
    mesh: default
    metadata: {name: benigno-timeout}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf: {connectTimeout: 2s, http: {requestTimeout: 3s}}

Invalid (an empty section)::

    conf: {http: {}}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.kinds._base import Duration, Finding, KindDef, Selector, Spec, check_selectors


class Tcp(Spec):
    idle_timeout: Duration | None = None


class Http(Spec):
    request_timeout: Duration | None = None
    idle_timeout: Duration | None = None
    stream_idle_timeout: Duration | None = None
    max_stream_duration: Duration | None = None


class Grpc(Spec):
    stream_idle_timeout: Duration | None = None
    max_stream_duration: Duration | None = None


class Conf(Spec):
    connect_timeout: Duration | None = None
    tcp: Tcp | None = None
    http: Http | None = None
    grpc: Grpc | None = None
    """Deprecated in Kuma; accepted and ignored by the data plane."""


class TimeoutSpec(Spec):
    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None
    conf: Conf | None = None


def check(spec: TimeoutSpec) -> Iterator[Finding]:
    yield from check_selectors("sources", spec.sources)
    yield from check_selectors("destinations", spec.destinations, only_service=True)
    c = spec.conf
    if c is None:
        yield Finding(("conf",), "E1003", "has to be defined")
        return
    for name, section in (("tcp", c.tcp), ("http", c.http), ("grpc", c.grpc)):
        if section is not None and all(getattr(section, n) is None for n in type(section).model_fields):
            yield Finding(("conf", name), "E1003", "at least one timeout in section has to be defined")


KIND = KindDef("Timeout", "kuma.io/v1alpha1", TimeoutSpec, check, "outbound", __doc__ or "")
