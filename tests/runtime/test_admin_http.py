"""``runtime._http``: the admin API's HTTP/1.1 server and the control-plane client, without aiohttp."""

from __future__ import annotations

import asyncio
import socket

from runtime._http import AdminRequest, AdminResponse, BodyTooLarge, post, serve_admin


async def _handler(request: AdminRequest) -> AdminResponse:
    if request.method == "PUT":
        try:
            body = await request.read(10)
        except BodyTooLarge:
            return AdminResponse(413, b'{"nack": "too big"}', close=True)
        return AdminResponse(200, b"got " + body, "text/plain")
    if request.method == "POST":  # answers without reading the body
        return AdminResponse(200, request.path.encode(), "text/plain")
    return AdminResponse(200, f"{request.method} {request.path}".encode(), "text/plain")


async def _server() -> tuple[asyncio.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return await serve_admin(sock, _handler), sock.getsockname()[1]


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await reader.read()  # every exchange here ends in a close (the server's or ours)
    writer.close()
    return out


def test_keep_alive_chunked_head_oversize_and_garbage() -> None:
    async def go() -> None:
        server, port = await _server()
        # Three requests on one connection: Content-Length, chunked, then HEAD with close.
        out = await _exchange(
            port,
            b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"PUT /b?q=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
            b"POST /skip HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz"
            b"HEAD /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        parts = out.split(b"HTTP/1.1 ")[1:]
        assert [p.split(b"\r\n")[0] for p in parts] == [b"200 OK"] * 4
        assert parts[0].endswith(b"got abc") and parts[1].endswith(b"got def")
        assert parts[2].endswith(b"/skip")  # an unread body is drained, the connection stays usable
        assert b"Content-Length: 7" in parts[3] and parts[3].endswith(b"\r\n\r\n")  # HEAD: no body
        out = await _exchange(port, b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"z" * 20)
        assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
        out = await _exchange(port, b"NONSENSE\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
        out = await _exchange(
            port, b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 400 ")
        out = await _exchange(port, b"GET / HTTP/1.1\r\n\r\n")  # HTTP/1.1 without Host (RFC 9112)
        assert out.startswith(b"HTTP/1.1 400 ")
        server.close()

    asyncio.run(go())


def test_post_reads_content_length_chunked_and_close_delimited_answers() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n0\r\n\r\n",
        b"HTTP/1.0 201 Created\r\n\r\nuntil close",
    ]
    seen: list[bytes] = []

    async def go() -> None:
        async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            seen.append(head + await reader.readexactly(length))
            writer.write(answers[len(seen) - 1])
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(conn, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/base/"
        got = [await post(url, "/api/v1/x", b'{"a": 1}', {"X-T": "1"}) for _ in answers]
        assert got == [(200, b"ok"), (404, b"not"), (201, b"until close")]
        assert seen[0].startswith(b"POST /base/api/v1/x HTTP/1.1\r\n") and b"X-T: 1\r\n" in seen[0]
        assert seen[0].endswith(b'\r\n\r\n{"a": 1}')
        server.close()

    asyncio.run(go())
