"""HTTP byte moving with aiohttp: outbound, inbound and gateway handlers around the engine.

Each handler reads the current ``Snapshot`` once and keeps it for the whole request, so a reload
never changes a request half way. Every decision comes from ``runtime.decide`` (the same ones
the fast path carries out); this module only streams bytes, applies timeouts and reports
outcomes back to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from runtime._hosts import Host, Outcome
from runtime.accesslog import AccessLog, app_entry
from runtime.bundle import TrafficLogConf
from runtime.decide import (
    APP,
    MAX_STREAM,
    NO_HOST,
    PASSTHROUGH,
    STREAM_IDLE,
    TARGET,
    Fetcher,
    Forward,
    Reply,
    RetryState,
    admit,
    admit_app,
    decide_gateway,
    decide_inbound,
    decide_outbound,
    failure_reply,
    no_fetcher,
    peer_hop,
    release_app,
    report_app,
    request_scheme,
    settle,
    split_host,
    stream_cut,
)
from runtime.engine import Engine, Target
from runtime.headerops import ADD, NO_OPS, SET, HeaderOp
from runtime.metrics import Metrics
from runtime.security import Credentials, PeerCache, wrong_peer
from runtime.tracing import Hop

__all__ = ["HASH_KEY_HEADER", "REASON_HEADER", "SOURCE_HEADER", "HttpProxy"]

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


def _clean_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    connection = headers.get("Connection")
    extra = {t.strip().lower() for t in connection.split(",")} if connection else set()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in _HOP_BY_HOP and lk not in extra:
            out.add(k, v)
    return out


class _Head:
    """aiohttp's request as a ``decide.RequestHead``."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def has_body(self) -> bool:
        return self._request.body_exists

    @property
    def upgrade(self) -> object:
        return self._request.headers.get("Upgrade")

    def authority(self) -> str:
        return self._request.headers.get("Host", "")

    def path(self) -> str:
        return self._request.path

    def query_string(self) -> str:
        return self._request.rel_url.raw_query_string

    def header_map(self) -> Mapping[str, str]:
        return self._request.headers  # case-insensitive: lower-case names find their values


