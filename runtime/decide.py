"""What every forwarding layer does with a request, decided in one place (sans-io).

The byte layers (``fastconn``/``fastexchange``, ``proxy``, ``tcp``) read the snapshot once per
request and ask here: ``decide_outbound``, ``decide_inbound`` and ``decide_gateway`` for HTTP,
``decide_connect`` for ``CONNECT``, ``decide_tcp_inbound`` and ``decide_tcp_gateway`` for TCP
listeners. The answer is a ``Forward`` (where the request goes and how it is rewritten), a
``Reply`` (the data plane answers itself, with a reason) or, for outbound requests and
``CONNECT``, a ``Fetch``: the destination's config is named by the mesh manifest but not held
(a scoped data plane, DESIGN §5), so ``settle`` fetches it, bounded by ``FETCH_TIMEOUT_S``, and
asks again, or answers ``fetch_failed`` (Envoy's on-demand CDS). ``passthrough`` is the one
verdict for a host outside the mesh whatever the protocol; ``admit`` and ``peer_hop`` are the checks made
when a target is about to get a request; ``RetryState`` follows one request's attempts and says,
from each outcome, back off and retry or give up, and with which answer. The layers carry the
verdicts out and never decide themselves, so the two HTTP data planes cannot drift apart.
Every HTTP verdict carries the request's span (``runtime.tracing``), a ``Reply`` too, so the
layers report what the data plane answered itself as they report what they forwarded.

Nothing here touches a socket or a clock that is not passed in.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Protocol, cast
from urllib.parse import quote, unquote

from runtime._hosts import Host, Outcome
from runtime._policy import MAX_RETRY_BODY, RetryPolicy
from runtime.bundle import TrafficLogConf
from runtime.engine import NO_APP_POLICY, AppPolicy, Engine, RoutePolicy, Snapshot, Target
from runtime.headerops import NO_OPS, REMOVE, SET, HeaderOp
from runtime.identity import PeerIdentity
from runtime.security import DENIED_HEADER
from runtime.tracing import TRACEPARENT, Getter, Hop, hop

__all__ = [
    "APP",
    "FETCH_TIMEOUT_S",
    "NO_HOST",
    "PASSTHROUGH",
    "PATH_SAFE",
    "RESET",
    "TARGET",
    "Fetch",
    "Fetcher",
    "Forward",
    "Reply",
    "RequestHead",
    "RetryState",
    "StreamWatch",
    "admit",
    "admit_app",
    "decide_connect",
    "decide_gateway",
    "decide_inbound",
    "decide_outbound",
    "decide_tcp_gateway",
    "decide_tcp_inbound",
    "failure_reply",
    "fetch_failed",
    "inbound_header_timeout",
    "no_fetcher",
    "passthrough",
    "peer_hop",
    "query_map",
    "release",
    "release_app",
    "report_app",
    "request_scheme",
    "settle",
    "split_host",
    "stream_cut",
    "stream_watch",
    "traced",
]

NO_HOST = "no healthy upstream"
RESET = "upstream connect error or disconnect/reset before headers"
TIMEOUT_REASON = "upstream request timeout"
OVERFLOW = "upstream connection limit reached"
"""Envoy's circuit breaker overflow, outbound and inbound alike."""
PATH_SAFE = "/:@!$&'()*+,;=-._~%"
"""Characters a rewritten gateway path keeps as they are (RFC 3986 pchar and '/')."""

TARGET, PASSTHROUGH, APP = 0, 1, 2
"""What a ``Forward`` goes to: a mesh target's hosts, an address outside the mesh, the local app."""

Addr = tuple[str, int]

FETCH_TIMEOUT_S = 5.0
"""How long a request waits for its destination's config to be fetched on demand."""


class RequestHead(Protocol):
    """What a decision reads of an HTTP request (``h1.Request`` on the fast path, an adapter of
    aiohttp's request on the other)."""

    @property
    def method(self) -> str: ...
    @property
    def has_body(self) -> bool: ...
    @property
    def upgrade(self) -> object: ...

    def authority(self) -> str: ...
    def path(self) -> str:
        """The decoded path, no query, as route matches see it."""
        ...

    def query_string(self) -> str: ...
    def header_map(self) -> Mapping[str, str]:
        """Header values by lower-case name (the first of repeated fields)."""
        ...


