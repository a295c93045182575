"""RateLimit: a local token bucket at a destination's inbound, per source.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: RateLimit
    mesh: default
    metadata: {name: benigno-limit}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf:
        http:
          requests: 100
          interval: 1s
          onRateLimit: {status: 429, headers: [{key: x-limited, value: "true"}]}

Invalid (no interval)::

    conf: {http: {requests: 5}}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.kinds._base import Duration, Finding, KindDef, Selector, Spec, check_selectors


class Header(Spec):
    key: str | None = None
    value: str | None = None
    append: bool | None = None


class OnRateLimit(Spec):
    status: int | None = None
    headers: list[Header] = []


class Http(Spec):
    requests: int | None = None
    interval: Duration | None = None
    on_rate_limit: OnRateLimit | None = None


class Conf(Spec):
    http: Http | None = None


class RateLimitSpec(Spec):
    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None
    conf: Conf | None = None


def check(spec: RateLimitSpec) -> Iterator[Finding]:
    yield from check_selectors("sources", spec.sources, require_service=False)
    yield from check_selectors("destinations", spec.destinations, require_service=False)
    c = spec.conf
    if c is None:
        yield Finding(("conf",), "E1003", "must have conf")
        return
    if c.http is not None:
        h = c.http
        if not h.requests:
            yield Finding(("conf", "http", "requests"), "E1003", "requests must be set")
        if not h.interval:
            yield Finding(("conf", "http", "interval"), "E1003", "interval must be set")
        if h.on_rate_limit is not None:
            if h.on_rate_limit.status is not None and not 100 <= h.on_rate_limit.status <= 599:
                yield Finding(
                    ("conf", "http", "onRateLimit", "status"), "E1005", "must be an HTTP status code"
                )
            for i, hd in enumerate(h.on_rate_limit.headers):
                if not hd.key:
                    yield Finding(
                        ("conf", "http", "onRateLimit", "headers", i, "key"), "E1003", "key must be set"
                    )
                if not hd.value:
                    yield Finding(
                        ("conf", "http", "onRateLimit", "headers", i, "value"), "E1003", "value must be set"
                    )


KIND = KindDef("RateLimit", "kuma.io/v1alpha1", RateLimitSpec, check, "inbound", __doc__ or "")
