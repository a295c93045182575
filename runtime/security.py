"""The data plane's side of DESIGN §6: its identity, mutual TLS on inbound and peer hops, and the
control plane key that pushes must be signed with.

* ``Credentials``: the private key (made here, kept in memory only: never written to the state
  dir, a log or a bundle), the certificate the control plane's CA issued for a CSR, and the TLS
  1.3 contexts built from them. A rotation builds new contexts and swaps the references: new
  connections use them, connections already open keep theirs until they close.
* ``PushTrust``: the control plane's Ed25519 public key (``--trust-key``, the key kept in the
  state dir, or the one the first registration returned, which is then pinned and kept) and the
  check every ``PUT /bundle`` / ``PUT /endpoints`` goes through. ``--insecure-admin`` turns the
  check off, for data planes fed by hand with no control plane.
* ``MtlsListener``: an inbound listener that accepts connections itself and looks at the first
  byte of each (``0x16``: a TLS handshake) before handing it to the HTTP layer (aiohttp or the
  fast path), with TLS when it is one. STRICT closes plaintext connections; PERMISSIVE takes both;
  with mTLS off nothing changes. ``meshc_inbound_connections_total{tls, result}`` counts them.
* ``inbound_peer``: who is calling, from the connection's peer certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.bundle import Mtls
from runtime.protocol import PushTarget

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from runtime.identity import Identity, PeerIdentity

# ``runtime.identity`` (and with it ``cryptography``, ~10 MB) is imported when first needed: a
# data plane fed by hand without mTLS never loads it.

__all__ = [
    "DENIED_HEADER",
    "TRUST_KEY_FILE",
    "Credentials",
    "MtlsListener",
    "PeerCache",
    "PushTrust",
    "wrong_peer",
]

DENIED_HEADER = "x-meshc-denied"
"""Why the inbound side refused a caller (403): no TrafficPermission allows it, no identity."""
TRUST_KEY_FILE = "controlplane.pub"
"""In the state dir: the control plane's Ed25519 public key (hex), pinned at first registration."""

_HANDSHAKE_TIMEOUT_S = 10.0
_FIRST_BYTE_TIMEOUT_S = 30.0
_TLS_RECORD_HANDSHAKE = 0x16


def _warn(message: str) -> None:
    print(f"meshc: {message}", file=sys.stderr, flush=True)


# --- identity --------------------------------------------------------------------------------


class Credentials:
    """This data plane's key and certificate, and the TLS contexts made from them."""

    def __init__(self) -> None:
        self.identity: Identity | None = None
        self.server_ctx: ssl.SSLContext | None = None
        self.client_ctx: ssl.SSLContext | None = None
        self.rotations = 0
        self.installed_at = 0.0
        self._pending: ec.EllipticCurvePrivateKey | None = None
        self.listeners: list[Callable[[], None]] = []

    def csr(self, mesh: str, service: str, tags: dict[str, str]) -> str:
        """A fresh key (held until its certificate arrives) and its CSR."""
        from runtime.identity import make_csr, new_private_key

        self._pending = new_private_key()
        return make_csr(self._pending, mesh, service, tags)

    def install(self, cert_pem: str, ca_pem: str) -> bool:
        """Adopt the certificate issued for the last CSR; False if it does not match that key."""
        from cryptography.hazmat.primitives.asymmetric import ec

        from runtime.identity import Identity, client_context, server_context

        key = self._pending
        if key is None:
            return False
        ident = Identity(key, cert_pem, ca_pem)
        pub = ident.certificate.public_key()
        mine = key.public_key().public_numbers()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != mine:
            _warn("the control plane returned a certificate for another key; ignoring it")
            return False
        server, client = server_context(ident), client_context(ident)
        # One reference each: a connection made after this line uses the new certificate.
        self.identity, self.server_ctx, self.client_ctx = ident, server, client
        self.installed_at = time.time()
        self._pending = None
        self.rotations += 1
        for fn in self.listeners:
            fn()
        return True

    @property
    def valid(self) -> bool:
        ident = self.identity
        return ident is not None and ident.not_after() > dt.datetime.now(dt.UTC)

    def renew_at(self) -> float | None:
        """Unix time at 2/3 of the certificate's lifetime, when it is renewed."""
        ident = self.identity
        if ident is None:
            return None
        # From when it arrived, not from notBefore: the CA back-dates that for clock skew.
        start, end = self.installed_at, ident.not_after().timestamp()
        return start + max(end - start, 0.0) * 2.0 / 3.0

    def describe(self) -> dict[str, Any] | None:
        """For ``GET /config``: the certificate's serial, subject URIs and validity (no key)."""
        ident = self.identity
        if ident is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        from runtime.identity import peer_identity

        peer = peer_identity(ident.certificate.public_bytes(Encoding.DER))
        return {
            "serial": format(ident.serial, "x"),
            "service": peer.service if peer else None,
            "mesh": peer.mesh if peer else None,
            "tags": peer.tags if peer else {},
            "not_before": ident.not_before().isoformat(),
            "not_after": ident.not_after().isoformat(),
            "rotations": self.rotations,
        }


