"""Retry: how a source's data plane retries failed requests to a destination.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: Retry
    mesh: default
    metadata: {name: benigno-retry}
    spec:
      sources: [{match: {kuma.io/service: '*'}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf:
        http:
          numRetries: 2
          perTryTimeout: 1s
          backOff: {baseInterval: 25ms, maxInterval: 250ms}
          retryOn: [gateway_error, connect_failure]

Invalid (no protocol section)::

    conf: {}
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.diagnostics import Path
from compiler.kinds.base import ConfContext, Duration, Finding, SelectorSpec, Spec, or_default, selector_kind
from runtime import bundle as b

HTTP_RETRY_ON = {
    "all_5xx",
    "gateway_error",
    "reset",
    "connect_failure",
    "envoy_ratelimited",
    "retriable_4xx",
    "refused_stream",
    "retriable_status_codes",
    "retriable_headers",
    "http3_post_connect_failure",
}
HTTP_METHODS = {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
GRPC_RETRY_ON = {"cancelled", "deadline_exceeded", "internal", "resource_exhausted", "unavailable"}


class BackOff(Spec):
    base_interval: Duration | None = None
    max_interval: Duration | None = None


class HttpRetry(Spec):
    num_retries: int | None = None
    per_try_timeout: Duration | None = None
    back_off: BackOff | None = None
    retriable_status_codes: list[int] | None = None
    retriable_methods: list[str] | None = None
    retry_on: list[str] | None = None


class GrpcRetry(Spec):
    num_retries: int | None = None
    per_try_timeout: Duration | None = None
    back_off: BackOff | None = None
    retry_on: list[str] | None = None


class TcpRetry(Spec):
    max_connect_attempts: int | None = None


class Conf(Spec):
    http: HttpRetry | None = None
    grpc: GrpcRetry | None = None
    tcp: TcpRetry | None = None


class RetrySpec(SelectorSpec):
    conf: Conf | None = None


def _common(path: Path, r: HttpRetry | GrpcRetry) -> Iterator[Finding]:
    if r.num_retries is not None and r.num_retries <= 0:
        yield Finding((*path, "numRetries"), "E1005", "has to be greater than 0 when defined")
    if r.per_try_timeout is not None and r.per_try_timeout <= 0:
        yield Finding((*path, "perTryTimeout"), "E1005", "has to be greater than 0 when defined")
    if r.back_off is not None:
        if r.back_off.base_interval is None:
            yield Finding((*path, "backOff", "baseInterval"), "E1003", "has to be defined")
        elif r.back_off.base_interval <= 0:
            yield Finding((*path, "backOff", "baseInterval"), "E1005", "has to be greater than 0")
        if r.back_off.max_interval is not None and r.back_off.max_interval <= 0:
            yield Finding((*path, "backOff", "maxInterval"), "E1005", "has to be greater than 0 when defined")


def _repeated(path: Path, values: list[str]) -> Iterator[Finding]:
    seen: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        seen.setdefault(v, []).append(i)
    for v, idx in sorted(seen.items()):
        if len(idx) > 1:
            yield Finding(path, "E1005", f"repeated value {v!r} at indexes {idx}")


def check_conf(spec: RetrySpec) -> Iterator[Finding]:
    c = spec.conf
    if c is None:
        yield Finding(("conf",), "E1003", "has to be defined")
        return
    if c.http is None and c.grpc is None and c.tcp is None:
        yield Finding(("conf",), "E1003", "missing protocol [grpc|http|tcp] configuration")
    if c.http is not None:
        h, p = c.http, ("conf", "http")
        if all(getattr(h, n) is None for n in type(h).model_fields):
            yield Finding(p, "E1005", "field cannot be empty")
        yield from _common(p, h)
        for i, m in enumerate(h.retriable_methods or []):
            if not m or m == "NONE":
                yield Finding((*p, "retriableMethods", i), "E1005", "field cannot be empty")
            elif m not in HTTP_METHODS:
                yield Finding(
                    (*p, "retriableMethods", i), "E1005", f"unknown method; use one of {sorted(HTTP_METHODS)}"
                )
        for i, r in enumerate(h.retry_on or []):
            if r not in HTTP_RETRY_ON:
                yield Finding(
                    (*p, "retryOn", i), "E1005", f"unknown retryOn value; use one of {sorted(HTTP_RETRY_ON)}"
                )
            elif r == "retriable_status_codes" and not h.retriable_status_codes:
                yield Finding(
                    (*p, "retryOn", i),
                    "E1005",
                    "retriableStatusCodes cannot be empty when this option is specified",
                )
        yield from _repeated((*p, "retryOn"), h.retry_on or [])
    if c.grpc is not None:
        g, p = c.grpc, ("conf", "grpc")
        if all(getattr(g, n) is None for n in type(g).model_fields):
            yield Finding(p, "E1005", "field cannot be empty")
        yield from _repeated((*p, "retryOn"), g.retry_on or [])
        yield from _common(p, g)
        for i, r in enumerate(g.retry_on or []):
            if r not in GRPC_RETRY_ON:
                yield Finding(
                    (*p, "retryOn", i), "E1005", f"unknown retryOn value; use one of {sorted(GRPC_RETRY_ON)}"
                )
    if c.tcp is not None and (c.tcp.max_connect_attempts is None or c.tcp.max_connect_attempts <= 0):
        yield Finding(("conf", "tcp", "maxConnectAttempts"), "E1005", "has to be greater than 0")


def _http_retry(r: HttpRetry | GrpcRetry) -> b.HttpRetry:
    back = None
    if r.back_off is not None and r.back_off.base_interval is not None:
        base = r.back_off.base_interval
        back = b.BackOff(
            base_interval_ms=base, max_interval_ms=or_default(r.back_off.max_interval, base * 10)
        )
    return b.HttpRetry(
        num_retries=or_default(r.num_retries, 5),
        per_try_timeout_ms=or_default(r.per_try_timeout, 0),
        back_off=back,
        retriable_status_codes=tuple(getattr(r, "retriable_status_codes", None) or ()),
        retriable_methods=tuple(m.upper() for m in getattr(r, "retriable_methods", None) or ()),
        retry_on=tuple(r.retry_on or ()),
    )


def to_conf(spec: RetrySpec, ctx: ConfContext) -> b.RetryConf:
    c = spec.conf
    assert c is not None
    return b.RetryConf(
        http=_http_retry(c.http) if c.http else None,
        grpc=_http_retry(c.grpc) if c.grpc else None,
        tcp=b.TcpRetry(max_connect_attempts=c.tcp.max_connect_attempts or 1) if c.tcp else None,
    )


KIND = selector_kind(
    "Retry", RetrySpec, check_conf, "outbound", __doc__ or "", bundle_field="retry", to_conf=to_conf
)
