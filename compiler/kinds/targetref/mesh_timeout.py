"""MeshTimeout: connection, idle and HTTP timeouts, outbound (`to`) and inbound (`from`, `rules`).

Kuma's defaults: connectionTimeout 5s, idleTimeout 1h, http.requestTimeout 15s,
http.streamIdleTimeout 30m, http.maxStreamDuration 0s (none), http.maxConnectionDuration 0s (none).
A policy sets `to`, `from` or `rules` (`rules` alone: they replace `to` and `from`).

On a MeshHTTPRoute (top-level `targetRef`, or a `to` item; by name or labels): the route's rules
get their own http.requestTimeout and http.streamIdleTimeout, merged over the destination's (what
Kuma puts on the route); its other settings stay the destination cluster's (W3006 at each).

Inbound (`from`, `rules`: Kuma 2.x inbound rules, merged in Kuma's order): the rules without a
match are the common timeouts of requests to the local app; a `spiffeID` rule's
`http.requestTimeout` and `http.streamIdleTimeout` go over them for the callers it covers. The
sidecar applies, as Envoy does on Kuma's inbound listener and local app cluster:

* connectionTimeout: connecting to the app;
* http.requestTimeout: 504 when the app has not answered in time (a gRPC caller's `grpc-timeout`
  replaces it);
* http.streamIdleTimeout: a request whose exchange moves no byte either way for this long (a
  client that stops sending or opens no HTTP/2 window, an app that stops answering) gets 408
  before its response began, else the stream is reset (HTTP/1.1: the connection is closed);
* http.maxStreamDuration: the same cut once the request and its response have taken this long;
* http.requestHeadersTimeout (the rule for every caller; 0s keeps the listener's
  `--header-timeout`): 408 and close when an HTTP/1.1 request head takes longer to arrive (a
  slowloris guard; an HTTP/2 header block is bounded in size instead);
* idleTimeout, for a TCP service: the connection closes after that long without data.

Not applied inbound (W3006 at each): http.maxConnectionDuration, and idleTimeout on an HTTP
service (both are about the sidecar's pooled connections to its app). Outbound (`to`) the same
stream timeouts apply to requests to the destination; requestHeadersTimeout (meshc's one outbound
listener reads a head before it knows the destination) and maxConnectionDuration are not
applied there (W3006).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshTimeout
    metadata: {name: benigno-timeout, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: Mesh}
      to:
        - targetRef: {kind: MeshService, name: benigno}
          default: {connectionTimeout: 2s, http: {requestTimeout: 3s}}

Invalid (nothing configured in `default`)::

    spec: {to: [{targetRef: {kind: Mesh}, default: {}}]}
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    Found,
    GoDuration,
    Match,
    TargetRef,
    alias,
    at,
    duration_not_negative,
    duration_positive,
    kind_def,
    matches_with_spiffe,
    target_ref,
    top,
)


class Http(Spec):
    request_timeout: GoDuration | None = None
    """The time for the whole request and response (default 15s; 0s: none)."""
    stream_idle_timeout: GoDuration | None = None
    """How long a stream may carry no data (default 30m)."""
    max_stream_duration: GoDuration | None = None
    """The longest a stream may last (default 0s: no limit)."""
    max_connection_duration: GoDuration | None = None
    """The longest a connection may last (default 0s: no limit)."""
    request_headers_timeout: GoDuration | None = None
    """The time to receive the request headers (default 0s: none)."""


class Conf(Spec):
    connection_timeout: GoDuration | None = None
    """The time to establish a connection (default 5s)."""
    idle_timeout: GoDuration | None = None
    """How long a connection may carry no request (default 1h)."""
    http: Http | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    """The destination: Mesh, MeshService, MeshExternalService, MeshMultiZoneService or MeshHTTPRoute."""
    default: Conf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    """The clients: Mesh."""
    default: Conf | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    """The clients this rule is for (by SPIFFE ID or SNI); none: every client."""
    default: Conf | None = None


class MeshTimeoutSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


PER_ROUTE = (("http", "request_timeout"), ("http", "stream_idle_timeout"))
"""What a conf for a MeshHTTPRoute sets on the route's rules (Kuma's ``ConfigureRouteAction``);
its other settings are the destination cluster's (``resolve_targetref`` warns W3006 at them)."""

