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

from compiler.kinds.base import ConfContext, Duration, Finding, SelectorSpec, Spec, or_default, selector_kind
from runtime import bundle as b


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


class TimeoutSpec(SelectorSpec):
    conf: Conf | None = None


def check_conf(spec: TimeoutSpec) -> Iterator[Finding]:
    c = spec.conf
    if c is None:
        yield Finding(("conf",), "E1003", "has to be defined")
        return
    for name, section in (("tcp", c.tcp), ("http", c.http), ("grpc", c.grpc)):
        if section is not None and all(getattr(section, n) is None for n in type(section).model_fields):
            yield Finding(("conf", name), "E1003", "at least one timeout in section has to be defined")


def to_conf(spec: TimeoutSpec, ctx: ConfContext) -> b.TimeoutConf:
    c = spec.conf
    assert c is not None
    d = b.TimeoutConf()
    http = c.http or Http()
    return b.TimeoutConf(
        connect_timeout_ms=or_default(c.connect_timeout, d.connect_timeout_ms),
        tcp_idle_timeout_ms=or_default(c.tcp.idle_timeout if c.tcp else None, d.tcp_idle_timeout_ms),
        http_request_timeout_ms=or_default(http.request_timeout, d.http_request_timeout_ms),
        http_idle_timeout_ms=or_default(http.idle_timeout, d.http_idle_timeout_ms),
        http_stream_idle_timeout_ms=or_default(http.stream_idle_timeout, d.http_stream_idle_timeout_ms),
        http_max_stream_duration_ms=or_default(http.max_stream_duration, d.http_max_stream_duration_ms),
    )


KIND = selector_kind(
    "Timeout",
    TimeoutSpec,
    check_conf,
    "outbound",
    __doc__ or "",
    bundle_field="timeout",
    to_conf=to_conf,
    default=b.TimeoutConf(),
)
