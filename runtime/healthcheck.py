"""Active health checks: one task per (endpoint, check kind), reconciled on every snapshot swap.

Results feed ``Host.health_result`` (thresholds, un-ejection) in the engine; the checker only does
the I/O: an HTTP GET of the configured path (expected statuses, 200 when none are listed), a gRPC
``grpc.health.v1.Health/Check`` call over HTTP/2 (h2c, or ALPN ``h2`` under mTLS; the protocol is
``runtime.grpchealth``) or a TCP connect with an optional payload exchange.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime._hosts import Host
from runtime.bundle import HealthCheckConf
from runtime.engine import Snapshot
from runtime.metrics import Metrics

if TYPE_CHECKING:
    import aiohttp

    from runtime.grpchealth import HealthProbe, Verdict

__all__ = ["HealthChecker"]

_Key = tuple[str, str]


class HealthChecker:
    def __init__(self, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._tasks: dict[_Key, tuple[asyncio.Task[None], HealthCheckConf]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.tls: Callable[[], ssl.SSLContext | None] = lambda: None
        """The mTLS client context when the Mesh has mTLS on (checks go to peer inbounds)."""
        self.h2_tls: Callable[[], ssl.SSLContext | None] = lambda: None
        """The same with ALPN ``h2`` offered, for gRPC checks."""
        self._h2: dict[_Key, _H2Conn] = {}
        """A gRPC check's task key -> the HTTP/2 connection it reuses (``reuse_connection``)."""

    def reconcile(self, snapshot: Snapshot) -> None:
        wanted = snapshot.health_checks()
        for key in list(self._tasks):
            task, conf = self._tasks[key]
            if key not in wanted or wanted[key][1] != conf:
                task.cancel()
                del self._tasks[key]
                self._drop_h2(key)
        for key, (host, conf, target) in wanted.items():
            if key not in self._tasks:
                task = asyncio.ensure_future(self._run(host, conf, target.service))
                self._tasks[key] = (task, conf)

    async def close(self) -> None:
        for task, _ in self._tasks.values():
            task.cancel()
        for task, _ in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for key in list(self._h2):
            self._drop_h2(key)
        if self._session is not None:
            await self._session.close()

    def _jitter(self, conf: HealthCheckConf) -> float:
        extra = 0.0
        if conf.interval_jitter_ms:
            extra += self.rng.random() * conf.interval_jitter_ms / 1000.0
        if conf.interval_jitter_percent:
            extra += self.rng.random() * conf.interval_ms * conf.interval_jitter_percent / 100_000.0
        return extra

    async def _run(self, host: Host, conf: HealthCheckConf, service: str) -> None:
        if conf.initial_jitter_ms:
            await asyncio.sleep(self.rng.random() * conf.initial_jitter_ms / 1000.0)
        while True:
            ok = await self.check(host, conf, service)
            host.health_result(ok, conf)
            self.metrics.health_checks.labels(service, host.address, "success" if ok else "failure").inc()
            await asyncio.sleep(conf.interval_ms / 1000.0 + self._jitter(conf))

    async def check(self, host: Host, conf: HealthCheckConf, service: str = "") -> bool:
        """One check of ``host``; ``service`` (the destination) is a gRPC check's default authority."""
        timeout = conf.timeout_ms / 1000.0
        kind = conf.check_kind()
        try:
            async with asyncio.timeout(timeout):
                if kind == "http":
                    return await self._http(host, conf)
                if kind == "grpc":
                    return await self._grpc(host, conf, service)
                return await self._tcp(host, conf)
        except (TimeoutError, OSError, ValueError):
            return False
        except Exception as e:
            if _client_error(e):
                return False
            raise

    async def _http(self, host: Host, conf: HealthCheckConf) -> bool:
        import aiohttp  # only once a Mesh asks for HTTP health checks: ~11 MB a fast path saves

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",),
            )
        path = conf.http.path if conf.http else "/"
        headers = {"User-Agent": "meshc-health-check"}
        expected: tuple[int, ...] = ()
        if conf.http is not None:
            for h in conf.http.request_headers:
                headers[h.name] = h.value
            expected = conf.http.expected_statuses
        ctx = self.tls()
        async with self._session.get(
            f"{'https' if ctx is not None else 'http'}://{host.address}{path}",
            ssl=ctx if ctx is not None else True,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=conf.timeout_ms / 1000.0),
        ) as resp:
            await resp.read()
            if not conf.reuse_connection:
                resp.close()
            return resp.status in expected if expected else resp.status == 200

    async def _grpc(self, host: Host, conf: HealthCheckConf, service: str) -> bool:
        grpc = conf.grpc
        assert grpc is not None
        key = (host.address, f"grpc:{grpc.service_name}")
        authority = grpc.authority or service or host.address
        c = self._h2.pop(key, None)
        if c is not None and not c.probe.closed:
            # A kept connection the peer may have closed while idle: a call that gets no answer
            # on it is not the host's failure, so the check runs again on a new connection.
            verdict = await self._call(c, grpc.service_name, authority, conf.timeout_ms)
            if verdict is not None:
                self._keep(key, c, conf)
                return verdict.ok
        if c is not None:
            c.writer.close()
        c = await self._dial_h2(host)
        verdict = await self._call(c, grpc.service_name, authority, conf.timeout_ms)
        self._keep(key, c, conf)
        return verdict is not None and verdict.ok

    async def _call(self, c: _H2Conn, service_name: str, authority: str, timeout_ms: int) -> Verdict | None:
        """One check on ``c``; None when the call failed before any answer (the connection was
        closed, went away with a GOAWAY, broke the protocol, reset the stream)."""
        probe = c.probe
        try:
            probe.start(service_name, authority, c.tls, timeout_ms)
            while True:
                c.writer.write(probe.data_to_send())
                await c.writer.drain()
                verdict = probe.receive(await c.reader.read(65536))
                if verdict is not None:
                    c.writer.write(probe.data_to_send())  # window updates, a RST of a big answer
                    return verdict if verdict.ok or probe.answered else None
        except OSError:
            probe.closed = True
            return None
        except BaseException:
            probe.closed = True  # a timeout or a cancel mid-call: the stream is abandoned
            c.writer.close()
            raise

    def _keep(self, key: _Key, c: _H2Conn, conf: HealthCheckConf) -> None:
        if conf.reuse_connection and not c.probe.closed:
            self._h2[key] = c
        else:
            c.writer.close()

    async def _dial_h2(self, host: Host) -> _H2Conn:
        from runtime.grpchealth import HealthProbe  # h2 only once a gRPC check runs (runtime.h2sniff)

        ctx = self.h2_tls() if self.tls() is not None else None
        if ctx is None:
            reader, writer = await asyncio.open_connection(host.host, host.port)
            return _H2Conn(reader, writer, HealthProbe(), False)
        reader, writer = await asyncio.open_connection(
            host.host, host.port, ssl=ctx, server_hostname=host.host
        )
        tls = writer.get_extra_info("ssl_object")
        if tls is None or tls.selected_alpn_protocol() != "h2":
            writer.close()
            raise OSError("the peer did not agree to HTTP/2 (ALPN h2)")
        return _H2Conn(reader, writer, HealthProbe(), True)

    def _drop_h2(self, key: _Key) -> None:
        c = self._h2.pop(key, None)
        if c is not None:
            c.writer.close()

    async def _tcp(self, host: Host, conf: HealthCheckConf) -> bool:
        ctx = self.tls()
        if ctx is not None:
            reader, writer = await asyncio.open_connection(
                host.host, host.port, ssl=ctx, server_hostname=host.host
            )
        else:
            reader, writer = await asyncio.open_connection(host.host, host.port)
        try:
            tcp = conf.tcp
            if tcp is not None and tcp.send:
                writer.write(base64.b64decode(tcp.send))
                await writer.drain()
            if tcp is not None and tcp.receive:
                wanted = [base64.b64decode(r) for r in tcp.receive]
                got = b""
                while not all(w in got for w in wanted):
                    chunk = await reader.read(4096)
                    if not chunk:
                        return False
                    got += chunk
            return True
        finally:
            writer.close()


class _H2Conn:
    __slots__ = ("probe", "reader", "tls", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, probe: HealthProbe, tls: bool
    ) -> None:
        self.reader, self.writer, self.probe, self.tls = reader, writer, probe, tls


def _client_error(e: Exception) -> bool:
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(e, aiohttp.ClientError)
