"""Policy conf (the YAML shape, validated) -> bundle conf (resolved, defaults filled, ms).

One function per kind; each is pure and total on a spec that passed its kind's checks.
"""

from __future__ import annotations

from typing import Any

from compiler.catalog import selector_service
from compiler.kinds import (
    circuit_breaker,
    fault_injection,
    health_check,
    mesh,
    rate_limit,
    retry,
    timeout,
    traffic_route,
)
from compiler.kinds._base import PROTOCOL_TAG, SERVICE_TAG
from runtime import bundle as b

__all__ = [
    "circuit_breaker_conf",
    "fault_injection_conf",
    "health_check_conf",
    "mesh_settings",
    "rate_limit_conf",
    "retry_conf",
    "route_conf",
    "split_of",
    "timeout_conf",
]


def _tags(t: dict[str, str | None] | None) -> dict[str, str]:
    return {k: v for k, v in (t or {}).items() if k not in (SERVICE_TAG, PROTOCOL_TAG) and v is not None}


def split_of(
    entries: list[traffic_route.SplitEntry] | None, dest: dict[str, str | None] | None
) -> tuple[b.Split, ...]:
    if dest is not None:
        return (b.Split(weight=100, service=selector_service(dest), tags=_tags(dest)),)
    return tuple(
        b.Split(
            weight=e.weight or 0, service=selector_service(e.destination or {}), tags=_tags(e.destination)
        )
        for e in entries or []
    )


def _sm(m: traffic_route.StringMatch | None) -> b.StringMatch | None:
    if m is None:
        return None
    for kind in ("exact", "prefix", "regex"):
        v = getattr(m, kind)
        if v is not None:
            return b.StringMatch(kind=kind, value=v)
    return None


def _ops(ops: traffic_route.HeaderOps | None) -> b.HeaderOps:
    if ops is None:
        return b.HeaderOps()
    return b.HeaderOps(
        add=tuple(b.HeaderChange(name=a.name or "", value=a.value or "", append=a.append) for a in ops.add),
        remove=tuple(r.name or "" for r in ops.remove),
    )


def _modify(m: traffic_route.Modify | None) -> b.HttpModify | None:
    if m is None:
        return None
    path = None
    if m.path is not None:
        path = b.PathRewrite(
            prefix=m.path.rewrite_prefix,
            regex=m.path.regex.pattern if m.path.regex else None,
            substitution=m.path.regex.substitution if m.path.regex else None,
        )
    host = None
    if m.host is not None:
        host = b.HostRewrite(
            value=m.host.value,
            from_path_regex=m.host.from_path.pattern if m.host.from_path else None,
            from_path_substitution=m.host.from_path.substitution if m.host.from_path else None,
        )
    return b.HttpModify(
        path=path,
        host=host,
        request_headers=_ops(m.request_headers),
        response_headers=_ops(m.response_headers),
    )


def _lb(lb: traffic_route.LoadBalancer | None) -> b.LoadBalancer:
    if lb is None:
        return b.LoadBalancer()
    if lb.least_request is not None:
        return b.LoadBalancer(type="least_request", choice_count=lb.least_request.choice_count)
    if lb.ring_hash is not None:
        rh = lb.ring_hash
        fn = rh.hash_function if rh.hash_function in ("XX_HASH", "MURMUR_HASH_2") else "XX_HASH"
        return b.LoadBalancer(
            type="ring_hash",
            hash_function=fn,
            min_ring_size=rh.min_ring_size or 1024,
            max_ring_size=rh.max_ring_size or 8388608,
        )
    if lb.random is not None:
        return b.LoadBalancer(type="random")
    if lb.maglev is not None:
        return b.LoadBalancer(type="maglev")
    return b.LoadBalancer()


