"""CircuitBreaker: connection limits and outlier ejection for a destination's endpoints.

Defaults (Kuma's): interval 10s, baseEjectionTime 30s, maxEjectionPercent 10, thresholds
1024/1024/1024 and maxRetries 3, consecutive detectors 5.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: CircuitBreaker
    mesh: default
    metadata: {name: benigno-cb}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf: {baseEjectionTime: 5s, detectors: {totalErrors: {consecutive: 3}}}

Invalid (nothing configured)::

    conf: {}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.kinds.base import ConfContext, Duration, Finding, SelectorSpec, Spec, or_default, selector_kind
from runtime import bundle as b


class Consecutive(Spec):
    consecutive: int | None = None


class StandardDeviation(Spec):
    request_volume: int | None = None
    minimum_hosts: int | None = None
    factor: float | None = None


class Failure(Spec):
    request_volume: int | None = None
    minimum_hosts: int | None = None
    threshold: int | None = None


class Detectors(Spec):
    total_errors: Consecutive | None = None
    gateway_errors: Consecutive | None = None
    local_errors: Consecutive | None = None
    standard_deviation: StandardDeviation | None = None
    failure: Failure | None = None


class Thresholds(Spec):
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None


class Conf(Spec):
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    split_external_and_local_errors: bool | None = None
    detectors: Detectors | None = None
    thresholds: Thresholds | None = None


class CircuitBreakerSpec(SelectorSpec):
    conf: Conf | None = None


def check_conf(spec: CircuitBreakerSpec) -> Iterator[Finding]:
    c = spec.conf
    if c is None or (c.detectors is None and c.thresholds is None):
        yield Finding(("conf",), "E1003", "must have at least one of the detector or threshold configured")
        return
    if c.max_ejection_percent is not None and not 0 <= c.max_ejection_percent <= 100:
        yield Finding(("conf", "maxEjectionPercent"), "E1005", "has to be in [0.0 - 100.0] range")
    if c.detectors is not None:
        d = c.detectors
        if all(getattr(d, n) is None for n in type(d).model_fields):
            yield Finding(("conf", "detectors"), "E1005", "can't be empty")
        if d.failure is not None and d.failure.threshold is not None and not 0 <= d.failure.threshold <= 100:
            yield Finding(
                ("conf", "detectors", "failure", "threshold"), "E1005", "has to be in [0.0 - 100.0] range"
            )
    if c.thresholds is not None:
        t = c.thresholds
        if all(getattr(t, n) is None for n in type(t).model_fields):
            yield Finding(("conf", "thresholds"), "E1005", "can't be empty")


def _consecutive(x: Consecutive | None) -> b.Consecutive | None:
    return None if x is None else b.Consecutive(consecutive=or_default(x.consecutive, 5))


def _detectors(det: Detectors | None) -> b.Detectors:
    if det is None:
        return b.Detectors()
    sd = det.standard_deviation
    fl = det.failure
    return b.Detectors(
        total_errors=_consecutive(det.total_errors),
        gateway_errors=_consecutive(det.gateway_errors),
        local_errors=_consecutive(det.local_errors),
        standard_deviation=None
        if sd is None
        else b.StandardDeviation(
            request_volume=or_default(sd.request_volume, 100),
            minimum_hosts=or_default(sd.minimum_hosts, 5),
            factor=or_default(sd.factor, 1.9),
        ),
        failure=None
        if fl is None
        else b.FailurePercentage(
            request_volume=or_default(fl.request_volume, 50),
            minimum_hosts=or_default(fl.minimum_hosts, 5),
            threshold=or_default(fl.threshold, 85),
        ),
    )


def to_conf(spec: CircuitBreakerSpec, ctx: ConfContext) -> b.CircuitBreakerConf:
    c = spec.conf
    assert c is not None
    d = b.CircuitBreakerConf()
    t = c.thresholds or Thresholds()
    return b.CircuitBreakerConf(
        interval_ms=or_default(c.interval, d.interval_ms),
        base_ejection_time_ms=or_default(c.base_ejection_time, d.base_ejection_time_ms),
        max_ejection_percent=or_default(c.max_ejection_percent, d.max_ejection_percent),
        split_external_and_local_errors=bool(c.split_external_and_local_errors),
        thresholds=b.Thresholds(
            max_connections=or_default(t.max_connections, 1024),
            max_pending_requests=or_default(t.max_pending_requests, 1024),
            max_requests=or_default(t.max_requests, 1024),
            max_retries=or_default(t.max_retries, 3),
        ),
        detectors=_detectors(c.detectors),
    )


KIND = selector_kind(
    "CircuitBreaker",
    CircuitBreakerSpec,
    check_conf,
    "outbound",
    __doc__ or "",
    bundle_field="circuit_breaker",
    to_conf=to_conf,
)
