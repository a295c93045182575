"""The mesh CA, bootstrap tokens and the push-signing key (DESIGN §6). Keys live in the control
plane's state dir (mode 0600) and never go into Git, bundles or logs.

* ``builtin`` backend: an ECDSA P-256 CA generated on first start and kept in the state dir.
* ``provided`` backend: a CA certificate and key loaded from files.

Data plane certificates are short-lived and name the service (``spiffe://<mesh>/<service>``) and
the instance's tags (``kuma://<tag>/<value>``): the CA takes the identity from the registration
(authenticated by a bootstrap token or the current certificate), never from the CSR's text.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.protocol import PushTarget, push_message, spiffe_uri, tag_uri

__all__ = ["CAError", "MeshCA", "PushSigner", "TokenIssuer"]


class CAError(Exception):
    """The CA cannot be loaded or cannot issue (bad CSR, unreadable provided files)."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _create_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` (mode 0600) unless it exists; whether this call created it.
    Atomic (a hard link of a complete temp file), so replicas sharing a secrets dir that start
    at once end up with one key, not one each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class MeshCA:
    mesh: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def builtin(cls, state_dir: Path, mesh: str, validity_days: int = 3650) -> MeshCA:
        """Load the mesh's CA from the state dir, generating it on first use."""
        key_path, cert_path = state_dir / f"ca-{mesh}.key", state_dir / f"ca-{mesh}.crt"
        if key_path.exists():
            # another process (a replica sharing this dir) may be writing the certificate
            deadline = time.monotonic() + 5.0
            while not cert_path.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        if key_path.exists() and cert_path.exists():
            return cls.provided(cert_path, key_path, mesh)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshc {mesh} CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{mesh}")]), False
            )
            .sign(key, hashes.SHA256())
        )
        if key_path.exists():
            _write_private(key_path, _pem_key(key))  # a key without its certificate: replaced
        elif not _create_private(key_path, _pem_key(key)):
            return cls.builtin(state_dir, mesh, validity_days)  # another process won: use its CA
        tmp = cert_path.with_name(f".{cert_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, cert_path)
        return cls(mesh, key, cert)

    @classmethod
    def provided(cls, cert_path: Path, key_path: Path, mesh: str) -> MeshCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise CAError(f"cannot load the CA from {cert_path} and {key_path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: the CA key must be an EC key")
        return cls(mesh, key, cert)

    def issue(self, csr_pem: str, service: str, tags: dict[str, str], ttl: dt.timedelta) -> str:
        """Sign a short-lived certificate for (service, tags); the CSR only supplies the key."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise CAError(f"not a CSR: {e}") from e
        if not csr.is_signature_valid:
            raise CAError("the CSR's signature does not verify")
        uris = [x509.UniformResourceIdentifier(spiffe_uri(self.mesh, service))]
        uris += [
            x509.UniformResourceIdentifier(tag_uri(k, v))
            for k, v in sorted(tags.items())
            if k != "kuma.io/service"
        ]
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                False,
            )
            .add_extension(x509.SubjectAlternativeName(uris), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class TokenIssuer:
    """Bootstrap tokens bound to one mesh, one service and an expiry, as Kuma's data plane tokens
    are: ``meshc1.<base64url JSON {mesh, service, exp}>.<hmac-sha256(secret, that JSON)>``.

    The control plane stores no token, only the secret; rotating ``token.secret`` revokes all."""

    PREFIX = "meshc1"
    DEFAULT_VALID_FOR_S = 30 * 86_400

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / "token.secret"
        if not path.exists():
            _create_private(path, secrets.token_bytes(32))
        self._secret = path.read_bytes()

    @property
    def secret_id(self) -> str:
        """Names the secret without revealing it (an HMAC of a constant): replicas compare it."""
        return hmac.new(self._secret, b"meshc token secret id", hashlib.sha256).hexdigest()[:32]

    def mint(self, mesh: str, service: str, valid_for_s: float = DEFAULT_VALID_FOR_S) -> str:
        claims = {"mesh": mesh, "service": service, "exp": int(time.time() + valid_for_s)}
        payload = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).decode().rstrip("=")
        return f"{self.PREFIX}.{payload}.{self._mac(payload)}"

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, f"{self.PREFIX}.{payload}".encode(), hashlib.sha256).hexdigest()

    def refusal(self, token: str, mesh: str, service: str, now: float | None = None) -> str | None:
        """None when ``token`` admits ``service`` of ``mesh`` now, else why not (no secret in it)."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != self.PREFIX:
            return "not a meshc1 bootstrap token (regenerate it: meshc token --mesh M --service S)"
        payload, mac = parts[1], parts[2]
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return "the bootstrap token's signature does not verify"
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            t_mesh, t_service, exp = str(claims["mesh"]), str(claims["service"]), float(claims["exp"])
        except (ValueError, KeyError, TypeError) as e:
            return f"unreadable bootstrap token claims: {type(e).__name__}"
        if (t_mesh, t_service) != (mesh, service):
            return f"the bootstrap token is for service {t_service!r} of mesh {t_mesh!r}"
        if (time.time() if now is None else now) > exp:
            return "the bootstrap token has expired"
        return None

    def check(self, token: str, mesh: str, service: str) -> bool:
        return self.refusal(token, mesh, service) is None


class PushSigner:
    """The control plane's Ed25519 key; data planes trust its public half from bootstrap."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / "push-signing.key"
        if not path.exists():
            _create_private(path, _pem_key(ed25519.Ed25519PrivateKey.generate()))
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CAError(f"{path}: not an Ed25519 key")
        self._key = key

    @property
    def public_key_hex(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def sign(self, target: PushTarget, slot: str, digest: str, generation: int) -> str:
        return self._key.sign(push_message(target, slot, digest, generation)).hex()

    def signed(self, target: PushTarget, slot: str, digest: str, generation: int, signature: str) -> bool:
        """Whether ``signature`` is this key's over that push (a set a data plane says it got)."""
        try:
            self._key.public_key().verify(
                bytes.fromhex(signature), push_message(target, slot, digest, generation)
            )
        except (ValueError, InvalidSignature):
            return False
        return True
