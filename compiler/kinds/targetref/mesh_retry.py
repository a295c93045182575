"""MeshRetry: retries of failed outbound TCP connects, HTTP requests and gRPC calls (`to` only).

Kuma's defaults: tcp.maxConnectAttempt 5; http.numRetries 5, perTryTimeout 16s,
backOff 25ms..250ms, retryOn [5xx, GatewayError, Reset, Retriable4xx, ConnectFailure,
EnvoyRatelimited, RefusedStream]; grpc.numRetries 5, retryOn [Canceled, DeadlineExceeded,
Internal, ResourceExhausted, Unavailable]. `retryOn` also takes HTTP status codes.

On a MeshHTTPRoute (top-level `targetRef`, or a `to` item; by name or labels): the route's rules
retry by their own `http` and `grpc`, merged over the destination's; `tcp` stays the cluster's
(W3006).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshRetry
    metadata: {name: benigno-retry, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          default: {http: {numRetries: 3, retryOn: [5xx, "503"]}}

Invalid (an unknown retry condition)::

    default: {http: {retryOn: [Sometimes]}}
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

from pydantic import Field, Strict

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    I32,
    U32,
    Found,
    GoDuration,
    HeaderMatch,
    KStr,
    TargetRef,
    at,
    kind_def,
    target_ref,
    top,
)

I64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]


class Tcp(Spec):
    max_connect_attempt: U32 | None = None
    """Connect attempts before giving up (default 5)."""


class BackOff(Spec):
    base_interval: GoDuration | None = None
    """The first wait (default 25ms); it doubles up to ``maxInterval``."""
    max_interval: GoDuration | None = None
    """The longest wait (default 10 x baseInterval)."""


class ResetHeader(Spec):
    name: KStr = ""
    format: KStr = ""
    """``Seconds`` or ``UnixTimestamp``."""


class RateLimitedBackOff(Spec):
    reset_headers: list[ResetHeader] | None = None
    max_interval: GoDuration | None = None


class Predicate(Spec):
    predicate: KStr = ""
    """``OmitPreviousHosts``, ``OmitHostsWithTags`` or ``OmitPreviousPriorities``."""
    tags: dict[str, KStr] | None = None
    update_frequency: I32 = 0


class Http(Spec):
    num_retries: U32 | None = None
    per_try_timeout: GoDuration | None = None
    back_off: BackOff | None = None
    rate_limited_back_off: RateLimitedBackOff | None = None
    retry_on: list[KStr] | None = None
    """Conditions that trigger a retry: 5xx, GatewayError, Reset, Retriable4xx, ConnectFailure,
    EnvoyRatelimited, RefusedStream, Http3PostConnectFailure, HttpMethod<Method>, or a status code."""
    retriable_response_headers: list[HeaderMatch] | None = None
    retriable_request_headers: list[HeaderMatch] | None = None
    host_selection: list[Predicate] | None = None
    host_selection_max_attempts: I64 | None = None


class Grpc(Spec):
    num_retries: U32 | None = None
    per_try_timeout: GoDuration | None = None
    back_off: BackOff | None = None
    rate_limited_back_off: RateLimitedBackOff | None = None
    retry_on: list[KStr] | None = None
    """Canceled, DeadlineExceeded, Internal, ResourceExhausted, Unavailable."""


class Conf(Spec):
    tcp: Tcp | None = None
    http: Http | None = None
    grpc: Grpc | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class MeshRetrySpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None


PER_ROUTE = (("http",), ("grpc",))
"""What a conf for a MeshHTTPRoute sets on the route's rules (Kuma: the route's retry policy);
``tcp`` is the destination cluster's (``resolve_targetref`` warns W3006 at it)."""

_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "MeshHTTPRoute", "Dataplane")
_HTTP_RETRY_ON = {
    "5xx",
    "GatewayError",
    "Reset",
    "Retriable4xx",
    "ConnectFailure",
    "EnvoyRatelimited",
    "RefusedStream",
    "Http3PostConnectFailure",
    *(
        f"HttpMethod{m}"
        for m in ("Connect", "Delete", "Get", "Head", "Options", "Patch", "Post", "Put", "Trace")
    ),
}
_GRPC_RETRY_ON = {"Canceled", "DeadlineExceeded", "Internal", "ResourceExhausted", "Unavailable"}
_GO_STATUS = {s.value for s in HTTPStatus} | {306} - {103}