class Reply:
    """The data plane answers the request itself (after ``delay_s``, for a fault's delay)."""

    __slots__ = (
        "body",
        "delay_s",
        "dest",
        "headers",
        "logs",
        "overflow",
        "reason",
        "source",
        "status",
        "trace",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        source: str = "",
        dest: str = "",
        *,
        headers: tuple[tuple[str, str], ...] = (),
        body: str | None = None,
        delay_s: float = 0.0,
        overflow: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        """Also sent as ``x-meshc-reason``."""
        self.source = source
        self.dest = dest
        self.headers = headers
        self.body = body
        """The body text; None: the reason."""
        self.delay_s = delay_s
        self.overflow = overflow
        """A circuit breaker's limit refused it (counted as an overflow)."""
        self.trace: Hop | None = None
        """The request's span when a decision made the reply (``_answered``); a reply a layer
        makes after forwarding began is reported with the ``Forward``'s span instead."""
        self.logs: tuple[TrafficLogConf, ...] = ()
        """An inbound request refused before it reached the app (a deny, a rate limit, a fault's
        abort): the caller's inbound access logs, which log it as Envoy's listener logs do."""

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.reason!r})"


class Forward:
    """Send the request on: to a target's hosts, a passthrough address or the local app."""

    __slots__ = (
        "address",
        "app",
        "bps",
        "delay_s",
        "dest",
        "holds",
        "host",
        "kind",
        "mirrors",
        "path",
        "policy",
        "request_ops",
        "response_ops",
        "source",
        "source_header",
        "target",
        "trace",
    )

    def __init__(
        self,
        kind: int,
        source: str,
        dest: str,
        *,
        target: Target | None = None,
        address: Addr | None = None,
        path: str | None = None,
        host: str | None = None,
        request_ops: tuple[HeaderOp, ...] = NO_OPS,
        response_ops: tuple[HeaderOp, ...] = NO_OPS,
        source_header: str | None = None,
        mirrors: tuple[Target, ...] = (),
        delay_s: float = 0.0,
        bps: int = 0,
        app: AppPolicy = NO_APP_POLICY,
        policy: RoutePolicy | None = None,
    ) -> None:
        self.kind = kind
        self.source = source
        self.dest = dest
        self.target = target
        self.address = address
        """The passthrough address (``PASSTHROUGH``)."""
        self.path = path
        """The next hop's path in wire form, no query; None: the request's own."""
        self.host = host
        """The next hop's Host; None: the request's own."""
        self.request_ops = request_ops
        self.response_ops = response_ops
        self.source_header = source_header
        """``x-meshc-source-service`` to send; None: the request's own (if any) goes on."""
        self.mirrors = mirrors
        """Targets that get a copy of the request (answer ignored)."""
        self.delay_s = delay_s
        self.bps = bps
        """Response bandwidth in bits/s (a fault); 0: unlimited."""
        self.app = app
        """``APP``: the caller's inbound timeouts, connection limit and access logs."""
        self.policy = policy
        """``TARGET``: the matched route rule's own timeout and retries (``RetryState``); None:
        the target's."""
        self.holds = False
        """``APP``: it holds a slot of ``app.limit`` (``admit_app``) until ``release_app``."""
        self.trace: Hop | None = None
        """This hop's span (``traced``); its ``traceparent`` is the last of ``request_ops``."""

    def __repr__(self) -> str:
        where = self.target if self.kind == TARGET else self.address if self.kind == PASSTHROUGH else "app"
        return f"Forward({where})"


class Fetch:
    """The destination's config must be fetched first; then decide again."""

    __slots__ = ("service", "trace")

    def __init__(self, service: str) -> None:
        self.service = service
        self.trace: Hop | None = None
        """The request's span, for the 503 if the fetch fails (``fetch_failed``)."""

    def __repr__(self) -> str:
        return f"Fetch({self.service!r})"


Fetcher = Callable[[str], Awaitable[str | None]]
"""Fetches a destination's config on demand: None once it is held, else why not."""


async def no_fetcher(service: str) -> str | None:
    return "no control plane to fetch it from"


