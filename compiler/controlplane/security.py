"""The control plane's side of DESIGN §6: mesh CAs, authenticated registration, certificates,
signed pushes.

* One CA per mesh, as the running Mesh bundle's ``mtls`` says: ``builtin`` (generated in the state
  dir, key mode 0600) or ``provided`` (the Mesh's backend ``conf.cert.file`` / ``conf.key.file``,
  read from the control plane's file system; relative paths from its working directory). With
  mTLS off a mesh still gets certificates from its builtin CA, so turning mTLS on later needs no
  re-registration. A switch of backend is followed by the data planes: they renew at once when
  their mesh bundle names another backend, and the CA certificates this process used before stay
  in the trust bundle it hands out, so old and new certificates meet during the switch.
* Registration, heartbeats, renewal and deregistration are authenticated: the bootstrap token
  bound to a mesh, a service and an expiry (``Authorization: Bearer``; ``meshc token --mesh M
  --service NAME``) or the data plane's current
  certificate (``X-Meshc-Client-Cert`` + ``X-Meshc-Proof``, a signature by the certificate's key
  over the call's path, body digest and time). Either one names the service; the certificate
  issued takes its identity from that service and the registration's tags, never from the CSR.
  An instance name registered by one service cannot be taken over by another.
* Every push is signed (Ed25519) over (mesh, service, instance, boot id, slot, digest, generation),
  ``runtime.protocol.push_message``; the public key goes to data planes in the registration reply.
  A registration into a mesh the current release does not declare is refused (404).

No key, token or secret is ever logged: errors name files, never their content.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from compiler.ca import CAError, MeshCA, PushSigner, TokenIssuer
from compiler.controlplane.config import Config
from compiler.controlplane.registry import Registry
from compiler.controlplane.release import ReleaseState
from runtime.protocol import (
    HDR_CLIENT_CERT,
    HDR_PROOF,
    CertificateReply,
    CertificateRequest,
    PushTarget,
    Registration,
    auth_message,
    spiffe_uri,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["AuthError", "Host", "Security"]

_PROOF_WINDOW_S = 300
_DEFAULT_TTL_MS = 86_400_000
_MAX_OLD_CAS = 2


class AuthError(Exception):
    """A control-plane call is refused: ``status`` (401, 403, 400, 503) and a reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Backend:
    enabled: bool
    name: str | None
    type: str
    ttl_ms: int


class Host(Protocol):
    """What ``Security`` reads of the control plane (``server.ControlPlane`` is one): typed by
    shape, so this module does not import the server that imports it."""

    @property
    def config(self) -> Config: ...

    @property
    def releases(self) -> ReleaseState: ...

    @property
    def registry(self) -> Registry: ...

    def log(self, msg: str) -> None: ...


