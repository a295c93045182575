"""HTTP byte moving with aiohttp: outbound, inbound and gateway handlers around the engine.

Each handler reads the current ``Snapshot`` once and keeps it for the whole request, so a reload
never changes a request half way. Policy decisions come from ``runtime.engine``; this module
only streams bytes, applies timeouts and reports outcomes back to the engine.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from runtime._hosts import Host, Outcome
from runtime._policy import MAX_RETRY_BODY
from runtime.accesslog import AccessLog
from runtime.bundle import HeaderChange, HeaderOps, TrafficLogConf
from runtime.engine import Engine, GatewayRoute, Route, Snapshot, Target
from runtime.metrics import Metrics
from runtime.security import DENIED_HEADER, Credentials, PeerCache, wrong_peer

__all__ = ["HASH_KEY_HEADER", "REASON_HEADER", "SOURCE_HEADER", "HttpProxy", "split_host"]

REASON_HEADER = "x-meshc-reason"
"""Names why the data plane itself answered (403, 429, 503, 504 ...)."""
SOURCE_HEADER = "x-meshc-source-service"
"""The calling service, set by the outbound sidecar (metrics only until mTLS; DESIGN §5)."""
HASH_KEY_HEADER = "x-meshc-hash-key"
"""The key ringHash balancing hashes (the path when absent)."""

_CHUNK = 64 * 1024
_SMALL_BODY = 16 * 1024
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_NO_HOST_RESPONSE = "no healthy upstream"


def split_host(value: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name, port or None)."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.partition(":")
    return host.lower(), int(port) if port.isdigit() else None


def _clean_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    connection = headers.get("Connection")
    extra = {t.strip().lower() for t in connection.split(",")} if connection else set()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _HOP_BY_HOP and lk not in extra:
            out.add(k, v)
    return out


def _apply_ops(headers: CIMultiDict[str], ops: HeaderOps) -> None:
    for name in ops.remove:
        headers.popall(name, None)
    _add_changes(headers, ops.add)


def _add_changes(headers: CIMultiDict[str], changes: Iterable[HeaderChange], force_set: bool = False) -> None:
    for change in changes:
        if change.append and not force_set:
            headers.add(change.name, change.value)
        else:
            headers[change.name] = change.value


class _MeshConnector(aiohttp.TCPConnector):
    """A new mTLS connection must reach the service it was opened for (the request's
    ``server_hostname``): the server's SPIFFE identity is checked before a byte of the request
    is sent, as Envoy does in Kuma. Pooled connections are keyed by that name too."""

    def __init__(self, peers: PeerCache, **kw: Any) -> None:
        super().__init__(**kw)
        self._peers = peers

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, proto = await super()._wrap_create_connection(*args, **kwargs)
        want = getattr(kwargs.get("req"), "server_hostname", None)
        if kwargs.get("ssl") and want:
            why = wrong_peer(self._peers, transport, want)
            if why is not None:
                transport.close()
                raise aiohttp.ClientConnectionError(why)
        return transport, proto


class HttpProxy:
    """The handlers of one data plane's HTTP listeners."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        app_address: str | None = None,
        own_addresses: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.service = engine.service
        self.app_address = app_address
        self.own_addresses = set(own_addresses)
        self.session: aiohttp.ClientSession | None = None
        self.access_log = AccessLog()
        self.creds = Credentials()
        self.peers = PeerCache()
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = _MeshConnector(
            self.peers, limit=0, limit_per_host=0, keepalive_timeout=30.0, ttl_dns_cache=10
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.access_log.close()

    def _timeout(self, connect_s: float | None, read_s: float | None) -> aiohttp.ClientTimeout:
        key = (connect_s, read_s)
        t = self._timeouts.get(key)
        if t is None:
            t = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=connect_s, sock_read=read_s
            )
        return t

    # -- replies made by the data plane itself ----------------------------------------------

    def _reply(
        self,
        t0: float,
        status: int,
        reason: str,
        direction: str,
        source: str,
        dest: str,
        subset: str = "",
        headers: Iterable[HeaderChange] = (),
        body: str | None = None,
    ) -> web.Response:
        resp = web.Response(status=status, text=body if body is not None else reason)
        resp.headers[REASON_HEADER] = reason
        _add_changes(resp.headers, headers)
        elapsed = time.perf_counter() - t0
        sent = len((body if body is not None else reason).encode())
        self.metrics.stats.record(direction, source, dest, subset, status, elapsed, 0, sent)
        return resp

    # -- outbound ---------------------------------------------------------------------------

    async def outbound(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        snap = self.engine.snapshot
        url = request.message.url
        if url.is_absolute():
            name, port = (url.host or "").lower(), url.port
            path_qs = url.raw_path_qs
        else:
            name, port = split_host(request.headers.get("Host", ""))
            path_qs = request.raw_path
        dest = snap.destination(name)
        if dest is None:
            return await self._passthrough(request, snap, name, port, path_qs, t0)
        if dest.protocol == "tcp":
            return self._reply(
                t0, 400, f"{name} is a TCP service; open it with CONNECT", "outbound", self.service, name
            )
        route = dest.route(request.method, request.path, request.headers)
        wheel = route.wheel if route is not None else dest.wheel
        target = wheel.choose(self.engine.rng)
        if target is None:
            return self._reply(t0, 503, _NO_HOST_RESPONSE, "outbound", self.service, name)
        headers = _clean_headers(request.headers)
        headers[SOURCE_HEADER] = self.service
        if route is not None and route.modify is not None:
            path_qs = self._modify_request(route, headers, request.path, path_qs)
        return await self._to_target(request, target, headers, path_qs, t0, "outbound", self.service, route)

    def _modify_request(self, route: Route, headers: CIMultiDict[str], path: str, path_qs: str) -> str:
        modify = route.modify
        assert modify is not None
        new_path = route.rewrite_path(path)
        if new_path != path:
            query = path_qs[len(request_path_raw(path_qs)) :]
            path_qs = new_path + query
        if modify.host is not None:
            if modify.host.value is not None:
                headers["Host"] = modify.host.value
            elif modify.host.from_path_regex is not None:
                headers["Host"] = re.sub(
                    modify.host.from_path_regex, modify.host.from_path_substitution or "", path
                )
        _apply_ops(headers, modify.request_headers)
        return path_qs

    async def _passthrough(
        self, request: web.BaseRequest, snap: Snapshot, name: str, port: int | None, path_qs: str, t0: float
    ) -> web.StreamResponse:
        if not name:
            return self._reply(t0, 400, "request names no host", "outbound", self.service, "")
        if not snap.ready:
            return self._reply(t0, 503, "no configuration yet", "outbound", self.service, name)
        if not snap.passthrough:
            mesh = snap.mesh.mesh if snap.mesh else "?"
            return self._reply(
                t0,
                403,
                f"passthrough disabled by Mesh {mesh}: {name} is not a mesh service",
                "outbound",
                self.service,
                name,
            )
        port = port or 80
        if (name, port) in self.own_addresses or (
            name == "localhost" and ("127.0.0.1", port) in self.own_addresses
        ):
            return self._reply(t0, 508, "request names this proxy itself", "outbound", self.service, name)
        assert self.session is not None
        headers = _clean_headers(request.headers)
        body = request.content if request.body_exists else None
        try:
            async with asyncio.timeout(15.0):
                up = await self.session.request(
                    request.method,
                    URL(f"http://{name}:{port}{path_qs}", encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=self._timeout(5.0, 300.0),
                )
        except TimeoutError:
            return self._reply(t0, 504, "upstream request timeout", "outbound", self.service, name)
        except (aiohttp.ClientError, OSError) as e:
            return self._reply(
                t0,
                502,
                f"passthrough to {name}:{port} failed: {type(e).__name__}",
                "outbound",
                self.service,
                name,
            )
        try:
            resp = await self._relay(request, up, None)
        finally:
            up.release()
        self.metrics.stats.record(
            "outbound", self.service, name, "", resp.status, time.perf_counter() - t0, *_sizes(request, resp)
        )
        return resp

    async def _to_target(
        self,
        request: web.BaseRequest,
        target: Target,
        headers: CIMultiDict[str],
        path_qs: str,
        t0: float,
        direction: str,
        source: str,
        route: Route | None = None,
        gw_route: GatewayRoute | None = None,
    ) -> web.StreamResponse:
        """Send to one of the target's hosts with its timeouts, retries and ejection; relay back."""
        engine = self.engine
        dest, subset = target.service, target.subset
        if target.active >= target.max_active:
            self.metrics.overflow.labels(dest).inc()
            return self._reply(t0, 503, "upstream connection limit reached", direction, source, dest, subset)
        assert self.session is not None
        loop = asyncio.get_running_loop()
        retry = target.retry
        can_retry = retry is not None and retry.num_retries > 0 and retry.method_allowed(request.method)
        body: Any = None
        if request.body_exists:
            length = request.content_length
            if can_retry and length is not None and length <= MAX_RETRY_BODY:
                body = await request.read()
            else:
                body = request.content
                can_retry = False
        deadline = loop.time() + target.request_timeout_s if target.request_timeout_s else None
        key = request.headers.get(HASH_KEY_HEADER) or request.path
        timeout = self._timeout(target.connect_timeout_s, target.stream_idle_timeout_s)
        peer_name: str | None = None
        scheme, tls = "http", cast(Any, True)  # ssl=True: aiohttp's default (ignored for http://)
        mtls = self.engine.snapshot.mesh.mtls if self.engine.snapshot.mesh is not None else None
        if mtls is not None and mtls.enabled:
            ctx = self.creds.client_ctx
            if ctx is not None:
                scheme, tls = "https", ctx  # a rotation swaps the context: new pooled connections
                peer_name = dest  # checked against the server's SPIFFE identity (_MeshConnector)
            elif mtls.mode == "STRICT":
                return self._reply(
                    t0, 503, "mTLS is on and this data plane has no certificate yet", direction, source, dest
                )
        tried: list[Host] = []
        retries = 0
        target.active += 1
        try:
            while True:
                host = target.pick(engine.clock(), engine.rng, key, tried)
                if host is None:
                    return self._reply(t0, 503, _NO_HOST_RESPONSE, direction, source, dest, subset)
                tried.append(host)
                try_timeout = retry.per_try_timeout_s if retry is not None else None
                overall = False
                if deadline is not None:
                    left = deadline - loop.time()
                    if try_timeout is None or left <= try_timeout:
                        try_timeout, overall = max(left, 0.0), True
                host.active += 1
                up: aiohttp.ClientResponse | None = None
                outcome = Outcome.OK
                try:
                    async with asyncio.timeout(try_timeout):
                        up = await self.session.request(
                            request.method,
                            URL(f"{scheme}://{host.address}{path_qs}", encoded=True),
                            headers=headers,
                            data=body,
                            allow_redirects=False,
                            timeout=timeout,
                            ssl=tls,
                            server_hostname=peer_name,
                        )
                    outcome = engine.outcome_for_status(up.status)
                except TimeoutError:
                    outcome = Outcome.TIMEOUT
                except (aiohttp.ClientError, OSError):
                    outcome = Outcome.CONNECT_FAILURE
                if up is None or outcome != Outcome.OK:
                    host.active -= 1
                if target.report(host, outcome, engine.clock()):
                    self.metrics.ejections.labels(dest, host.address).inc()
                if (
                    can_retry
                    and retry is not None
                    and retries < retry.num_retries
                    and not (overall and outcome == Outcome.TIMEOUT)
                    and target.retries_active < target.max_retries
                    and (
                        (up is None and retry.retriable_failure(outcome))
                        or (up is not None and retry.retriable_status(up.status))
                    )
                ):
                    if up is not None:
                        up.release()
                    retries += 1
                    self.metrics.retries.labels(dest, subset).inc()
                    target.retries_active += 1
                    try:
                        await asyncio.sleep(retry.backoff_s(retries, engine.rng))
                    finally:
                        target.retries_active -= 1
                    if deadline is not None and loop.time() >= deadline:
                        return self._reply(
                            t0, 504, "upstream request timeout", direction, source, dest, subset
                        )
                    continue
                if up is None:
                    if outcome == Outcome.TIMEOUT:
                        return self._reply(
                            t0, 504, "upstream request timeout", direction, source, dest, subset
                        )
                    return self._reply(
                        t0,
                        503,
                        "upstream connect error or disconnect/reset before headers",
                        direction,
                        source,
                        dest,
                        subset,
                    )
                try:
                    ops = (
                        route.modify.response_headers
                        if route is not None and route.modify is not None
                        else None
                    )
                    resp = await self._relay(request, up, ops, gw_route=gw_route)
                finally:
                    up.release()
                    if outcome == Outcome.OK:
                        host.active -= 1
                elapsed = time.perf_counter() - t0
                self.metrics.stats.record(
                    direction, source, dest, subset, resp.status, elapsed, *_sizes(request, resp)
                )
                if target.log is not None:
                    self._log(target.log, direction, source, target, request, resp.status, elapsed, host)
                return resp
        finally:
            target.active -= 1

    def _log(
        self,
        conf: TrafficLogConf,
        direction: str,
        source: str,
        target: Target,
        request: web.BaseRequest,
        status: int,
        elapsed: float,
        host: Host,
    ) -> None:
        self.access_log.write(
            conf,
            {
                "time": time.time(),
                "direction": direction,
                "source_service": source,
                "destination_service": target.service,
                "destination_subset": target.subset,
                "upstream": host.address,
                "method": request.method,
                "path": request.path,
                "response_code": status,
                "duration_ms": round(elapsed * 1000.0, 3),
            },
        )

    async def _relay(
        self,
        request: web.BaseRequest,
        up: aiohttp.ClientResponse,
        ops: HeaderOps | None,
        bps: int = 0,
        gw_route: GatewayRoute | None = None,
    ) -> web.StreamResponse:
        """Relay the upstream response: small bodies in one write, larger ones streamed."""
        out: CIMultiDict[str] = _clean_headers(up.headers)
        if ops is not None:
            _apply_ops(out, ops)
        if gw_route is not None:
            for f in gw_route.response_headers:
                _gateway_header_filter(out, f.set, f.add, f.remove)
        length = up.content_length
        if bps == 0 and length is not None and length <= _SMALL_BODY and request.method != "HEAD":
            # Headers and body leave in one send: half the system calls of streaming.
            try:
                body = await up.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                up.close()
                return web.Response(
                    status=502,
                    text="upstream reset before the body ended",
                    headers={REASON_HEADER: "upstream reset"},
                )
            return web.Response(status=up.status, reason=up.reason, body=body, headers=out)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
        try:
            await resp.prepare(request)
            if bps > 0:
                await _throttled_copy(up, resp, bps)
            else:
                content = up.content
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, OSError, TimeoutError):
            # Upstream died mid-body or the client went away: the only honest signal left is
            # to close the client connection, so a truncated body is never taken for whole.
            up.close()
            resp.force_close()
            if request.transport is not None:
                request.transport.close()
        return resp

    # -- inbound ----------------------------------------------------------------------------

    async def inbound(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        snap = self.engine.snapshot
        caller = request.headers.get(SOURCE_HEADER, "")
        is_tls, peer = self.peers.of(request.transport)
        if is_tls:
            # mTLS: the caller is the peer certificate's identity, never the header (DESIGN §6).
            mesh = snap.mesh.mesh if snap.mesh is not None else None
            if peer is None or (mesh is not None and peer.mesh != mesh):
                why = "peer certificate names no identity in this mesh"
                return self._deny(t0, why, caller or "unknown")
            caller = peer.service
            rate_limit, fault, permitted = snap.inbound.for_peer(peer.tags)
            if not permitted:
                return self._deny(t0, f"no TrafficPermission allows {caller}", caller)
        else:
            # Plaintext (mTLS off, or PERMISSIVE): the header is only a metrics label, as in Kuma.
            rate_limit, fault, _permitted = snap.inbound.for_caller(caller)
        if rate_limit is not None and not rate_limit.bucket.take(self.engine.clock()):
            conf = rate_limit.conf
            return self._reply(
                t0, conf.status, "local_rate_limited", "inbound", caller, self.service, headers=conf.headers
            )
        bps = 0
        if fault is not None:
            delay, abort, bps = fault.decide(self.engine.rng)
            if delay:
                await asyncio.sleep(delay)
            if abort:
                return self._reply(t0, abort, "fault filter abort", "inbound", caller, self.service)
        assert self.session is not None and self.app_address is not None
        headers = _clean_headers(request.headers)
        if is_tls:
            headers[SOURCE_HEADER] = caller
        try:
            up = await self.session.request(
                request.method,
                URL(f"http://{self.app_address}{request.raw_path}", encoded=True),
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                timeout=self._timeout(5.0, 1800.0),
            )
        except TimeoutError:
            return self._reply(t0, 504, "app timeout", "inbound", caller, self.service)
        except (aiohttp.ClientError, OSError):
            return self._reply(
                t0,
                503,
                "upstream connect error or disconnect/reset before headers",
                "inbound",
                caller,
                self.service,
            )
        try:
            resp = await self._relay(request, up, None, bps)
        finally:
            up.release()
        self.metrics.stats.record(
            "inbound", caller, self.service, "", resp.status, time.perf_counter() - t0, *_sizes(request, resp)
        )
        return resp

    def _deny(self, t0: float, reason: str, caller: str) -> web.Response:
        resp = self._reply(t0, 403, reason, "inbound", caller, self.service)
        resp.headers[DENIED_HEADER] = reason
        return resp

    # -- gateway ----------------------------------------------------------------------------

    async def gateway(self, request: web.BaseRequest, port: int) -> web.StreamResponse:
        t0 = time.perf_counter()
        snap = self.engine.snapshot
        listener = snap.gateway.get(port)
        if listener is None:
            return self._reply(t0, 404, "no gateway listener", "gateway", self.service, "")
        host, _ = split_host(request.headers.get("Host", ""))
        query = request.query
        found = listener.route(host, request.method, request.path, request.headers, query)
        if found is None:
            return self._reply(t0, 404, "no route", "gateway", self.service, "")
        route, prefix = found
        if route.redirect is not None:
            f = route.redirect
            scheme = f.redirect_scheme or request.scheme
            hostname = f.redirect_hostname or host
            portpart = f":{f.redirect_port}" if f.redirect_port else ""
            path = f.redirect_path if f.redirect_path is not None else route.rewrite(request.path, prefix)
            qs = request.query_string
            location = f"{scheme}://{hostname}{portpart}{path}" + (f"?{qs}" if qs else "")
            resp = self._reply(t0, f.redirect_status, "redirect", "gateway", self.service, "", body="")
            resp.headers["Location"] = location
            return resp
        target = route.wheel.choose(self.engine.rng)
        if target is None:
            return self._reply(t0, 503, _NO_HOST_RESPONSE, "gateway", self.service, "")
        headers = _clean_headers(request.headers)
        headers[SOURCE_HEADER] = self.service
        for f in route.request_headers:
            _gateway_header_filter(headers, f.set, f.add, f.remove)
        path = route.rewrite(request.path, prefix)
        qs = request.query_string
        path_qs = URL.build(path=path, encoded=False).raw_path + (f"?{qs}" if qs else "")
        return await self._to_target(
            request, target, headers, path_qs, t0, "gateway", self.service, gw_route=route
        )


def _gateway_header_filter(
    headers: CIMultiDict[str],
    set_: Iterable[HeaderChange],
    add: Iterable[HeaderChange],
    remove: Iterable[str],
) -> None:
    _add_changes(headers, set_, force_set=True)
    for change in add:
        headers.add(change.name, change.value)
    for name in remove:
        headers.popall(name, None)


def request_path_raw(path_qs: str) -> str:
    i = path_qs.find("?")
    return path_qs if i < 0 else path_qs[:i]


async def _throttled_copy(up: aiohttp.ClientResponse, resp: web.StreamResponse, bps: int) -> None:
    """Copy at ``bps`` bits per second (fault injection's response bandwidth)."""
    rate = max(1.0, bps / 8.0)
    step = max(1, min(_CHUNK, int(rate / 10)))
    while True:
        chunk = await up.content.read(step)
        if not chunk:
            break
        await resp.write(chunk)
        await asyncio.sleep(len(chunk) / rate)


def _sizes(request: web.BaseRequest, resp: web.StreamResponse) -> tuple[int, int]:
    """Request and response body sizes for the metrics (a chunked request counts 0: its size is
    not known without buffering it)."""
    if isinstance(resp, web.Response):
        body = resp.body
        sent = len(body) if isinstance(body, bytes | bytearray) else (resp.content_length or 0)
    else:
        sent = resp.body_length
    return request.content_length or 0, sent