_ROUTE = "can't be specified when top-level TargetRef is referencing MeshHTTPRoute"
_SPIFFE = (
    "can't be specified when matches contain spiffeID because this field cannot be conditioned on "
    "source identity"
)
_TOP = ("Mesh", "MeshSubset", "Dataplane", "MeshGateway", "MeshService", "MeshServiceSubset", "MeshHTTPRoute")


def _default(path: Path, conf: Conf | None, top_kind: str) -> Found:
    c = conf or Conf()
    if c.connection_timeout is None and c.idle_timeout is None and c.http is None:
        yield path, "at least one timeout should be configured"
        return
    if top_kind == "MeshHTTPRoute":
        for f, v in (("connectionTimeout", c.connection_timeout), ("idleTimeout", c.idle_timeout)):
            if v is not None:
                yield (*path, f), _ROUTE
        if c.http is not None:
            for f, v in (
                ("maxStreamDuration", c.http.max_stream_duration),
                ("maxConnectionDuration", c.http.max_connection_duration),
            ):
                if v is not None:
                    yield (*path, "http", f), _ROUTE
    yield from duration_positive((*path, "connectionTimeout"), c.connection_timeout)
    yield from duration_not_negative((*path, "idleTimeout"), c.idle_timeout)
    h = c.http
    if h is None:
        return
    hp: Path = (*path, "http")
    if all(
        v is None
        for v in (h.request_timeout, h.stream_idle_timeout, h.max_stream_duration, h.max_connection_duration)
    ):
        yield hp, "at least one timeout in this section should be configured"
    for f, v in (
        ("requestTimeout", h.request_timeout),
        ("streamIdleTimeout", h.stream_idle_timeout),
        ("maxStreamDuration", h.max_stream_duration),
        ("maxConnectionDuration", h.max_connection_duration),
        ("requestHeadersTimeout", h.request_headers_timeout),
    ):
        yield from duration_not_negative((*hp, f), v)


def _source_conditioned(path: Path, conf: Conf | None) -> Found:
    c = conf or Conf()
    for f, v in (("connectionTimeout", c.connection_timeout), ("idleTimeout", c.idle_timeout)):
        if v is not None:
            yield (*path, f), _SPIFFE
    if c.http is not None:
        for f, v in (
            ("requestHeadersTimeout", c.http.request_headers_timeout),
            ("maxStreamDuration", c.http.max_stream_duration),
            ("maxConnectionDuration", c.http.max_connection_duration),
        ):
            if v is not None:
                yield (*path, "http", f), _SPIFFE


def not_applied(conf: Conf | None) -> Found:
    """A ``to`` item's settings the outbound side does not carry out (see the module doc)."""
    h = conf.http if conf is not None else None
    if h is None:
        return
    if h.request_headers_timeout is not None:
        why = "an outbound http.requestHeadersTimeout (the one outbound listener has --header-timeout)"
        yield ("http", "requestHeadersTimeout"), why
    if h.max_connection_duration is not None:
        why = "an outbound http.maxConnectionDuration (pooled connections are not retired by age)"
        yield ("http", "maxConnectionDuration"), why


def check(spec: MeshTimeoutSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    if spec.target_ref is not None:
        yield from at(
            ("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True, inbound=bool(rules or frm))
        )
    if rules and (to or frm):
        yield (), "fields 'to' and 'from' must be empty when 'rules' is defined"
    if not rules and not to and not frm:
        yield (), "at least one of 'from', 'to' or 'rules' has to be defined"
    kind = top(spec.target_ref).kind
    if kind in ("MeshHTTPRoute", "MeshGateway") and frm:
        yield ("from",), "must not be defined"
    elif kind not in ("MeshHTTPRoute", "MeshGateway"):
        for i, f in enumerate(frm):
            yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
            yield from _default(("from", i, "default"), f.default, kind)
    to_kinds = (
        ("Mesh", "MeshExternalService")
        if kind in ("MeshHTTPRoute", "MeshGateway")
        else ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute")
    )
    for i, t in enumerate(to):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, to_kinds))
        yield from _default(("to", i, "default"), t.default, kind)
    for i, r in enumerate(rules):
        p: Path = ("rules", i)
        yield from matches_with_spiffe(
            (*p, "matches"), r.matches, _source_conditioned((*p, "default"), r.default)
        )
        yield from _default((*p, "default"), r.default, kind)


KIND = kind_def("MeshTimeout", MeshTimeoutSpec, check, __doc__ or "", compiled=True)
