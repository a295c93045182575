"""MeshHealthCheck: active health checks from the clients' proxies to a destination (`to` only).

Kuma's defaults: interval 1m, timeout 15s, unhealthyThreshold 5, healthyThreshold 1,
healthyPanicThreshold 50, failTrafficOnPanic false, http.path `/`.
At least one of `http`, `tcp` and `grpc` must be set.

`grpc` calls the standard `grpc.health.v1.Health/Check` over HTTP/2 (h2c, or ALPN h2 over the
mesh's mTLS); only `status: SERVING` passes. `serviceName` is the `service` asked about (empty:
the whole server), `authority` the `:authority` (default: the destination's service name).
Kuma picks the check by the destination's protocol; meshc's `http` protocol covers gRPC services
too, so meshc runs `http` when it is set (and not disabled), else `grpc`, else `tcp`; a `grpc`
check beside an `http` one in the same `default` is W3006.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshHealthCheck
    metadata: {name: benigno-hc, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          default: {interval: 5s, http: {path: /health, expectedStatuses: [200]}}

A gRPC service::

    default: {interval: 5s, grpc: {serviceName: benigno.v1.Benigno}}

Invalid (no check type)::

    default: {interval: 5s}

Invalid (an authority that is not ``host`` or ``host:port``, E1005)::

    default: {grpc: {authority: "benigno /x"}}
"""

from __future__ import annotations

import re

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    I32,
    Bool,
    Found,
    GoDuration,
    IntOrString,
    KStr,
    TargetRef,
    at,
    duration_positive,
    is_file_path,
    kind_def,
    percentage,
    status_code,
    target_ref,
)


class TcpHealthCheck(Spec):
    disabled: Bool | None = None
    send: KStr | None = None
    """Bytes to send, base64."""
    receive: list[KStr] | None = None
    """Bytes expected back, base64 each."""


class HeaderKeyValue(Spec):
    name: KStr = ""
    value: KStr = ""


class HeaderModifier(Spec):
    set: list[HeaderKeyValue] | None = None
    add: list[HeaderKeyValue] | None = None


class HttpHealthCheck(Spec):
    disabled: Bool | None = None
    path: KStr | None = None
    """The path to request (default ``/``)."""
    request_headers_to_add: HeaderModifier | None = None
    expected_statuses: list[I32] | None = None
    """Statuses that count as healthy (default 200)."""


class GrpcHealthCheck(Spec):
    disabled: Bool | None = None
    service_name: KStr | None = None
    """The ``service`` of the ``HealthCheckRequest`` (default empty: the server as a whole)."""
    authority: KStr | None = None
    """The ``:authority`` of the check (default: the destination's service name)."""


_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?")
"""RFC 3986 ``host [":" port]`` (no userinfo): what an HTTP/2 ``:authority`` may carry."""


class Conf(Spec):
    interval: GoDuration | None = None
    """Time between checks (default 1m)."""
    timeout: GoDuration | None = None
    """How long to wait for an answer (default 15s)."""
    unhealthy_threshold: I32 | None = None
    """Failed checks before an endpoint is unhealthy (default 5)."""
    healthy_threshold: I32 | None = None
    """Passed checks before it is healthy again (default 1)."""
    initial_jitter: GoDuration | None = None
    interval_jitter: GoDuration | None = None
    interval_jitter_percent: I32 | None = None
    healthy_panic_threshold: IntOrString | None = None
    """Below this share of healthy endpoints, all are used (default 50)."""
    fail_traffic_on_panic: Bool | None = None
    event_log_path: KStr | None = None
    always_log_health_check_failures: Bool | None = None
    no_traffic_interval: GoDuration | None = None
    tcp: TcpHealthCheck | None = None
    http: HttpHealthCheck | None = None
    grpc: GrpcHealthCheck | None = None
    reuse_connection: Bool | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class MeshHealthCheckSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
_TO = ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService")


def _default(path: Path, conf: Conf | None) -> Found:
    c = conf or Conf()
    for f, d in (
        ("interval", c.interval),
        ("timeout", c.timeout),
    ):
        yield from duration_positive((*path, f), d)
    for f, n in (("unhealthyThreshold", c.unhealthy_threshold), ("healthyThreshold", c.healthy_threshold)):
        if n is not None and n <= 0:
            yield (*path, f), "must be greater than zero when defined"
    yield from duration_positive((*path, "initialJitter"), c.initial_jitter)
    yield from duration_positive((*path, "intervalJitter"), c.interval_jitter)
    if c.interval_jitter_percent is not None and not 0 <= c.interval_jitter_percent <= 100:
        yield (*path, "intervalJitterPercent"), "must be in inclusive range [0, 100]"
    yield from percentage((*path, "healthyPanicThreshold"), c.healthy_panic_threshold, required=False)
    yield from duration_positive((*path, "noTrafficInterval"), c.no_traffic_interval)
    if c.event_log_path is not None and not is_file_path(c.event_log_path):
        yield (*path, "eventLogPath"), "must be a valid path when defined"
    if c.http is not None:
        if c.http.path is not None and c.http.path == "":
            yield (*path, "http", "path"), "must be defined"
        for i, s in enumerate(c.http.expected_statuses or []):
            yield from status_code((*path, "http", "expectedStatuses", i), s)
    if c.grpc is not None and c.grpc.authority and not _AUTHORITY.fullmatch(c.grpc.authority):
        # meshc's own rule (Kuma takes any text): HTTP/2 allows only host[:port] there (RFC 9113
        # §8.3.1), so a peer would refuse every check and the endpoints could never pass.
        yield (*path, "grpc", "authority"), "must be a valid authority (host or host:port)"
    if c.http is None and c.tcp is None and c.grpc is None:
        yield path, "must have at least one defined: http, tcp, grpc"


def not_applied(conf: Conf | None) -> Found:
    """A ``grpc`` check beside an enabled ``http`` one: meshc runs the HTTP one (see the module doc)."""
    if conf is None or conf.grpc is None or conf.grpc.disabled:
        return
    if conf.http is not None and not conf.http.disabled:
        yield ("grpc",), "a `grpc` check beside an `http` one (meshc runs `http`)"


def check(spec: MeshHealthCheckSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True))
    for i, t in enumerate(spec.to or []):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, _TO))
        yield from _default(("to", i, "default"), t.default)


KIND = kind_def("MeshHealthCheck", MeshHealthCheckSpec, check, __doc__ or "", compiled=True)