def _apply(headers: CIMultiDict[str], ops: tuple[HeaderOp, ...]) -> None:
    """Carry out header changes (``runtime.headerops``) on a multidict."""
    for op, name, value in ops:
        if op == SET:
            headers[name] = value
        elif op == ADD:
            headers.add(name, value)
        else:
            headers.popall(name, None)


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
        self.access_log = AccessLog(metrics.logs, engine)
        self.creds = Credentials()
        self.peers = PeerCache()
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.fetch: Fetcher = no_fetcher
        """Fetches a pending destination's config (``decide.Fetch``); set by the server."""

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
        for task in list(self._tasks):
            task.cancel()
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

    # -- carrying out verdicts --------------------------------------------------------------

    def _answer(
        self,
        t0: float,
        reply: Reply,
        direction: str,
        subset: str = "",
        request: web.BaseRequest | None = None,
        span: Hop | None = None,
    ) -> web.Response:
        """Carry out a ``Reply``: the data plane answers itself, with the reason in a header.
        Its span is the reply's own, or ``span`` (the ``Forward``'s) for one made after
        forwarding began."""
        if reply.overflow:
            self.metrics.overflow.labels(reply.dest).inc()
        resp = web.Response(status=reply.status, text=reply.body if reply.body is not None else reply.reason)
        resp.headers[REASON_HEADER] = reply.reason
        for name, value in reply.headers:
            resp.headers.add(name, value)
        elapsed = time.perf_counter() - t0
        sent = len((reply.body if reply.body is not None else reply.reason).encode())
        self.metrics.stats.record(direction, reply.source, reply.dest, subset, reply.status, elapsed, 0, sent)
        trace = reply.trace or span
        if trace is not None and request is not None:
            if not trace.reason:
                trace.reason = reply.reason
            self._span(trace, direction, request, reply.status, elapsed)
        return resp

    async def _carry_out(
        self, request: web.BaseRequest, verdict: Forward | Reply, path_qs: str, t0: float, direction: str
    ) -> web.StreamResponse:
        if verdict.delay_s:
            await asyncio.sleep(verdict.delay_s)
        if isinstance(verdict, Reply):
            answer = self._answer(t0, verdict, direction, request=request)
            if verdict.logs:
                trace_id = verdict.trace.trace_id if verdict.trace is not None else ""
                self._write_app_logs(
                    verdict.logs, verdict.source, verdict.dest, "", request, t0, answer, trace_id
                )
            return answer
        fwd = verdict
        if fwd.path is not None:
            path_qs = fwd.path + path_qs[len(request_path_raw(path_qs)) :]
        headers = _clean_headers(request.headers)
        if fwd.source_header is not None:
            headers[SOURCE_HEADER] = fwd.source_header
        if fwd.host is not None:
            headers["Host"] = fwd.host
        _apply(headers, fwd.request_ops)
        for mirror in fwd.mirrors:
            self._mirror(mirror, request.method, path_qs, headers)
        if fwd.kind == TARGET:
            return await self._to_target(request, fwd, headers, path_qs, t0, direction)
        connect_s: float | None
        total_s: float | None
        end: float | None = None
        if fwd.kind == PASSTHROUGH:
            assert fwd.address is not None
            name, port = fwd.address
            url, connect_s, read_s, total_s = f"http://{name}:{port}{path_qs}", 5.0, 300.0, 15.0
        else:
            refused = admit_app(fwd, self.engine.clock())
            if refused is not None:
                return self._answer(t0, refused, direction, request=request, span=fwd.trace)
            app = fwd.app
            url = f"http://{self.app_address}{path_qs}"
            # The stream idle timeout is the app's silence (aiohttp's read timeout); the max
            # stream duration bounds the head and the body relayed after it.
            connect_s, read_s, total_s = app.connect_s, app.stream_idle_s or 1800.0, app.request_timeout_s
            if app.max_stream_s is not None:
                end = asyncio.get_running_loop().time() + app.max_stream_s
                total_s = min(total_s, app.max_stream_s) if total_s is not None else app.max_stream_s
        assert self.session is not None
        try:
            try:
                async with asyncio.timeout(total_s):
                    up = await self.session.request(
                        request.method,
                        URL(url, encoded=True),
                        headers=headers,
                        data=request.content if request.body_exists else None,
                        allow_redirects=False,
                        timeout=self._timeout(connect_s, read_s),
                    )
            except TimeoutError as e:
                self._report_app(fwd, Outcome.TIMEOUT)
                why = self._cut_why(e, end) if fwd.kind == APP else None
                if why is not None:
                    reply = stream_cut(fwd.source, fwd.dest, why)
                else:
                    reply = failure_reply(fwd, Outcome.TIMEOUT, "TimeoutError")
                answer = self._answer(t0, reply, direction, request=request, span=fwd.trace)
                if reply.status == 408:
                    answer.force_close()  # the request's bytes may still be on their way
                return self._log_app(fwd, request, t0, answer)
            except (aiohttp.ClientError, OSError) as e:
                self._report_app(fwd, Outcome.CONNECT_FAILURE)
                reply = failure_reply(fwd, Outcome.CONNECT_FAILURE, type(e).__name__)
                answer = self._answer(t0, reply, direction, request=request, span=fwd.trace)
                return self._log_app(fwd, request, t0, answer)
            self._report_app(fwd, self.engine.outcome_for_status(up.status))
            try:
                resp = await self._relay(
                    request, up, NO_OPS, fwd.bps, end, direction if fwd.kind == APP else None
                )
            finally:
                up.release()
        finally:
            release_app(fwd)
        elapsed = time.perf_counter() - t0
        self.metrics.stats.record(
            direction, fwd.source, fwd.dest, "", resp.status, elapsed, *_sizes(request, resp)
        )
        self._span(fwd.trace, direction, request, resp.status, elapsed)
        return self._log_app(fwd, request, t0, resp)

    def _log_app(
        self, fwd: Forward, request: web.BaseRequest, t0: float, resp: web.StreamResponse
    ) -> web.StreamResponse:
        """The inbound access log lines of a request to the local app (``AppPolicy.logs``)."""
        if fwd.kind == APP and fwd.app.logs:
            trace_id = fwd.trace.trace_id if fwd.trace is not None else ""
            app = self.app_address or ""
            self._write_app_logs(fwd.app.logs, fwd.source, fwd.dest, app, request, t0, resp, trace_id)
        return resp

    def _write_app_logs(
        self,
        logs: tuple[TrafficLogConf, ...],
        source: str,
        dest: str,
        upstream: str,
        request: web.BaseRequest,
        t0: float,
        resp: web.StreamResponse,
        trace_id: str,
    ) -> None:
        """Inbound access log lines (``upstream``: the app, or empty for a request the sidecar
        answered itself: a deny, a rate limit, a fault's abort)."""
        elapsed = time.perf_counter() - t0
        entry = app_entry(
            source, dest, upstream, request.method, request.path, resp.status, elapsed, trace_id
        )
        for conf in logs:
            self.access_log.write(conf, entry, request.headers.get)

    def _span(
        self, span: Hop | None, direction: str, request: web.BaseRequest, status: int, elapsed: float
    ) -> None:
        self.metrics.spans.record(
            self.engine.snapshot.trace_backend,
            span,
            service=self.engine.service,
            direction=direction,
            start_s=time.time() - elapsed,
            duration_s=elapsed,
            method=request.method,
            path=request.path,
            status=status,
        )

    def _mirror(self, target: Target, method: str, path_qs: str, headers: CIMultiDict[str]) -> None:
        """Fire and forget a copy to one of ``target``'s hosts (Host gets ``-shadow``)."""
        host = target.pick(self.engine.clock(), self.engine.rng)
        if host is None:
            return
        self.metrics.mirrors.labels(target.service).inc()
        shadow = CIMultiDict(headers)
        shadow["Host"] = headers.get("Host", "").split(":", 1)[0] + "-shadow"
        task = asyncio.ensure_future(self._send_mirror(target, host, method, path_qs, shadow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_mirror(
        self, target: Target, host: Host, method: str, path_qs: str, headers: CIMultiDict[str]
    ) -> None:
        hop = peer_hop(self.engine.snapshot, self.creds.client_ctx is not None, "", target.service)
        if isinstance(hop, Reply) or self.session is None:
            return  # no certificate yet: the peer would refuse plaintext
        scheme, tls, peer_name = (
            ("https", self.creds.client_ctx, target.service) if hop else ("http", True, None)
        )
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with (
                asyncio.timeout(target.request_timeout_s or 15.0),
                self.session.request(
                    method,
                    URL(f"{scheme}://{host.address}{path_qs}", encoded=True),
                    headers=headers,
                    allow_redirects=False,
                    ssl=cast(Any, tls),
                    server_hostname=peer_name,
                ) as resp,
            ):
                await resp.read()

    # -- listeners --------------------------------------------------------------------------

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
        head = _Head(request)
        verdict = await settle(
            self.engine,
            decide_outbound(self.engine, snap, head, name, port, self.own_addresses),
            self.fetch,
            lambda s: decide_outbound(self.engine, s, head, name, port, self.own_addresses),
        )
        return await self._carry_out(request, verdict, path_qs, t0, "outbound")

    async def inbound(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        is_tls, peer = self.peers.of(request.transport)
        caller = request.headers.get(SOURCE_HEADER, "")
        verdict = decide_inbound(self.engine, self.engine.snapshot, is_tls, peer, caller, request.headers.get)
        return await self._carry_out(request, verdict, request.raw_path, t0, "inbound")

    async def gateway(self, request: web.BaseRequest, port: int) -> web.StreamResponse:
        t0 = time.perf_counter()
        scheme = request_scheme(request.headers.get("X-Forwarded-Proto"), request.secure)
        verdict = decide_gateway(self.engine, self.engine.snapshot, _Head(request), port, scheme)
        return await self._carry_out(request, verdict, request.raw_path, t0, "gateway")

    async def _to_target(
        self,
        request: web.BaseRequest,
        fwd: Forward,
        headers: CIMultiDict[str],
        path_qs: str,
        t0: float,
        direction: str,
    ) -> web.StreamResponse:
        """Send to one of the target's hosts with its timeouts, retries and ejection; relay back."""
        engine = self.engine
        target = fwd.target
        assert target is not None and self.session is not None
        source, dest, subset = fwd.source, target.service, target.subset
        refused = admit(target, source)
        if refused is not None:
            return self._answer(t0, refused, direction, subset, request=request, span=fwd.trace)
        loop = asyncio.get_running_loop()
        retry = RetryState(
            target,
            request.method,
            request.content_length if request.body_exists else 0,
            loop.time(),
            fwd.policy,
        )
        body: Any = None
        if request.body_exists:
            body = await request.read() if retry.allowed else request.content
        key = request.headers.get(HASH_KEY_HEADER) or request.path
        timeout = self._timeout(target.connect_timeout_s, retry.stream_idle_s)
        # The max stream duration bounds the whole exchange, retries included, as on the fast path.
        end = loop.time() + target.max_stream_s if target.max_stream_s is not None else None
        hop = peer_hop(engine.snapshot, self.creds.client_ctx is not None, source, dest)
        if isinstance(hop, Reply):
            return self._answer(t0, hop, direction, request=request, span=fwd.trace)
        # A rotation swaps the context: new pooled connections. The server's SPIFFE identity is
        # checked against the destination (_MeshConnector). ssl=True is aiohttp's default.
        scheme, tls, peer_name = ("https", self.creds.client_ctx, dest) if hop else ("http", True, None)
        target.active += 1
        try:
            while True:
                host = target.pick(engine.clock(), engine.rng, key, retry.tried)
                if host is None:
                    return self._answer(
                        t0,
                        Reply(503, NO_HOST, source, dest),
                        direction,
                        subset,
                        request=request,
                        span=fwd.trace,
                    )
                now = loop.time()
                try_timeout = retry.try_timeout(now)
                try_end = now + try_timeout if try_timeout is not None else None
                host.active += 1
                up: aiohttp.ClientResponse | None = None
                outcome = Outcome.OK
                try:
                    async with asyncio.timeout_at(try_end if end is None else min(end, try_end or end)):
                        up = await self.session.request(
                            request.method,
                            URL(f"{scheme}://{host.address}{path_qs}", encoded=True),
                            headers=headers,
                            data=body,
                            allow_redirects=False,
                            timeout=timeout,
                            ssl=cast(Any, tls),
                            server_hostname=peer_name,
                        )
                    outcome = engine.outcome_for_status(up.status)
                except TimeoutError as e:
                    outcome = Outcome.TIMEOUT
                    why = self._cut_why(e, end, direction) if end is not None and loop.time() >= end else None
                    if why is not None:
                        host.active -= 1
                        answer = self._answer(
                            t0,
                            stream_cut(source, dest, why),
                            direction,
                            subset,
                            request=request,
                            span=fwd.trace,
                        )
                        answer.force_close()  # the request's bytes may still be on their way
                        return answer
                except (aiohttp.ClientError, OSError):
                    outcome = Outcome.CONNECT_FAILURE
                if up is None or outcome != Outcome.OK:
                    host.active -= 1
                if target.report(host, outcome, engine.clock()):
                    self.metrics.ejections.labels(dest, host.address).inc()
                backoff = retry.failed(host, outcome, up.status if up is not None else 0, engine.rng)
                if backoff is not None:
                    if up is not None:
                        up.release()
                        if outcome == Outcome.OK:
                            host.active -= 1
                    self.metrics.retries.labels(dest, subset).inc()
                    late: Reply | None = None
                    try:
                        await asyncio.sleep(backoff)
                    finally:
                        late = retry.resume(loop.time(), source)
                    if late is not None:
                        return self._answer(t0, late, direction, subset, request=request, span=fwd.trace)
                    continue
                if up is None:
                    return self._answer(
                        t0, retry.give_up(outcome, source), direction, subset, request=request, span=fwd.trace
                    )
                try:
                    resp = await self._relay(
                        request, up, fwd.response_ops, end=end, cut=direction if end is not None else None
                    )
                finally:
                    up.release()
                    if outcome == Outcome.OK:
                        host.active -= 1
                elapsed = time.perf_counter() - t0
                self.metrics.stats.record(
                    direction, source, dest, subset, resp.status, elapsed, *_sizes(request, resp)
                )
                self._span(fwd.trace, direction, request, resp.status, elapsed)
                if target.log is not None:
                    trace_id = fwd.trace.trace_id if fwd.trace is not None else ""
                    self._log(
                        target.log, direction, source, target, request, resp.status, elapsed, host, trace_id
                    )
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
        trace_id: str,
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
                "trace_id": trace_id,
            },
            request.headers.get,
        )

    def _report_app(self, fwd: Forward, outcome: int) -> None:
        """One outcome of the local app for its outlier detector (``decide.report_app``)."""
        if fwd.kind == APP and report_app(fwd, outcome, self.engine.clock()):
            self.metrics.ejections.labels(fwd.dest, self.app_address or "").inc()

    def _cut_why(self, e: BaseException, end: float | None, direction: str = "inbound") -> str | None:
        """Which stream timeout ended an exchange, if one did (counted as a listener refusal of
        ``direction``): the max stream duration, or the peer's silence (aiohttp's read timeout)."""
        if end is not None and asyncio.get_running_loop().time() >= end:
            why = MAX_STREAM
        elif isinstance(e, aiohttp.ServerTimeoutError):
            why = STREAM_IDLE
        else:
            return None
        self.metrics.listener_refusals.labels(direction, why.replace(" ", "_")).inc()
        return why

    async def _relay(
        self,
        request: web.BaseRequest,
        up: aiohttp.ClientResponse,
        ops: tuple[HeaderOp, ...],
        bps: int = 0,
        end: float | None = None,
        cut: str | None = None,
    ) -> web.StreamResponse:
        """Relay the upstream response: small bodies in one write, larger ones streamed (until
        the loop time ``end``, a max stream duration: then 408, or a closed connection; ``cut``
        names the direction such a cut counts against, None where no stream timeout applies)."""
        out: CIMultiDict[str] = _clean_headers(up.headers)
        _apply(out, ops)
        length = up.content_length
        if bps == 0 and length is not None and length <= _SMALL_BODY and request.method != "HEAD":
            # Headers and body leave in one send: half the system calls of streaming.
            try:
                async with asyncio.timeout_at(end):
                    body = await up.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                up.close()
                why = self._cut_why(e, end, cut) if cut is not None else None
                if why is not None:
                    # The head is not relayed yet (a small body is read whole): the cut is a 408.
                    answer = web.Response(status=408, text=why, headers={REASON_HEADER: why})
                    answer.force_close()
                    return answer
                return web.Response(
                    status=502,
                    text="upstream reset before the body ended",
                    headers={REASON_HEADER: "upstream reset"},
                )
            return web.Response(status=up.status, reason=up.reason, body=body, headers=out)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
        try:
            await resp.prepare(request)
            async with asyncio.timeout_at(end):
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
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # Upstream died mid-body or the client went away: the only honest signal left is
            # to close the client connection, so a truncated body is never taken for whole.
            if cut is not None:
                self._cut_why(e, end, cut)
            up.close()
            resp.force_close()
            if request.transport is not None:
                request.transport.close()
        return resp


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
