"""Mesh CA, certificates and signed pushes, over real TLS sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import stat
import time
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
from runtime.protocol import PushTarget


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


def test_push_signatures_bind_target_boot_slot_digest_and_generation(tmp_path: Path) -> None:
    signer = PushSigner(tmp_path)
    pub = signer.public_key_hex
    t = PushTarget("default", "benigno", "benigno-1", "b" * 32)
    sig = signer.sign(t, "mesh", "ab" * 32, 7)
    assert verify_push(pub, sig, t, "mesh", "ab" * 32, 7)
    assert not verify_push(pub, sig, t, "mesh", "cd" * 32, 7)  # another bundle
    assert not verify_push(pub, sig, t, "mesh", "ab" * 32, 8)  # another generation
    assert not verify_push(pub, sig, t, "service", "ab" * 32, 7)  # another slot
    for other_target in (
        PushTarget("other", "benigno", "benigno-1", "b" * 32),  # another mesh
        PushTarget("default", "magnanimo", "benigno-1", "b" * 32),  # another service
        PushTarget("default", "benigno", "benigno-2", "b" * 32),  # another instance
        PushTarget("default", "benigno", "benigno-1", "c" * 32),  # another boot
    ):
        assert not verify_push(pub, sig, other_target, "mesh", "ab" * 32, 7), other_target
    assert not verify_push(pub, "00" * 64, t, "mesh", "ab" * 32, 7)  # forged
    assert not verify_push(pub, "not-hex", t, "mesh", "ab" * 32, 7)
    other = PushSigner(tmp_path / "other")
    assert not verify_push(other.public_key_hex, sig, t, "mesh", "ab" * 32, 7)
    with pytest.raises(ValueError):  # fields cannot be shifted by a newline in a name
        signer.sign(PushTarget("default\nbenigno", "x", "i", "b"), "mesh", "ab" * 32, 7)
    # The key survives a restart, so data planes keep trusting it.
    assert PushSigner(tmp_path).public_key_hex == pub


def test_bootstrap_tokens_bind_mesh_service_and_expiry(tmp_path: Path) -> None:
    issuer = TokenIssuer(tmp_path)
    token = issuer.mint("default", "benigno")
    assert issuer.check(token, "default", "benigno")
    assert not issuer.check(token, "default", "magnanimo")
    assert not issuer.check(token, "other", "benigno")
    assert not issuer.check(token[:-1] + ("0" if token[-1] != "0" else "1"), "default", "benigno")
    assert TokenIssuer(tmp_path).check(token, "default", "benigno")
    short = issuer.mint("default", "benigno", valid_for_s=60)
    assert (
        issuer.refusal(short, "default", "benigno", now=time.time() + 61) == "the bootstrap token has expired"
    )
    # A claim cannot be edited without the secret: another service under the same MAC is refused.
    head, _, mac = token.split(".")
    forged_claims = base64.urlsafe_b64encode(
        b'{"exp": 9999999999, "mesh": "default", "service": "magnanimo"}'
    )
    assert not issuer.check(f"{head}.{forged_claims.decode().rstrip('=')}.{mac}", "default", "magnanimo")
    # The old per-service token format is refused with a clear reason.
    legacy = "benigno." + "ab" * 32
    assert "meshc token --mesh" in (issuer.refusal(legacy, "default", "benigno") or "")
    assert stat.S_IMODE((tmp_path / "token.secret").stat().st_mode) == 0o600
