"""Data plane identity (DESIGN §6): a private key that never leaves the process, a CSR for the
control plane's CA, TLS 1.3 contexts for mutual TLS, and the peer identity read from a
certificate's URI SANs (``spiffe://<mesh>/<service>`` and ``kuma://<tag>/<value>``).

Signed pushes are checked here too: the control plane signs (digest, generation, target service)
with Ed25519 and a data plane accepts only what verifies against the key it got at bootstrap.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from runtime.protocol import (
    HDR_CLIENT_CERT,
    HDR_PROOF,
    PushTarget,
    auth_message,
    push_message,
    spiffe_uri,
    tag_uri,
)

if TYPE_CHECKING:
    # x509 (about 2 MB resident) loads with the first certificate, so a sidecar without mTLS
    # never pays for it; verifying signed pushes needs only ed25519.
    from cryptography import x509

__all__ = [
    "Identity",
    "PeerIdentity",
    "client_context",
    "make_csr",
    "new_private_key",
    "peer_identity",
    "server_context",
    "verify_push",
]


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, mesh: str, service: str, tags: dict[str, str]) -> str:
    """A CSR naming the identity the data plane asks for; the CA decides what it gets."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    uris = [x509.UniformResourceIdentifier(spiffe_uri(mesh, service))]
    uris += [x509.UniformResourceIdentifier(tag_uri(k, v)) for k, v in sorted(tags.items())]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
        .add_extension(x509.SubjectAlternativeName(uris), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class PeerIdentity:
    mesh: str
    service: str
    tags: dict[str, str] = field(default_factory=dict)


def identity_from_uris(uris: list[str]) -> PeerIdentity | None:
    mesh = service = None
    tags: dict[str, str] = {}
    for u in uris:
        if u.startswith("spiffe://"):
            rest = u[len("spiffe://") :]
            if "/" in rest:
                mesh, service = rest.split("/", 1)
        elif u.startswith("kuma://"):
            rest = u[len("kuma://") :]
            if "/" in rest:
                # The tag name may contain '/', e.g. kuma.io/service: the value is the last segment.
                name, value = rest.rsplit("/", 1)
                tags[unquote(name)] = unquote(value)
    if mesh is None or service is None:
        return None
    tags.setdefault("kuma.io/service", service)
    return PeerIdentity(mesh, service, tags)


def peer_identity(der: bytes | None) -> PeerIdentity | None:
    """The identity in a peer certificate (``SSLObject.getpeercert(binary_form=True)``)."""
    if not der:
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return identity_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass
class Identity:
    """A data plane's key and current certificate chain, loadable into SSL contexts."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: str
    ca_pem: str
    _cert: x509.Certificate | None = field(default=None, repr=False, compare=False)

    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def certificate(self) -> x509.Certificate:
        cert = self._cert
        if cert is None:
            from cryptography import x509

            cert = self._cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        return cert

    @property
    def serial(self) -> int:
        return int(self.certificate.serial_number)

    def _load(self, ctx: ssl.SSLContext) -> None:
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # ssl only loads a key from a file: an anonymous memory file (memfd) keeps it off disk.
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and Path("/proc/self/fd").is_dir():
            kfd, cfd = memfd("meshc-key", os.MFD_CLOEXEC), memfd("meshc-cert", os.MFD_CLOEXEC)
            try:
                os.write(kfd, key_pem)
                os.write(cfd, self.cert_pem.encode())
                ctx.load_cert_chain(f"/proc/self/fd/{cfd}", f"/proc/self/fd/{kfd}")
            finally:
                os.close(kfd)
                os.close(cfd)
        else:  # pragma: no cover - not Linux: a private temp dir, removed at once
            with tempfile.TemporaryDirectory(prefix="meshc-id-") as d:
                cert_path, key_path = Path(d) / "cert.pem", Path(d) / "key.pem"
                key_path.touch(mode=0o600)
                key_path.write_bytes(key_pem)
                cert_path.write_text(self.cert_pem)
                ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(cadata=self.ca_pem)

    def proof_headers(self, path: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """Headers that authenticate a control-plane call with this certificate (DESIGN §6)."""
        ts = int(time.time() if now is None else now)
        msg = auth_message(ts, path, hashlib.sha256(body).hexdigest())
        sig = self.key.sign(msg, ec.ECDSA(hashes.SHA256()))
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return {HDR_CLIENT_CERT: base64.b64encode(der).decode(), HDR_PROOF: f"{ts}.{sig.hex()}"}


def server_context(identity: Identity, require_client_cert: bool = True) -> ssl.SSLContext:
    """TLS 1.3 only; STRICT requires a client certificate from the mesh CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # HTTP/2 between data planes when the caller offers it; a caller offering nothing (or only
    # http/1.1) gets HTTP/1.1 as before. The listener reads the choice (runtime.h2proxy).
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    identity._load(ctx)
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """Mesh peers are verified by CA and SPIFFE identity, not by hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    identity._load(ctx)
    return ctx


def verify_push(
    public_key_hex: str, signature_hex: str, target: PushTarget, slot: str, digest: str, generation: int
) -> bool:
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), push_message(target, slot, digest, generation))
    except (ValueError, InvalidSignature):
        return False
    return True
