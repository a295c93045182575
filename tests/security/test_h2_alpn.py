"""The h2 byte layer's client side against real TLS servers on 127.0.0.1, in process: a mesh peer
that picks ``http/1.1`` by ALPN gets the stream in HTTP/1.1 on the same connection, and a peer
presenting another service's identity is refused before anything is sent."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest

from compiler.ca import MeshCA
from runtime.engine import Engine
from runtime.fastmetrics import Identity as MetricsIdentity
from runtime.h2proxy import H1Upstream, H2Plane, H2Upstream
from runtime.identity import Identity, make_csr, new_private_key, server_context
from runtime.metrics import Metrics
from runtime.security import Credentials


def _identity(ca: MeshCA, service: str) -> Identity:
    key = new_private_key()
    cert = ca.issue(make_csr(key, "default", service, {}), service, {}, dt.timedelta(minutes=10))
    return Identity(key, cert, ca.cert_pem)


def _plane(ca: MeshCA) -> H2Plane:
    creds = Credentials()
    csr = creds.csr("default", "magnanimo", {})
    assert creds.install(ca.issue(csr, "magnanimo", {}, dt.timedelta(minutes=10)), ca.cert_pem)
    return H2Plane(Engine("magnanimo", {}), Metrics(MetricsIdentity("magnanimo")), creds)


async def _serve(ctx: ssl.SSLContext, seen: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-app: old\r\n\r\nhello")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


@pytest.mark.timeout(60)
def test_a_peer_that_picks_http11_gets_http11_on_the_same_connection(tmp_path: Path) -> None:
    ca = MeshCA.builtin(tmp_path, "default")

    async def main() -> None:
        plane = _plane(ca)
        ctx = server_context(_identity(ca, "benigno"))
        ctx.set_alpn_protocols(["http/1.1"])  # a data plane that speaks no HTTP/2
        seen: list[bytes] = []
        server = await _serve(ctx, seen)
        port = server.sockets[0].getsockname()[1]
        try:
            up = await plane.upstream(f"tls|127.0.0.1:{port}", "127.0.0.1", port, True, "benigno")
            assert isinstance(up, H1Upstream)
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", "benigno"), (":path", "/x")]
            sid, stream = up.open(headers, True)
            items = [await asyncio.wait_for(stream.inbox.get(), 30) for _ in range(3)]
            assert (
                items[0][0] == "head"
                and (":status", "200") in items[0][1]
                and ("x-app", "old") in items[0][1]
            )
            assert items[1][:2] == ("data", b"hello") and items[2] == ("end",)
            assert seen[0].startswith(b"GET /x HTTP/1.1\r\nhost: benigno\r\n")
            up.done(sid)
            # A peer that does speak h2 by ALPN is kept as an HTTP/2 connection.
            ctx2 = server_context(_identity(ca, "benigno"))
            server2 = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=ctx2)
            port2 = server2.sockets[0].getsockname()[1]
            up2 = await plane.upstream(f"tls|127.0.0.1:{port2}", "127.0.0.1", port2, True, "benigno")
            assert isinstance(up2, H2Upstream) and up2.alpn == "h2"
            server2.close()
            # Another service's certificate at that address: refused, nothing sent.
            with pytest.raises(OSError, match="the peer is benigno, not other"):
                await plane.upstream(f"tls|127.0.0.1:{port}x", "127.0.0.1", port, True, "other")
        finally:
            server.close()
            await plane.close()

    asyncio.run(main())
