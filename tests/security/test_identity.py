"""Mesh CA, certificates and signed pushes, over real TLS sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest

from compiler.ca import MeshCA, PushSigner, TokenIssuer
from runtime.identity import (
    Identity,
    PeerIdentity,
    client_context,
    make_csr,
    new_private_key,
    peer_identity,
    server_context,
    verify_push,
)


def _identity(
    ca: MeshCA, service: str, tags: dict[str, str], ttl: dt.timedelta = dt.timedelta(hours=1)
) -> Identity:
    key = new_private_key()
    cert = ca.issue(make_csr(key, ca.mesh, service, tags), service, tags, ttl)
    return Identity(key, cert, ca.cert_pem)


async def _serve_once(ctx: ssl.SSLContext | None) -> tuple[asyncio.Server, int, list[PeerIdentity | None]]:
    seen: list[PeerIdentity | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        seen.append(peer_identity(sslobj.getpeercert(binary_form=True)) if sslobj else None)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], seen


async def _talk(port: int, ctx: ssl.SSLContext | None) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 30)
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    return MeshCA.builtin(tmp_path / "state", "default")


def test_ca_key_is_private_and_reloaded(tmp_path: Path, ca: MeshCA) -> None:
    key_file = tmp_path / "state" / "ca-default.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = MeshCA.builtin(tmp_path / "state", "default")
    assert again.cert_pem == ca.cert_pem


def test_mutual_tls_carries_the_identity(ca: MeshCA) -> None:
    server_id = _identity(ca, "benigno", {"version": "v1"})
    client_id = _identity(ca, "magnanimo", {"version": "v2", "zone": "eu"})

    async def run() -> list[PeerIdentity | None]:
        server, port, seen = await _serve_once(server_context(server_id))
        async with server:
            assert await _talk(port, client_context(client_id)) == b"ok"
        return seen

    seen = asyncio.run(run())
    assert seen == [
        PeerIdentity("default", "magnanimo", {"kuma.io/service": "magnanimo", "version": "v2", "zone": "eu"})
    ]


def test_strict_refuses_plaintext_other_ca_and_expired(tmp_path: Path, ca: MeshCA) -> None:
    server_id = _identity(ca, "benigno", {})
    other = MeshCA.builtin(tmp_path / "other", "default")
    stranger = _identity(other, "magnanimo", {})
    expired = _identity(ca, "magnanimo", {}, ttl=dt.timedelta(seconds=-30))

    async def run() -> None:
        server, port, seen = await _serve_once(server_context(server_id))
        async with server:
            # Plaintext: the TLS server never answers "ok" to bytes that are not a handshake.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: benigno\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert b"ok" not in data
            for bad in (stranger, expired):
                ctx = client_context(bad)
                # The client trusts the server's CA so only the server's check can fail.
                ctx.load_verify_locations(cadata=ca.cert_pem)
                # TLS 1.3 finishes the client's side of the handshake before the server checks the
                # client certificate, so the refusal shows as an alert or an empty read.
                try:
                    got = await _talk(port, ctx)
                except (ssl.SSLError, ConnectionError):
                    got = b""
                assert got != b"ok"
        assert seen == []

    asyncio.run(run())


def test_push_signatures_bind_digest_generation_and_service(tmp_path: Path) -> None:
    signer = PushSigner(tmp_path)
    pub = signer.public_key_hex
    sig = signer.sign("ab" * 32, 7, "benigno")
    assert verify_push(pub, sig, "ab" * 32, 7, "benigno")
    assert not verify_push(pub, sig, "cd" * 32, 7, "benigno")  # another bundle
    assert not verify_push(pub, sig, "ab" * 32, 8, "benigno")  # another generation
    assert not verify_push(pub, sig, "ab" * 32, 7, "magnanimo")  # another service
    assert not verify_push(pub, "00" * 64, "ab" * 32, 7, "benigno")  # forged
    assert not verify_push(pub, "not-hex", "ab" * 32, 7, "benigno")
    other = PushSigner(tmp_path / "other")
    assert not verify_push(other.public_key_hex, sig, "ab" * 32, 7, "benigno")
    # The key survives a restart, so data planes keep trusting it.
    assert PushSigner(tmp_path).public_key_hex == pub


def test_bootstrap_tokens(tmp_path: Path) -> None:
    issuer = TokenIssuer(tmp_path)
    token = issuer.mint("benigno")
    assert issuer.check(token, "benigno")
    assert not issuer.check(token, "magnanimo")
    assert not issuer.check(token[:-1] + ("0" if token[-1] != "0" else "1"), "benigno")
    assert TokenIssuer(tmp_path).check(token, "benigno")
    assert stat.S_IMODE((tmp_path / "token.secret").stat().st_mode) == 0o600