class Security:
    def __init__(self, cp: Host, state_dir: Path | None, *, require_auth: bool = True) -> None:
        self._cp = cp
        self._tmp: Path | None = None
        if state_dir is None:  # in-process use without a state dir: keys live for this process only
            self._tmp = Path(tempfile.mkdtemp(prefix="meshc-cp-"))
            state_dir = self._tmp
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.require_auth = require_auth
        self.tokens = TokenIssuer(state_dir)
        self.signer = PushSigner(state_dir)
        self._cas: dict[str, tuple[tuple[Any, ...], MeshCA]] = {}
        self._old: dict[str, list[str]] = {}
        self._mesh_cache: dict[str, tuple[str, _Backend]] = {}

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def shared_meta(self) -> dict[str, str]:
        """What every replica must share, named without a secret: the signing key's public half
        and the token secret's id (``store.check_security`` compares them)."""
        return {"push_signing_public_key": self.public_key_hex, "token_secret_id": self.tokens.secret_id}

    def loaded_cas(self) -> dict[str, str]:
        """mesh -> the certificate of the CA this process uses (metadata for the store)."""
        return {mesh: ca.cert_pem for mesh, (_, ca) in self._cas.items()}

    # --- pushes -------------------------------------------------------------------------------

    @property
    def public_key_hex(self) -> str:
        return self.signer.public_key_hex

    def sign(self, target: PushTarget, slot: str, digest: str, generation: int) -> str:
        return self.signer.sign(target, slot, digest, generation)

    # --- the Mesh's mTLS backend ------------------------------------------------------------

    def backend(self, mesh: str) -> _Backend:
        rel = self._cp.releases.current
        data = rel.bundles.get(mesh) if rel is not None else None
        if data is None:  # no release yet (or no such mesh): the builtin CA, default lifetime
            return _Backend(False, None, "builtin", _DEFAULT_TTL_MS)
        digest = rel.digests.get(mesh, "") if rel is not None else ""
        hit = self._mesh_cache.get(mesh)
        if hit is not None and hit[0] == digest:
            return hit[1]
        mtls = json.loads(data).get("mtls") or {}
        be = _Backend(
            bool(mtls.get("enabled")),
            mtls.get("backend"),
            mtls.get("backend_type") or "builtin",
            int(mtls.get("cert_rotation_ms") or _DEFAULT_TTL_MS),
        )
        self._mesh_cache[mesh] = (digest, be)
        return be

    def ca(self, mesh: str) -> MeshCA:
        be = self.backend(mesh)
        if not be.enabled or be.type == "builtin":
            conf: tuple[Any, ...] = ("builtin",)
        else:
            cert_file, key_file = self._provided_files(mesh, be.name)
            conf = ("provided", str(cert_file), str(key_file), _mtime(cert_file), _mtime(key_file))
        hit = self._cas.get(mesh)
        if hit is not None and hit[0] == conf:
            return hit[1]
        if not _safe_name(mesh):
            raise AuthError(400, f"mesh name {mesh!r} cannot name a CA")
        try:
            if conf[0] == "builtin":
                ca = MeshCA.builtin(self.state_dir, mesh)
            else:
                ca = MeshCA.provided(Path(conf[1]), Path(conf[2]), mesh)
        except CAError as e:
            raise AuthError(503, f"the CA of mesh {mesh!r} cannot be loaded: {e}") from e
        if hit is not None and hit[1].cert_pem != ca.cert_pem:
            old = self._old.setdefault(mesh, [])
            old.insert(0, hit[1].cert_pem)
            del old[_MAX_OLD_CAS:]
        self._cas[mesh] = (conf, ca)
        self._cp.log(f"mesh {mesh}: CA {conf[0]} ({ca.cert.subject.rfc4514_string()})")
        return ca

    def trust_bundle(self, mesh: str) -> str:
        ca = self.ca(mesh)
        return "".join([ca.cert_pem, *self._old.get(mesh, [])])

    def _provided_files(self, mesh: str, backend: str | None) -> tuple[Path, Path]:
        """The provided backend's cert and key files, from the Mesh document of the release."""
        from compiler.pipeline import parse_file
        from compiler.source import SourceError, read_policy_dir

        cfg = self._cp.config
        rel = self._cp.releases.current
        try:
            src = read_policy_dir(cfg.policy_dir, rel.commit if rel and rel.commit else cfg.ref)
        except SourceError as e:
            raise AuthError(503, f"cannot read the Mesh {mesh!r} for its CA files: {e}") from e
        for f in src.files:
            if b"Mesh" not in f.data:
                continue
            for doc in parse_file(f).docs:
                if doc.kind != "Mesh" or doc.name != mesh or doc.spec.mtls is None:
                    continue
                for be in doc.spec.mtls.backends:
                    if be.name != backend:
                        continue
                    conf = be.conf
                    cert = (conf.cert if conf else None) or {}
                    key = (conf.key if conf else None) or {}
                    if not isinstance(cert.get("file"), str) or not isinstance(key.get("file"), str):
                        raise AuthError(
                            503,
                            f"Mesh {mesh!r} backend {backend!r}: a provided CA needs conf.cert.file and "
                            "conf.key.file (files on the control plane; a key never goes into Git)",
                        )
                    return Path(cert["file"]).expanduser(), Path(key["file"]).expanduser()
        raise AuthError(503, f"Mesh {mesh!r} backend {backend!r} not found in the policies")

    # --- authentication -----------------------------------------------------------------------

    def authenticate(
        self, headers: Mapping[str, str], path: str, body: bytes, service: str, mesh: str
    ) -> str:
        """How the caller proved it is ``service`` of ``mesh`` ("token", "certificate", "open");
        raise ``AuthError`` when it did not."""
        if not self.require_auth:
            return "open"
        cert_error = None
        if headers.get(HDR_CLIENT_CERT) and headers.get(HDR_PROOF):
            try:
                self._check_certificate(headers, path, body, service, mesh)
                return "certificate"
            except AuthError as e:
                cert_error = e.reason
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :].strip()
            refused = self.tokens.refusal(token, mesh, service)
            if refused is None:
                return "token"
            raise AuthError(
                403, f"the bootstrap token does not admit service {service!r} of mesh {mesh!r}: {refused}"
            )
        if cert_error is not None:
            raise AuthError(403, cert_error)
        raise AuthError(
            401,
            "authentication required: a bootstrap token (Authorization: Bearer; `meshc token --mesh "
            f"{mesh} --service {service}`) or the current certificate",
        )

    def _check_certificate(
        self, headers: Mapping[str, str], path: str, body: bytes, service: str, mesh: str
    ) -> None:
        try:
            der = base64.b64decode(headers[HDR_CLIENT_CERT], validate=True)
            cert = x509.load_der_x509_certificate(der)
            ts_text, sig_hex = headers[HDR_PROOF].split(".", 1)
            ts, sig = int(ts_text), bytes.fromhex(sig_hex)
        except (ValueError, binascii.Error) as e:
            raise AuthError(400, f"unreadable certificate proof: {e}") from e
        now = time.time()
        if abs(now - ts) > _PROOF_WINDOW_S:
            raise AuthError(403, "certificate proof is too old or from the future (clock skew?)")
        issuers = [self.ca(mesh).cert] + [
            x509.load_pem_x509_certificate(p.encode()) for p in self._old.get(mesh, [])
        ]
        for issuer in issuers:
            try:
                cert.verify_directly_issued_by(issuer)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise AuthError(403, "the certificate is not issued by this mesh's CA")
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise AuthError(403, "the certificate has expired")
        if _spiffe_id(cert) != spiffe_uri(mesh, service):
            raise AuthError(403, f"the certificate does not name service {service!r} of mesh {mesh!r}")
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise AuthError(403, "the certificate's key is not an EC key")
        try:
            pub.verify(
                sig, auth_message(ts, path, hashlib.sha256(body).hexdigest()), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature as e:
            raise AuthError(403, "the certificate proof does not verify") from e

    def authorize_registration(
        self, headers: Mapping[str, str], path: str, body: bytes, reg: Registration
    ) -> str:
        rel = self._cp.releases.current
        if rel is not None and reg.mesh not in rel.digests:
            declared = sorted(k for k in rel.digests if "/" not in k)
            raise AuthError(
                404,
                f"mesh {reg.mesh!r} is not declared in the policies (release {rel.id} declares {declared})",
            )
        how = self.authenticate(headers, path, body, reg.service, reg.mesh)
        if reg.instance is not None:
            known = self._cp.registry.dataplanes.get(reg.instance)
            if known is not None and (known.service, known.mesh) != (reg.service, reg.mesh):
                raise AuthError(403, f"instance {reg.instance!r} belongs to another service")
        return how

    async def handle_certificate(self, request: web.Request) -> web.Response:
        """``POST /api/v1/certificate``: a renewal for a registered instance (DESIGN §6)."""
        body = await request.read()
        try:
            req = CertificateRequest.model_validate_json(body)
        except ValidationError as e:
            return _error(400, f"bad certificate request: {e.errors(include_url=False)}")
        dp = self._cp.registry.dataplanes.get(req.instance)
        if dp is None:
            return _error(404, f"unknown instance {req.instance!r}; register again")
        try:
            self.authenticate(request.headers, request.path, body, dp.service, dp.mesh)
            cert, bundle = self.issue(dp.mesh, dp.service, dp.tags, req.csr_pem)
        except AuthError as e:
            self._cp.log(f"certificate for {req.instance} refused: {e.reason}")
            return _error(e.status, e.reason)
        reply = CertificateReply(certificate_pem=cert, ca_pem=bundle, signing_key=self.public_key_hex)
        return web.Response(body=reply.model_dump_json().encode(), content_type="application/json")

    # --- certificates -------------------------------------------------------------------------

    def issue(self, mesh: str, service: str, tags: dict[str, str], csr_pem: str) -> tuple[str, str]:
        """(certificate, CA bundle) for an authenticated (service, tags); TTL from the Mesh."""
        be = self.backend(mesh)
        ca = self.ca(mesh)
        try:
            cert = ca.issue(csr_pem, service, tags, dt.timedelta(milliseconds=be.ttl_ms))
        except CAError as e:
            raise AuthError(400, str(e)) from e
        return cert, self.trust_bundle(mesh)

    def serial_of(self, cert_pem: str) -> str:
        with contextlib.suppress(ValueError):
            return format(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number, "x")
        return "?"


def _error(status: int, reason: str) -> web.Response:
    return web.Response(
        status=status, body=json.dumps({"error": reason}).encode(), content_type="application/json"
    )


def _spiffe_id(cert: x509.Certificate) -> str | None:
    """The certificate's ``spiffe://<mesh>/<service>`` URI SAN (the data plane's identity)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def _safe_name(mesh: str) -> bool:
    return bool(mesh) and not mesh.startswith(".") and all(c.isalnum() or c in "-_." for c in mesh)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
