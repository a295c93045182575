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

from compiler.kinds.base import (
    ANY_TAGS,
    ConfContext,
    Duration,
    Finding,
    SelectorSpec,
    Spec,
    selector_kind,
)
from runtime import bundle as b


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


class RateLimitSpec(SelectorSpec):
    conf: Conf | None = None


def check_conf(spec: RateLimitSpec) -> Iterator[Finding]:
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


def to_conf(spec: RateLimitSpec, ctx: ConfContext) -> b.RateLimitConf | None:
    """Kuma's RateLimit has only an HTTP section: without it the policy adds no rule."""
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


KIND = selector_kind(
    "RateLimit",
    RateLimitSpec,
    check_conf,
    "inbound",
    __doc__ or "",
    sources=ANY_TAGS,
    destinations=ANY_TAGS,
    bundle_field="rate_limit",
    to_conf=to_conf,
)