def _status(text: str) -> bool:
    """Go's ``http.StatusText(strconv.Atoi(text)) != ""``."""
    try:
        return int(text) in _GO_STATUS
    except ValueError:
        return False


def _rate_limited(path: Path, r: RateLimitedBackOff) -> Found:
    if r.max_interval is not None and r.max_interval <= 0:
        yield (*path, "maxInterval"), "must be defined and greater than zero"
    if r.reset_headers is None:
        yield (*path, "resetHeaders"), "must be defined"
    else:
        for i, h in enumerate(r.reset_headers):
            if h.name == "":
                yield (*path, "resetHeaders", i, "name"), "must be defined"


def _http(path: Path, h: Http) -> Found:
    if all(
        v is None
        for v in (
            h.num_retries,
            h.per_try_timeout,
            h.back_off,
            h.retry_on,
            h.retriable_request_headers,
            h.retriable_response_headers,
            h.rate_limited_back_off,
            h.host_selection,
        )
    ):
        yield path, "must not be empty"
    if h.back_off is not None and h.back_off.base_interval is None and h.back_off.max_interval is None:
        yield (*path, "backOff"), "must not be empty"
    if h.rate_limited_back_off is not None:
        yield from _rate_limited((*path, "rateLimitedBackOff"), h.rate_limited_back_off)
    for i, ro in enumerate(h.retry_on or []):
        if ro not in _HTTP_RETRY_ON and not _status(ro):
            yield (*path, "retryOn", i), f"unknown item '{ro}'"
    priority = False
    for i, p in enumerate(h.host_selection or []):
        pp: Path = (*path, "hostSelection", i)
        if p.predicate == "OmitHostsWithTags":
            if p.tags is None:
                yield (*pp, "tags"), "must be defined"
        elif p.predicate == "OmitPreviousPriorities":
            if priority:
                yield (*pp, "predicate"), "OmitPreviousPriorities must only be specified once"
            if p.update_frequency <= 0:
                yield (*pp, "updateFrequency"), "must be defined and greater than zero"
            priority = True
        elif p.predicate != "OmitPreviousHosts":
            yield (*pp, "predicate"), f"unknown predicate type '{p.predicate}'"


def _grpc(path: Path, g: Grpc) -> Found:
    if all(
        v is None for v in (g.num_retries, g.per_try_timeout, g.back_off, g.retry_on, g.rate_limited_back_off)
    ):
        yield path, "must not be empty"
    if g.back_off is not None and g.back_off.base_interval is None and g.back_off.max_interval is None:
        yield (*path, "backOff"), "must not be empty"
    if g.rate_limited_back_off is not None:
        yield from _rate_limited((*path, "rateLimitedBackOff"), g.rate_limited_back_off)
    for i, ro in enumerate(g.retry_on or []):
        if ro not in _GRPC_RETRY_ON:
            yield (*path, "retryOn", i), f"unknown item '{ro}'"


def _default(path: Path, conf: Conf | None) -> Found:
    """Kuma roots these paths at ``default.conf``; meshc points at the input (``default``)."""
    c = conf or Conf()
    if c.tcp is None and c.http is None and c.grpc is None:
        yield path, "at least one of the 'tcp', 'http', 'grpc' must be specified"
    if c.tcp is not None:
        if c.tcp.max_connect_attempt is None:
            yield (*path, "tcp"), "must not be empty"
        elif c.tcp.max_connect_attempt == 0:
            yield (*path, "tcp", "maxConnectAttempt"), "must be greater than 0"
    if c.http is not None:
        yield from _http((*path, "http"), c.http)
    if c.grpc is not None:
        yield from _grpc((*path, "grpc"), c.grpc)


def check(spec: MeshRetrySpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True))
    kind = top(spec.target_ref).kind
    kinds = (
        ("Mesh", "MeshExternalService")
        if kind in ("MeshGateway", "MeshHTTPRoute")
        else ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute")
    )
    for i, t in enumerate(spec.to or []):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, kinds))
        yield from _default(("to", i, "default"), t.default)


KIND = kind_def("MeshRetry", MeshRetrySpec, check, __doc__ or "", compiled=True)