class PeerCache:
    """Peer certificate (DER) -> identity, parsed once per certificate."""

    def __init__(self) -> None:
        self._cache: dict[bytes, PeerIdentity | None] = {}

    def of(self, transport: Any) -> tuple[bool, PeerIdentity | None]:
        """(is TLS, the peer's identity) of a connection's transport."""
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        if sslobj is None:
            return False, None
        der = sslobj.getpeercert(binary_form=True)
        if not der:
            return True, None
        hit = self._cache.get(der, _MISSING)
        if hit is _MISSING:
            from runtime.identity import peer_identity

            try:
                hit = peer_identity(der)
            except ValueError:
                hit = None
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[der] = hit
        return True, hit


_MISSING: Any = object()


def wrong_peer(peers: PeerCache, transport: Any, service: str) -> str | None:
    """Why an mTLS connection to an endpoint of ``service`` is not one (None: it is). The client
    side checks the server's SPIFFE identity as Envoy does in Kuma, so an address taken over by
    another workload of the mesh does not receive that service's traffic."""
    _, peer = peers.of(transport)
    if peer is None:
        return f"the peer presented no mesh identity (expected {service})"
    if peer.service != service:
        return f"the peer is {peer.service}, not {service}"
    return None


# --- pushes ----------------------------------------------------------------------------------


class PushTrust:
    """Which control plane key pushes must be signed with; pinned once known."""

    def __init__(self, state_dir: Path | None, trust_key: str | None = None, insecure: bool = False) -> None:
        self.insecure = insecure
        self._path = state_dir / TRUST_KEY_FILE if state_dir is not None else None
        self.pinned_by_flag = trust_key is not None
        self.key: str | None = _normal_key(trust_key) if trust_key else None
        if self.key is None and self._path is not None:
            with contextlib.suppress(OSError):
                stored = self._path.read_text().strip()
                self.key = _normal_key(stored)
                if self.key is None:
                    _warn(f"ignoring {self._path}: not an Ed25519 public key in hex")

    def adopt(self, key_hex: str | None) -> bool:
        """The key a registration returned: trusted when none is yet, else it must be the same."""
        key = _normal_key(key_hex) if key_hex else None
        if key is None:
            return self.key is not None
        if self.key is None:
            self.key = key
            if self._path is not None:
                try:
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
                    tmp.write_text(key + "\n")
                    os.replace(tmp, self._path)
                except OSError as e:
                    _warn(f"cannot keep the control plane key in {self._path}: {e}")
            return True
        if key != self.key:
            where = f"remove {self._path} to trust another" if self._path and not self.pinned_by_flag else ""
            _warn(
                "the control plane answered with another signing key than the one trusted; "
                f"its pushes will be refused ({where or 'check --trust-key'})"
            )
            return False
        return True

    def check(
        self, signature: str | None, target: PushTarget | None, slot: str, digest: str, generation: int
    ) -> str | None:
        """None when the push may be applied, else the NACK reason. ``target`` is who this data
        plane is in this boot; None while it has not registered in this boot (nothing is accepted
        then: a push signed for an earlier boot or another instance must not fill a fresh one)."""
        if self.insecure:
            return None
        if self.key is None:
            return (
                "no control plane key is trusted yet: pushes are refused until this data plane has "
                "registered (or runs with --trust-key or --insecure-admin)"
            )
        if target is None:
            return "not registered with the control plane in this boot yet: pushes are refused until it is"
        if not signature:
            return "unsigned push: X-Meshc-Signature is required"
        from runtime.identity import verify_push

        if not verify_push(self.key, signature.strip(), target, slot, digest, generation):
            return (
                f"signature does not verify for this data plane (mesh {target.mesh!r}, service "
                f"{target.service!r}, instance {target.instance!r}, this boot, {slot} generation "
                f"{generation}): forged, replayed from another boot, or signed for another data plane"
            )
        return None


