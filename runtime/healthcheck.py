"""Active health checks: one task per (endpoint, check kind), reconciled on every snapshot swap.

Results feed ``Host.health_result`` (thresholds, un-ejection) in the engine; the checker only does
the I/O: an HTTP GET of the configured path (expected statuses, 200 when none are listed) or a TCP
connect with an optional payload exchange.
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

    def reconcile(self, snapshot: Snapshot) -> None:
        wanted = snapshot.health_checks()
        for key in list(self._tasks):
            task, conf = self._tasks[key]
            if key not in wanted or wanted[key][1] != conf:
                task.cancel()
                del self._tasks[key]
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
            ok = await self.check(host, conf)
            host.health_result(ok, conf)
            self.metrics.health_checks.labels(service, host.address, "success" if ok else "failure").inc()
            await asyncio.sleep(conf.interval_ms / 1000.0 + self._jitter(conf))

    async def check(self, host: Host, conf: HealthCheckConf) -> bool:
        timeout = conf.timeout_ms / 1000.0
        try:
            async with asyncio.timeout(timeout):
                if conf.http is not None or conf.tcp is None:
                    return await self._http(host, conf)
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


def _client_error(e: Exception) -> bool:
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(e, aiohttp.ClientError)