def fetch_failed(engine: Engine, fetch: Fetch, why: str) -> Reply:
    """A destination whose config could not be fetched in time: 503, as Envoy answers when its
    on-demand cluster discovery times out (nothing is guessed in its place)."""
    reply = Reply(
        503, f"configuration of {fetch.service} not available: {why}", engine.service, fetch.service
    )
    if fetch.trace is not None:
        fetch.trace.reason = reply.reason
        reply.trace = fetch.trace
    return reply


async def settle(
    engine: Engine,
    verdict: Forward | Reply | Fetch,
    fetcher: Fetcher,
    again: Callable[[Snapshot], Forward | Reply | Fetch],
) -> Forward | Reply:
    """A ``Fetch`` carried out: the config fetched, then the verdict ``again`` gives on the new
    snapshot (a 503 when the fetch failed or the destination is still pending)."""
    if not isinstance(verdict, Fetch):
        return verdict
    try:
        why = await fetcher(verdict.service)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        return fetch_failed(engine, verdict, why)
    after = again(engine.snapshot)
    return fetch_failed(engine, after, "not held after the fetch") if isinstance(after, Fetch) else after


# -- parsing helpers shared by the layers --------------------------------------------------------


def split_host(value: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name, port or None)."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.partition(":")
    # ASCII digits only, at most 5: str.isdigit() also takes "²" (an HTTP/2 :authority is any
    # latin-1 text), which int() refuses, and int() refuses more than 4300 digits.
    return host.lower(), int(port) if len(port) <= 5 and port.isascii() and port.isdigit() else None


def query_map(qs: str) -> dict[str, str]:
    """A raw query string -> decoded name -> the first value."""
    out: dict[str, str] = {}
    for part in qs.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.setdefault(unquote(k.replace("+", " ")), unquote(v.replace("+", " ")))
    return out


