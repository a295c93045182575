"""HealthCheck: active health checking of a destination's endpoints by the sources' data planes.

An endpoint that fails ``unhealthyThreshold`` checks in a row gets no traffic until it passes
``healthyThreshold`` checks; when fewer than ``healthyPanicThreshold`` percent of endpoints are
healthy, traffic goes to all of them (Envoy's panic mode).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: HealthCheck
    mesh: default
    metadata: {name: benigno-health}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf: {interval: 10s, timeout: 2s, unhealthyThreshold: 3, healthyThreshold: 1, http: {path: /health}}

Invalid (``tcp`` and ``http`` together, E1011)::

    conf: {interval: 10s, timeout: 2s, unhealthyThreshold: 3, healthyThreshold: 1, tcp: {}, http: {path: /}}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.kinds.base import ConfContext, Duration, Finding, SelectorSpec, Spec, or_default, selector_kind
from runtime import bundle as b


class Header(Spec):
    key: str | None = None
    value: str | None = None


class HeaderToAdd(Spec):
    header: Header | None = None
    append: bool | None = None


class HttpCheck(Spec):
    path: str | None = None
    request_headers_to_add: list[HeaderToAdd] = []
    expected_statuses: list[int] = []


class TcpCheck(Spec):
    send: str | None = None
    receive: list[str] = []


class Conf(Spec):
    interval: Duration | None = None
    timeout: Duration | None = None
    unhealthy_threshold: int | None = None
    healthy_threshold: int | None = None
    initial_jitter: Duration | None = None
    interval_jitter: Duration | None = None
    interval_jitter_percent: int | None = None
    healthy_panic_threshold: float | None = None
    fail_traffic_on_panic: bool | None = None
    no_traffic_interval: Duration | None = None
    event_log_path: str | None = None
    always_log_health_check_failures: bool | None = None
    reuse_connection: bool | None = None
    tcp: TcpCheck | None = None
    http: HttpCheck | None = None


class HealthCheckSpec(SelectorSpec):
    conf: Conf | None = None


def check_conf(spec: HealthCheckSpec) -> Iterator[Finding]:
    c = spec.conf
    if c is None:
        yield Finding(("conf",), "E1003", "has to be defined")
        return
    for name in ("interval", "timeout", "unhealthyThreshold", "healthyThreshold"):
        value = getattr(c, _snake(name))
        if value is None or value <= 0:
            yield Finding(("conf", name), "E1005", "must have a positive value")
    for name in ("initialJitter", "intervalJitter", "noTrafficInterval"):
        value = getattr(c, _snake(name))
        if value is not None and value <= 0:
            yield Finding(("conf", name), "E1005", "must have a positive value")
    if c.interval_jitter_percent is not None and not 0 <= c.interval_jitter_percent <= 100:
        yield Finding(("conf", "intervalJitterPercent"), "E1005", "has to be in [0 - 100] range")
    if c.healthy_panic_threshold is not None and not 0 <= c.healthy_panic_threshold <= 100:
        yield Finding(("conf", "healthyPanicThreshold"), "E1005", "has to be in [0.0 - 100.0] range")
    if c.http is not None:
        if not c.http.path:
            yield Finding(("conf", "http", "path"), "E1005", "has to be defined and cannot be empty")
        for i, h in enumerate(c.http.request_headers_to_add):
            p = ("conf", "http", "requestHeadersToAdd", i)
            if h.header is None:
                yield Finding((*p, "header"), "E1003", "has to be defined")
            elif not h.header.key:
                yield Finding((*p, "header", "key"), "E1005", "cannot be empty")
        for i, s in enumerate(c.http.expected_statuses):
            if not 100 <= s <= 599:
                yield Finding(("conf", "http", "expectedStatuses", i), "E1005", "must be in range [100, 600)")
    if c.http is not None and c.tcp is not None:
        yield Finding(
            ("conf", "http"),
            "E1011",
            "http and tcp cannot be defined at the same time; keep one of them",
            True,
        )


def _snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name)


def to_conf(spec: HealthCheckSpec, ctx: ConfContext) -> b.HealthCheckConf:
    c = spec.conf
    assert c is not None and c.interval and c.timeout
    http = None
    if c.http is not None:
        http = b.HttpHealthCheck(
            path=c.http.path or "/",
            request_headers=tuple(
                b.HeaderChange(name=h.header.key or "", value=h.header.value or "", append=bool(h.append))
                for h in c.http.request_headers_to_add
                if h.header is not None
            ),
            expected_statuses=tuple(c.http.expected_statuses),
        )
    tcp = b.TcpHealthCheck(send=c.tcp.send, receive=tuple(c.tcp.receive)) if c.tcp is not None else None
    return b.HealthCheckConf(
        interval_ms=c.interval,
        timeout_ms=c.timeout,
        unhealthy_threshold=c.unhealthy_threshold or 1,
        healthy_threshold=c.healthy_threshold or 1,
        initial_jitter_ms=or_default(c.initial_jitter, 0),
        interval_jitter_ms=or_default(c.interval_jitter, 0),
        interval_jitter_percent=or_default(c.interval_jitter_percent, 0),
        healthy_panic_threshold=or_default(c.healthy_panic_threshold, 50.0),
        fail_traffic_on_panic=bool(c.fail_traffic_on_panic),
        no_traffic_interval_ms=or_default(c.no_traffic_interval, 60000),
        reuse_connection=or_default(c.reuse_connection, True),
        http=http,
        tcp=tcp,
    )


KIND = selector_kind(
    "HealthCheck",
    HealthCheckSpec,
    check_conf,
    "outbound",
    __doc__ or "",
    bundle_field="health_check",
    to_conf=to_conf,
)