def route_conf(spec: traffic_route.TrafficRouteSpec) -> b.RouteConf:
    c = spec.conf
    assert c is not None
    http = tuple(
        b.HttpRoute(
            match=b.HttpMatch(
                method=_sm(h.match.method) if h.match else None,
                path=_sm(h.match.path) if h.match else None,
                headers=tuple(
                    (name, sm)
                    for name, m in sorted((h.match.headers or {}).items())
                    if (sm := _sm(m)) is not None
                )
                if h.match
                else (),
            ),
            modify=_modify(h.modify),
            split=split_of(h.split, h.destination),
        )
        for h in c.http or []
    )
    return b.RouteConf(split=split_of(c.split, c.destination), http=http, load_balancer=_lb(c.load_balancer))


def default_route(service: str) -> b.RouteConf:
    return b.RouteConf(split=(b.Split(weight=100, service=service),))


def timeout_conf(spec: timeout.TimeoutSpec) -> b.TimeoutConf:
    c = spec.conf
    assert c is not None
    d = b.TimeoutConf()
    http = c.http or timeout.Http()
    return b.TimeoutConf(
        connect_timeout_ms=_or(c.connect_timeout, d.connect_timeout_ms),
        tcp_idle_timeout_ms=_or(c.tcp.idle_timeout if c.tcp else None, d.tcp_idle_timeout_ms),
        http_request_timeout_ms=_or(http.request_timeout, d.http_request_timeout_ms),
        http_idle_timeout_ms=_or(http.idle_timeout, d.http_idle_timeout_ms),
        http_stream_idle_timeout_ms=_or(http.stream_idle_timeout, d.http_stream_idle_timeout_ms),
        http_max_stream_duration_ms=_or(http.max_stream_duration, d.http_max_stream_duration_ms),
    )


def _or(v: Any, default: Any) -> Any:
    return default if v is None else v


def _http_retry(r: retry.HttpRetry | retry.GrpcRetry) -> b.HttpRetry:
    back = None
    if r.back_off is not None and r.back_off.base_interval is not None:
        base = r.back_off.base_interval
        back = b.BackOff(base_interval_ms=base, max_interval_ms=_or(r.back_off.max_interval, base * 10))
    return b.HttpRetry(
        num_retries=_or(r.num_retries, 5),
        per_try_timeout_ms=_or(r.per_try_timeout, 0),
        back_off=back,
        retriable_status_codes=tuple(getattr(r, "retriable_status_codes", None) or ()),
        retriable_methods=tuple(m.upper() for m in getattr(r, "retriable_methods", None) or ()),
        retry_on=tuple(r.retry_on or ()),
    )


def retry_conf(spec: retry.RetrySpec) -> b.RetryConf:
    c = spec.conf
    assert c is not None
    return b.RetryConf(
        http=_http_retry(c.http) if c.http else None,
        grpc=_http_retry(c.grpc) if c.grpc else None,
        tcp=b.TcpRetry(max_connect_attempts=c.tcp.max_connect_attempts or 1) if c.tcp else None,
    )


def circuit_breaker_conf(spec: circuit_breaker.CircuitBreakerSpec) -> b.CircuitBreakerConf:
    c = spec.conf
    assert c is not None
    d = b.CircuitBreakerConf()
    t = c.thresholds or circuit_breaker.Thresholds()
    det = c.detectors
    detectors = b.Detectors()
    if det is not None:

        def cons(x: circuit_breaker.Consecutive | None) -> b.Consecutive | None:
            return None if x is None else b.Consecutive(consecutive=_or(x.consecutive, 5))

        sd = det.standard_deviation
        fl = det.failure
        detectors = b.Detectors(
            total_errors=cons(det.total_errors),
            gateway_errors=cons(det.gateway_errors),
            local_errors=cons(det.local_errors),
            standard_deviation=None
            if sd is None
            else b.StandardDeviation(
                request_volume=_or(sd.request_volume, 100),
                minimum_hosts=_or(sd.minimum_hosts, 5),
                factor=_or(sd.factor, 1.9),
            ),
            failure=None
            if fl is None
            else b.FailurePercentage(
                request_volume=_or(fl.request_volume, 50),
                minimum_hosts=_or(fl.minimum_hosts, 5),
                threshold=_or(fl.threshold, 85),
            ),
        )
    return b.CircuitBreakerConf(
        interval_ms=_or(c.interval, d.interval_ms),
        base_ejection_time_ms=_or(c.base_ejection_time, d.base_ejection_time_ms),
        max_ejection_percent=_or(c.max_ejection_percent, d.max_ejection_percent),
        split_external_and_local_errors=bool(c.split_external_and_local_errors),
        thresholds=b.Thresholds(
            max_connections=_or(t.max_connections, 1024),
            max_pending_requests=_or(t.max_pending_requests, 1024),
            max_requests=_or(t.max_requests, 1024),
            max_retries=_or(t.max_retries, 3),
        ),
        detectors=detectors,
    )