def request_scheme(forwarded_proto: str | None, tls: bool) -> str:
    """The scheme the client used: what an edge in front said (``X-Forwarded-Proto``), else the
    connection's. A redirect with no scheme keeps it, as Envoy and the Gateway API do."""
    if forwarded_proto:
        proto = forwarded_proto.split(",", 1)[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return "https" if tls else "http"


# -- verdicts ------------------------------------------------------------------------------------


def passthrough(
    snap: Snapshot, source: str, name: str, port: int | None, default_port: int, own: Collection[Addr]
) -> Forward | Reply:
    """A host outside the mesh, for HTTP and ``CONNECT`` alike (DESIGN §5): it passes through when
    the Mesh allows it, else 403 with the reason. Before any configuration has arrived nobody
    can tell a mesh host from an outside one, so the answer is a 503 (try again), not a 403."""
    if not name:
        return Reply(400, "request names no host", source, "")
    if not snap.ready:
        return Reply(503, "no configuration yet", source, name)
    if not snap.passthrough:
        mesh = snap.mesh.mesh if snap.mesh is not None else "?"
        return Reply(403, f"passthrough disabled by Mesh {mesh}: {name} is not a mesh service", source, name)
    port = port or default_port
    if (name, port) in own or (name == "localhost" and ("127.0.0.1", port) in own):
        return Reply(508, "request names this proxy itself", source, name)
    return Forward(PASSTHROUGH, source, name, address=(name, port))


def decide_outbound(
    engine: Engine, snap: Snapshot, head: RequestHead, name: str, port: int | None, own: Collection[Addr]
) -> Forward | Reply | Fetch:
    """An outbound HTTP request for ``name[:port]`` (from its Host or absolute URI)."""
    headers = head.header_map()
    verdict = _outbound(engine, snap, head, headers, name, port, own)
    if type(verdict) is Forward:
        return verdict
    span = hop(headers.get, snap.trace_sampling, engine.rng, snap.trace_b3, snap.trace_tags)
    if type(verdict) is Fetch:
        verdict.trace = span
        return verdict
    return _answered(cast(Reply, verdict), span)


def _outbound(
    engine: Engine,
    snap: Snapshot,
    head: RequestHead,
    headers: Mapping[str, str],
    name: str,
    port: int | None,
    own: Collection[Addr],
) -> Forward | Reply | Fetch:
    source = engine.service
    dest = snap.destination(name)
    if dest is None:
        return passthrough(snap, source, name, port, 80, own)
    if dest.pending:
        return Fetch(dest.service)
    if dest.protocol == "tcp":
        return Reply(400, f"{name} is a TCP service; open it with CONNECT", source, name)
    route = dest.route(head.method, head.path(), headers) if dest.routes else None
    target = (route.wheel if route is not None else dest.wheel).choose(engine.rng)
    if target is None:
        return Reply(503, NO_HOST, source, name)
    incoming = headers.get
    if route is None:
        fwd = Forward(TARGET, source, target.service, target=target, source_header=source)
        return traced(engine, snap, fwd, incoming)
    policy = route.policy
    if route.modify is None:
        return traced(
            engine,
            snap,
            Forward(TARGET, source, target.service, target=target, source_header=source, policy=policy),
            incoming,
        )
    path = head.path()
    new_path = route.rewrite_path(path)
    fwd = Forward(
        TARGET,
        source,
        target.service,
        target=target,
        path=new_path if new_path != path else None,
        host=route.rewrite_host(path),
        request_ops=route.request_ops,
        response_ops=route.response_ops,
        source_header=source,
        policy=policy,
    )
    return traced(engine, snap, fwd, incoming)


def traced(engine: Engine, snap: Snapshot, fwd: Forward, incoming: Getter | str | None) -> Forward:
    """``fwd`` with this hop's span: continued from ``incoming`` (the request's headers, or its
    ``traceparent`` alone) when it carries a valid context, else a new trace; the next hop's
    propagation headers are the last header ops (``runtime.tracing``)."""
    b3 = snap.trace_b3
    span = fwd.trace = hop(incoming, snap.trace_sampling, engine.rng, b3, snap.trace_tags)
    if not b3:
        fwd.request_ops = (*fwd.request_ops, (SET, TRACEPARENT, span.header()))
        return fwd
    ops = tuple((SET, n, v) if v is not None else (REMOVE, n, "") for n, v in span.headers(True))
    fwd.request_ops = (*fwd.request_ops, *ops)
    return fwd


def _answered(reply: Reply, span: Hop) -> Reply:
    """``reply`` as the answer to a request whose span is ``span``: reported like a forwarded
    request's, with the reply's reason (``runtime.zipkin`` tags the error), as Envoy reports its
    local replies."""
    span.reason = reply.reason
    reply.trace = span
    return reply


def _reply_span(engine: Engine, snap: Snapshot, reply: Reply, incoming: Getter | str | None) -> Reply:
    return _answered(reply, hop(incoming, snap.trace_sampling, engine.rng, snap.trace_b3, snap.trace_tags))


def _caller(snap: Snapshot, identity: PeerIdentity | None) -> str | None:
    """Why a mutual-TLS peer is no caller of this mesh, or None when it is one."""
    mesh = snap.mesh.mesh if snap.mesh is not None else None
    if identity is None or (mesh is not None and identity.mesh != mesh):
        return "peer certificate names no identity in this mesh"
    return None


def _deny(reason: str, caller: str, service: str) -> Reply:
    return Reply(403, reason, caller, service, headers=((DENIED_HEADER, reason),))


def decide_inbound(
    engine: Engine,
    snap: Snapshot,
    tls: bool,
    identity: PeerIdentity | None,
    caller_header: str,
    trace: Getter | str | None = None,
) -> Forward | Reply:
    """A request to this instance's app. Under mTLS the caller is the peer certificate's
    identity, never the header (DESIGN §6), and a TrafficPermission must allow it; in plaintext
    (mTLS off, or PERMISSIVE) the header is only a metrics label, as in Kuma. ``trace``: the
    request's headers (or its ``traceparent`` alone), continued by this hop's span, whether the
    request is forwarded or refused."""
    verdict = _inbound(engine, snap, tls, identity, caller_header)
    if type(verdict) is Reply:
        inbound = snap.inbound
        if inbound.has_app:
            known = tls and identity is not None and _caller(snap, identity) is None
            app = inbound.app(identity.tags) if known and identity is not None else None
            verdict.logs = (app or inbound.app_for_caller("" if tls else caller_header)).logs
        return _reply_span(engine, snap, verdict, trace)
    return traced(engine, snap, cast(Forward, verdict), trace)


def _inbound(
    engine: Engine, snap: Snapshot, tls: bool, identity: PeerIdentity | None, caller_header: str
) -> Forward | Reply:
    service = engine.service
    caller = caller_header
    inbound = snap.inbound
    if tls:
        why = _caller(snap, identity)
        if why is not None or identity is None:
            return _deny(why or "", caller or "unknown", service)
        caller = identity.service
        rate_limit, fault, permitted = inbound.for_peer(identity.tags)
        if not permitted:
            return _deny(f"no TrafficPermission allows {caller}", caller, service)
        app = inbound.app(identity.tags)
    else:
        rate_limit, fault, _permitted = inbound.for_caller(caller)
        app = inbound.app_for_caller(caller)
    if rate_limit is not None and not rate_limit.bucket.take(engine.clock()):
        conf = rate_limit.conf
        headers = tuple((h.name, h.value) for h in conf.headers)
        return Reply(conf.status, "local_rate_limited", caller, service, headers=headers)
    delay = 0.0
    bps = 0
    if fault is not None:
        delay, abort, bps = fault.decide(engine.rng)
        if abort:
            return Reply(abort, "fault filter abort", caller, service, delay_s=delay)
    return Forward(
        APP, caller, service, source_header=caller if tls else None, delay_s=delay, bps=bps, app=app
    )


def decide_gateway(
    engine: Engine, snap: Snapshot, head: RequestHead, port: int, scheme: str
) -> Forward | Reply:
    """A request to the gateway listener on ``port``; ``scheme`` from ``request_scheme``."""
    verdict = _gateway(engine, snap, head, port, scheme)
    if type(verdict) is Reply:
        return _reply_span(engine, snap, verdict, head.header_map().get)
    return verdict


def _gateway(engine: Engine, snap: Snapshot, head: RequestHead, port: int, scheme: str) -> Forward | Reply:
    source = engine.service
    listener = snap.gateway.get(port)
    if listener is None:
        return Reply(404, "no gateway listener", source)
    hostname, _ = split_host(head.authority())
    path = head.path()
    qs = head.query_string()
    found = listener.route(hostname, head.method, path, head.header_map(), query_map(qs) if qs else {})
    if found is None:
        return Reply(404, "no route", source)
    route, prefix = found
    f = route.redirect
    if f is not None:
        name = f.redirect_hostname or hostname
        portpart = f":{f.redirect_port}" if f.redirect_port else ""
        new_path = f.redirect_path if f.redirect_path is not None else route.rewrite(path, prefix)
        location = f"{f.redirect_scheme or scheme}://{name}{portpart}{new_path}" + (f"?{qs}" if qs else "")
        return Reply(f.redirect_status, "redirect", source, headers=(("Location", location),), body="")
    target = route.wheel.choose(engine.rng)
    if target is None:
        return Reply(503, NO_HOST, source)
    mirrors: tuple[Target, ...] = ()
    if route.mirrors and not head.has_body and not head.upgrade:
        # Fire and forget, as Envoy's request mirror policy. Requests with a body are not
        # mirrored (the body streams to the backend and is not kept).
        rng = engine.rng
        mirrors = tuple(m for pct, m in route.mirrors if pct >= 100.0 or rng.random() * 100.0 < pct)
    fwd = Forward(
        TARGET,
        source,
        target.service,
        target=target,
        path=quote(route.rewrite(path, prefix), safe=PATH_SAFE),
        request_ops=route.request_ops,
        response_ops=route.response_ops,
        source_header=source,
        mirrors=mirrors,
    )
    return traced(engine, snap, fwd, head.header_map().get)


def decide_connect(
    engine: Engine, snap: Snapshot, name: str, port: int, own: Collection[Addr]
) -> Forward | Reply | Fetch:
    """``CONNECT name:port`` on the outbound listener: a mesh TCP service, or a passthrough."""
    source = engine.service
    dest = snap.destination(name)
    if dest is None:
        return passthrough(snap, source, name, port, port, own)
    if dest.pending:
        return Fetch(dest.service)
    if dest.protocol != "tcp":
        return Reply(400, f"{name} is an HTTP mesh service; send plain HTTP requests", source, name)
    target = dest.wheel.choose(engine.rng)
    if target is None:
        return Reply(503, NO_HOST, source, name)
    return Forward(TARGET, source, name, target=target)


def decide_tcp_gateway(engine: Engine, snap: Snapshot, port: int) -> Forward | Reply:
    """A connection to the gateway's TCP listener on ``port``."""
    source = engine.service
    listener = snap.gateway.get(port)
    wheel = listener.tcp_wheel if listener is not None else None
    target = wheel.choose(engine.rng) if wheel is not None else None
    if target is None:
        return Reply(503, NO_HOST, source)
    return Forward(TARGET, source, target.service, target=target)


def decide_tcp_inbound(
    engine: Engine, snap: Snapshot, tls: bool, identity: PeerIdentity | None
) -> Forward | Reply:
    """A connection to a TCP service's inbound listener: under mTLS a TrafficPermission must
    allow the peer certificate's identity, as for HTTP."""
    service = engine.service
    if not tls:
        return Forward(APP, "", service, app=snap.inbound.app_for_caller(""))
    why = _caller(snap, identity)
    caller = identity.service if identity is not None else "unknown"
    if why is not None or identity is None:
        return _deny(why or "", caller, service)
    if not snap.inbound.for_peer(identity.tags)[2]:
        return _deny(f"no TrafficPermission allows {caller}", caller, service)
    return Forward(APP, caller, service, app=snap.inbound.app(identity.tags))


def admit(target: Target, source: str) -> Reply | None:
    """None when the target may take one more request or connection, else the 503 (Envoy's
    circuit breaker overflow)."""
    if target.active >= target.max_active:
        return Reply(503, OVERFLOW, source, target.service, overflow=True)
    return None


def admit_app(fwd: Forward, now: float) -> Reply | None:
    """None when the local app may take one more request (a slot of the inbound circuit
    breaker's limit is taken until ``release_app``), else the 503 overflow; or 503 no healthy
    upstream while the app is ejected and the panic threshold is 0 (``AppOutlier``)."""
    outlier = fwd.app.outlier
    if outlier is not None and outlier.panic <= 0 and outlier.host.is_ejected(now):
        return Reply(503, NO_HOST, fwd.source, fwd.dest)
    limit = fwd.app.limit
    if limit is None:
        return None
    if limit.active >= limit.max_active:
        return Reply(503, OVERFLOW, fwd.source, fwd.dest, overflow=True)
    limit.active += 1
    fwd.holds = True
    return None


def report_app(fwd: Forward, outcome: int, now: float) -> bool:
    """Feed the local app's outlier detector with one request's outcome (``Outcome``, from
    ``Engine.outcome_for_status`` or the failure); True when it ejected the app (the layer counts
    it in ``meshc_outlier_ejections``). A no-op without inbound outlier detection."""
    outlier = fwd.app.outlier
    if outlier is None:
        return False
    host = outlier.host
    if not host.record(outcome, outlier.cb) or host.is_ejected(now):
        return False
    host.eject(now, outlier.cb)  # Envoy ejects at least one host, whatever max_ejection_percent
    return True


def release_app(fwd: Forward | None) -> None:
    """A request to the local app is over: give back its slot (once)."""
    if fwd is not None and fwd.holds:
        fwd.holds = False
        limit = fwd.app.limit
        if limit is not None:
            limit.active -= 1


def peer_hop(snap: Snapshot, have_certificate: bool, source: str, dest: str) -> bool | Reply:
    """How to reach a peer data plane: True over mutual TLS, False in plaintext, or the 503 when
    the Mesh is STRICT and this data plane has no certificate yet (the peer would refuse it)."""
    mesh = snap.mesh
    if mesh is None or not mesh.mtls.enabled:
        return False
    if have_certificate:
        return True
    if mesh.mtls.mode == "STRICT":
        return Reply(503, "mTLS is on and this data plane has no certificate yet", source, dest)
    return False


def release(target: Target | None, retry: RetryState | None, host: Host | None) -> None:
    """An exchange is over: give back what it held of its target (a slot, the retry budget of
    a backoff in progress) and of its host (a slot)."""
    if target is not None:
        target.active -= 1
        if retry is not None:
            retry.end()
    if host is not None:
        host.active -= 1


def failure_reply(forward: Forward, outcome: int, error: str) -> Reply:
    """The answer to an attempt that got no response head and is not retried."""
    source, dest = forward.source, forward.dest
    if forward.kind == PASSTHROUGH:
        if outcome == Outcome.TIMEOUT:
            return Reply(504, TIMEOUT_REASON, source, dest)
        name, port = forward.address or ("?", 0)
        return Reply(502, f"passthrough to {name}:{port} failed: {error}", source, dest)
    if outcome == Outcome.TIMEOUT:
        return Reply(504, "app timeout" if forward.kind == APP else TIMEOUT_REASON, source, dest)
    return Reply(503, RESET, source, dest)


class RetryState:
    """One request's attempts at a target: the deadline, each try's timeout, and after each
    failed attempt whether to back off and retry or to give up (Envoy's retry policy: retriable
    outcomes and methods, ``max_retries`` in flight across requests, never past the request's
    own timeout). A request whose body cannot be replayed (unknown length, over 64 KiB) is tried
    once."""

    __slots__ = (
        "allowed",
        "backing_off",
        "deadline",
        "overall",
        "policy",
        "retries",
        "stream_idle_s",
        "target",
        "tried",
    )

    def __init__(
        self,
        target: Target,
        method: str,
        body_length: int | None,
        now: float,
        route: RoutePolicy | None = None,
        *,
        grpc: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        """``body_length``: 0 without a body, None when it is not known up front (chunked).
        ``grpc``: a gRPC call, retried by Retry's ``grpc`` conf when there is one (any method:
        gRPC calls are all POSTs). ``deadline_s``: the caller's own deadline (``grpc-timeout``),
        which replaces the route's request timeout as Envoy's ``max_grpc_timeout: 0`` does.
        ``route``: the matched route rule's own timeout and retries (``Forward.policy``), which
        replace the target's where the rule sets them (Kuma's route-level MeshTimeout and
        MeshRetry)."""
        if route is None:
            policy: RetryPolicy | None = target.retry
            grpc_retry = target.grpc_retry
            timeout = target.request_timeout_s
            self.stream_idle_s = target.stream_idle_timeout_s
            """How long the response may carry no data (the route rule's, else the target's)."""
        else:
            retried = route.has_retry
            policy = route.retry if retried else target.retry
            grpc_retry = route.grpc_retry if retried else target.grpc_retry
            timed = route.has_timeout
            timeout = route.request_timeout_s if timed else target.request_timeout_s
            self.stream_idle_s = route.stream_idle_timeout_s if timed else target.stream_idle_timeout_s
        method_ok = policy is not None and policy.method_allowed(method)
        if grpc and grpc_retry is not None:
            policy, method_ok = grpc_retry, True
        self.target = target
        self.policy = policy
        self.allowed = (
            policy is not None
            and policy.num_retries > 0
            and body_length is not None
            and body_length <= MAX_RETRY_BODY
            and method_ok
        )
        self.retries = 0
        self.backing_off = False
        self.overall = False
        if deadline_s is not None:
            timeout = deadline_s
        self.deadline = now + timeout if timeout else None
        self.tried: list[Host] = []

    def try_timeout(self, now: float) -> float | None:
        """The next attempt's timeout: the per-try one, cut to what is left of the request's."""
        policy = self.policy
        timeout = policy.per_try_timeout_s if policy is not None else None
        self.overall = False
        deadline = self.deadline
        if deadline is not None:
            left = deadline - now
            if timeout is None or left <= timeout:
                timeout, self.overall = max(left, 0.0), True
        return timeout

    def unreplayable(self) -> None:
        """The body outgrew what is kept for a replay (its length was not known up front)."""
        self.allowed = False

    def failed(
        self, host: Host | None, outcome: int, status: int, rng: random.Random, grpc_status: int | None = None
    ) -> float | None:
        """An attempt failed (``status`` 0: before a response head; ``grpc_status``: a gRPC
        answer's status). The backoff in seconds before the next attempt, or None: give up
        (answer ``give_up``, or relay the response)."""
        if host is not None:
            self.tried.append(host)
        policy = self.policy
        target = self.target
        if (
            not self.allowed
            or policy is None
            or self.retries >= policy.num_retries
            or (self.overall and outcome == Outcome.TIMEOUT)  # the request's deadline is spent
            or target.retries_active >= target.max_retries
        ):
            return None
        if grpc_status is not None:
            if not policy.retriable_grpc(grpc_status):
                return None
        elif status:
            if not policy.retriable_status(status):
                return None
        elif not policy.retriable_failure(outcome):
            return None
        self.retries += 1
        target.retries_active += 1
        self.backing_off = True
        return policy.backoff_s(self.retries, rng)

    def resume(self, now: float, source: str) -> Reply | None:
        """The backoff is over: None to attempt again, or the 504 when the deadline passed."""
        self.end()
        if self.deadline is not None and now >= self.deadline:
            return Reply(504, TIMEOUT_REASON, source, self.target.service)
        return None

    def end(self) -> None:
        """The exchange is over (or the backoff): give back the retry budget it held."""
        if self.backing_off:
            self.backing_off = False
            self.target.retries_active -= 1

    def give_up(self, outcome: int, source: str) -> Reply:
        """The answer after the last attempt failed before a response head."""
        if outcome == Outcome.TIMEOUT:
            return Reply(504, TIMEOUT_REASON, source, self.target.service)
        return Reply(503, RESET, source, self.target.service)


# -- stream timeouts -----------------------------------------------------------------------------

STREAM_IDLE = "stream idle timeout"
"""Envoy's stream idle timeout: no byte moved either way on the request's exchange for too long."""
MAX_STREAM = "max stream duration reached"
"""MeshTimeout's maxStreamDuration: the request and its response took too long, end to end."""


class StreamWatch:
    """One exchange's stream timeouts (sans-io): the byte layer calls ``moved`` when a byte of the
    request or the response moves, and ``due`` at ``next_check``; ``due`` names the timeout that
    passed (then the layer answers ``stream_cut``, or resets the stream once a response is out).
    Envoy's semantics: the idle timer restarts on any progress either way (so a client that opens
    no window, or an app that stops sending, is cut), the duration counts from the request's head."""

    __slots__ = ("end_at", "idle_s", "last")

    def __init__(self, idle_s: float | None, max_s: float | None, now: float) -> None:
        self.idle_s = idle_s
        self.end_at = now + max_s if max_s else 0.0
        self.last = now

    def moved(self, now: float) -> None:
        self.last = now

    def next_check(self) -> float:
        """Loop time at which ``due`` may first say something (the earlier of the two limits)."""
        idle_at = self.last + self.idle_s if self.idle_s else float("inf")
        return min(idle_at, self.end_at or float("inf"))

    def due(self, now: float) -> str | None:
        if self.end_at and now >= self.end_at:
            return MAX_STREAM
        if self.idle_s and now - self.last >= self.idle_s:
            return STREAM_IDLE
        return None


def stream_watch(fwd: Forward, now: float) -> StreamWatch | None:
    """The stream timeouts of a forwarded request: the caller's inbound ones for the local app
    (``AppPolicy``), the target's outbound ones (Timeout / MeshTimeout ``to``); None without any."""
    if fwd.kind == APP:
        idle_s, max_s = fwd.app.stream_idle_s, fwd.app.max_stream_s
    elif fwd.target is not None:
        idle_s, max_s = fwd.target.stream_idle_timeout_s, fwd.target.max_stream_s
    else:
        return None
    if idle_s is None and max_s is None:
        return None
    return StreamWatch(idle_s, max_s, now)


def stream_cut(source: str, dest: str, why: str) -> Reply:
    """The answer to a request whose stream timed out before its response began: 408, as Envoy's
    local reply for a stream timeout (a response already begun is reset instead)."""
    return Reply(408, why, source, dest)


def inbound_header_timeout(snap: Snapshot, listener_s: float) -> float:
    """How long the inbound listener gives a request head: the MeshTimeout requestHeadersTimeout
    of the rule for every caller when one sets it, else the listener's ``--header-timeout``
    (Kuma's 0s, none, keeps that bound: a sidecar never waits for a head without one)."""
    s = snap.inbound.headers_timeout_s
    return s if s is not None else listener_s
