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

from compiler.kinds._base import Duration, Finding, KindDef, Selector, Spec, check_selectors


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


class CircuitBreakerSpec(Spec):
    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None
    conf: Conf | None = None


def check(spec: CircuitBreakerSpec) -> Iterator[Finding]:
    yield from check_selectors("sources", spec.sources)
    yield from check_selectors("destinations", spec.destinations, only_service=True)
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


KIND = KindDef("CircuitBreaker", "kuma.io/v1alpha1", CircuitBreakerSpec, check, "outbound", __doc__ or "")