def _normal_key(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        return None
    return v


# --- inbound listener ------------------------------------------------------------------------


@dataclass
class _Mode:
    enabled: bool
    strict: bool


def mtls_mode(mtls: Mtls | None) -> _Mode:
    if mtls is None or not mtls.enabled:
        return _Mode(False, False)
    return _Mode(True, mtls.mode == "STRICT")


class MtlsListener:
    """Accepts on ``sock``; per connection: plaintext or TLS by the first byte, by the Mesh's mode.

    ``factory`` makes the HTTP (or TCP) protocol the connection is handed to;
    ``current_mtls`` returns the running Mesh bundle's ``mtls``; ``creds`` the identity.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        current_mtls: Callable[[], Mtls | None],
        creds: Credentials,
        count: Callable[[str, str], None],
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.current_mtls = current_mtls
        self.creds = creds
        self.count = count
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.transports: set[asyncio.BaseTransport] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and friends: do not spin
                _warn(f"inbound accept failed: {e}")
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = mtls_mode(self.current_mtls())
            if not mode.enabled:
                await self._hand_over(conn, None, "plaintext")
                continue
            task = asyncio.ensure_future(self._classify(conn, mode))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _classify(self, conn: socket.socket, mode: _Mode) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(_peek(loop, conn), _FIRST_BYTE_TIMEOUT_S)
        except (OSError, TimeoutError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        if first[0] != _TLS_RECORD_HANDSHAKE:
            if mode.strict:
                self.count("plaintext", "refused")
                with contextlib.suppress(OSError):
                    conn.send(_STRICT_REFUSAL)
                conn.close()
                return
            await self._hand_over(conn, None, "plaintext")
            return
        ctx = self.creds.server_ctx
        if ctx is None:
            self.count("mtls", "no_certificate")
            conn.close()
            return
        await self._hand_over(conn, ctx, "mtls")

    async def _hand_over(self, conn: socket.socket, ctx: ssl.SSLContext | None, tls: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            if ctx is None:
                transport, _ = await loop.connect_accepted_socket(self.factory, conn)
            else:
                transport, _ = await loop.connect_accepted_socket(
                    self.factory,
                    conn,
                    ssl=ctx,
                    ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S,
                )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            self.count(tls, "handshake_failed")
            if os.environ.get("MESHC_DEBUG_TLS"):
                _warn(f"inbound {tls} handshake failed: {e}")
            with contextlib.suppress(OSError):
                conn.close()
            return
        self.count(tls, "accepted")
        del transport

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._pending):
            t.cancel()
        with contextlib.suppress(OSError):
            self.sock.close()


_STRICT_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nx-meshc-denied: mTLS is STRICT: plaintext refused\r\n"
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte of ``conn`` without consuming it."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        fut: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