def health_check_conf(spec: health_check.HealthCheckSpec) -> b.HealthCheckConf:
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
        initial_jitter_ms=_or(c.initial_jitter, 0),
        interval_jitter_ms=_or(c.interval_jitter, 0),
        interval_jitter_percent=_or(c.interval_jitter_percent, 0),
        healthy_panic_threshold=_or(c.healthy_panic_threshold, 50.0),
        fail_traffic_on_panic=bool(c.fail_traffic_on_panic),
        no_traffic_interval_ms=_or(c.no_traffic_interval, 60000),
        reuse_connection=_or(c.reuse_connection, True),
        http=http,
        tcp=tcp,
    )


def fault_injection_conf(spec: fault_injection.FaultInjectionSpec) -> b.FaultInjectionConf:
    c = spec.conf
    assert c is not None
    return b.FaultInjectionConf(
        delay=b.FaultDelay(percentage=c.delay.percentage or 0, value_ms=c.delay.value or 0)
        if c.delay
        else None,
        abort=b.FaultAbort(percentage=c.abort.percentage or 0, http_status=c.abort.http_status or 503)
        if c.abort
        else None,
        response_bandwidth=b.FaultBandwidth(
            percentage=c.response_bandwidth.percentage or 0,
            limit_bps=fault_injection.bandwidth_bps(c.response_bandwidth.limit or "0kbps"),
        )
        if c.response_bandwidth
        else None,
    )


def rate_limit_conf(spec: rate_limit.RateLimitSpec) -> b.RateLimitConf | None:
    c = spec.conf
    if c is None or c.http is None:
        return None
    h = c.http
    on = h.on_rate_limit
    return b.RateLimitConf(
        requests=h.requests or 1,
        interval_ms=h.interval or 1000,
        status=(on.status if on and on.status else 429),
        headers=tuple(
            b.HeaderChange(name=x.key or "", value=x.value or "", append=bool(x.append))
            for x in (on.headers if on else [])
        ),
    )


def logging_backends(spec: mesh.MeshSpec | None) -> tuple[b.LoggingBackend, ...]:
    if spec is None or spec.logging is None:
        return ()
    return tuple(
        b.LoggingBackend(
            name=x.name,
            type=x.type,
            format=x.format,
            path=x.conf.path if x.conf else None,
            address=x.conf.address if x.conf else None,
        )
        for x in spec.logging.backends
    )


def mesh_settings(spec: mesh.MeshSpec | None) -> tuple[b.Mtls, bool]:
    if spec is None:
        return b.Mtls(), True
    mtls = b.Mtls()
    if spec.mtls is not None and spec.mtls.enabled_backend:
        be = next((x for x in spec.mtls.backends if x.name == spec.mtls.enabled_backend), None)
        if be is not None:
            rot = be.dp_cert.rotation.expiration if be.dp_cert and be.dp_cert.rotation else None
            mtls = b.Mtls(
                enabled=True,
                mode=be.mode,
                backend=be.name,
                backend_type=be.type,
                cert_rotation_ms=rot or 86400000,
            )
    passthrough = True
    if spec.networking is not None and spec.networking.outbound is not None:
        passthrough = spec.networking.outbound.passthrough
    return mtls, passthrough
