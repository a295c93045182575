"""The control plane's security layer in process: the provided CA backend, registration
authentication (token, certificate proof) and what it refuses. No sockets needed."""

from __future__ import annotations

import datetime as dt
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from compiler.ca import MeshCA
from compiler.controlplane.security import AuthError, Security
from runtime.bundle import MeshBundle, Mtls, bundle_bytes
from runtime.identity import Identity, make_csr, new_private_key, peer_identity
from runtime.protocol import Registration

PROVIDED_MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec:
  mtls:
    enabledBackend: ca-2
    backends:
      - name: ca-2
        type: provided
        dpCert: {{rotation: {{expiration: 2h}}}}
        conf:
          cert: {{file: {cert}}}
          key: {{file: {key}}}
"""


@dataclass
class _Release:
    bundles: dict[str, bytes]
    digests: dict[str, str]
    commit: str | None = None
    id: str = "r1"


@dataclass
class _Releases:
    current: _Release | None = None


@dataclass
class _Config:
    policy_dir: Path
    ref: str | None = None


@dataclass
class _Registry:
    dataplanes: dict[str, Any] = field(default_factory=dict)


@dataclass
class _CP:
    config: _Config
    releases: _Releases
    registry: _Registry = field(default_factory=_Registry)
    logged: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        self.logged.append(msg)


def _cp(tmp_path: Path, mtls: Mtls) -> _CP:
    mesh = MeshBundle(mesh="default", mtls=mtls, services={}, destinations={})
    data = bundle_bytes(mesh)
    rel = _Release({"default": data}, {"default": "d1"})
    return _CP(_Config(tmp_path / "policies"), _Releases(rel))


def _csr(service: str) -> tuple[Any, str]:
    """A key and a CSR that asks for another identity than ``service``: the CA ignores it."""
    key = new_private_key()
    return key, make_csr(key, "default", f"not-{service}", {"version": "forged"})


def test_provided_backend_issues_from_the_given_ca_with_the_mesh_ttl(tmp_path: Path) -> None:
    given = MeshCA.builtin(tmp_path / "pki", "default")  # stands in for an operator's CA files
    (tmp_path / "policies").mkdir()
    pki = tmp_path / "pki"
    (tmp_path / "policies" / "mesh.yaml").write_text(
        PROVIDED_MESH.format(cert=pki / "ca-default.crt", key=pki / "ca-default.key")
    )
    mtls = Mtls(enabled=True, backend="ca-2", backend_type="provided", cert_rotation_ms=7_200_000)
    cp = _cp(tmp_path, mtls)
    sec = Security(cp, tmp_path / "state")  # type: ignore[arg-type]
    _, csr = _csr("benigno")
    cert_pem, bundle = sec.issue("default", "benigno", {"version": "v1"}, csr)
    assert bundle == given.cert_pem
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cert.verify_directly_issued_by(given.cert)
    life = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=115) < life <= dt.timedelta(hours=2)
    # The identity comes from the authenticated registration, never from the CSR's text.
    peer = peer_identity(cert.public_bytes(Encoding.DER))
    assert peer is not None and (peer.service, peer.tags.get("version")) == ("benigno", "v1")
    assert not (tmp_path / "state" / "ca-default.key").exists()  # no builtin CA was made


def test_provided_backend_with_unreadable_files_refuses_clearly(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    missing = PROVIDED_MESH.format(cert="/nonexistent.crt", key="/nonexistent.key")
    (tmp_path / "policies" / "mesh.yaml").write_text(missing)
    cp = _cp(tmp_path, Mtls(enabled=True, backend="ca-2", backend_type="provided"))
    sec = Security(cp, tmp_path / "state")  # type: ignore[arg-type]
    with pytest.raises(AuthError) as e:
        sec.issue("default", "benigno", {}, _csr("benigno")[1])
    assert e.value.status == 503 and "/nonexistent.crt" in e.value.reason


def test_registration_needs_a_token_or_the_current_certificate(tmp_path: Path) -> None:
    cp = _cp(tmp_path, Mtls(enabled=True, backend="ca-1", backend_type="builtin", cert_rotation_ms=60_000))
    sec = Security(cp, tmp_path / "state")  # type: ignore[arg-type]
    assert stat.S_IMODE((tmp_path / "state" / "token.secret").stat().st_mode) == 0o600
    body = b'{"service": "benigno"}'
    path = "/api/v1/register"
    with pytest.raises(AuthError) as e:
        sec.authenticate({}, path, body, "benigno", "default")
    assert e.value.status == 401
    token = sec.tokens.mint("default", "benigno")
    assert sec.authenticate({"Authorization": f"Bearer {token}"}, path, body, "benigno", "default") == "token"
    with pytest.raises(AuthError) as e:  # a token is for one service only
        sec.authenticate({"Authorization": f"Bearer {token}"}, path, body, "magnanimo", "default")
    assert e.value.status == 403 and token not in e.value.reason
    with pytest.raises(AuthError) as e:  # ... of one mesh only
        sec.authenticate({"Authorization": f"Bearer {token}"}, path, body, "benigno", "other")
    assert e.value.status == 403 and "mesh 'default'" in e.value.reason
    old_token = sec.tokens.mint("default", "benigno", valid_for_s=-1)
    with pytest.raises(AuthError, match="expired"):
        sec.authenticate({"Authorization": f"Bearer {old_token}"}, path, body, "benigno", "default")

    key, csr = _csr("benigno")
    cert, ca = sec.issue("default", "benigno", {"version": "v1"}, csr)
    ident = Identity(key, cert, ca)
    proof = ident.proof_headers(path, body)
    assert sec.authenticate(proof, path, body, "benigno", "default") == "certificate"
    for headers, service, why in (
        (proof, "magnanimo", "does not name service"),  # a certificate names one service
        (ident.proof_headers(path, b"other body"), "benigno", "does not verify"),  # bound to the body
        (ident.proof_headers(path, body, now=0), "benigno", "too old"),  # and to the time
    ):
        with pytest.raises(AuthError) as e:
            sec.authenticate(headers, path, body, service, "default")
        assert why in e.value.reason
    # A certificate from another CA, or one that expired, does not authenticate.
    other = MeshCA.builtin(tmp_path / "other", "default")
    k2, csr2 = _csr("benigno")
    stranger = Identity(k2, other.issue(csr2, "benigno", {}, dt.timedelta(hours=1)), other.cert_pem)
    with pytest.raises(AuthError, match="not issued by this mesh's CA"):
        sec.authenticate(stranger.proof_headers(path, body), path, body, "benigno", "default")
    k3, csr3 = _csr("benigno")
    ca_obj = MeshCA.builtin(tmp_path / "state", "default")
    expired = Identity(k3, ca_obj.issue(csr3, "benigno", {}, dt.timedelta(seconds=-30)), ca)
    with pytest.raises(AuthError, match="expired"):
        sec.authenticate(expired.proof_headers(path, body), path, body, "benigno", "default")


def test_an_instance_name_cannot_be_taken_over_by_another_service(tmp_path: Path) -> None:
    cp = _cp(tmp_path, Mtls())
    sec = Security(cp, tmp_path / "state")  # type: ignore[arg-type]

    @dataclass
    class _DP:
        service: str
        mesh: str = "default"

    cp.registry.dataplanes["benigno-1"] = _DP("benigno")
    reg = Registration(service="magnanimo", admin_address="127.0.0.1:1", instance="benigno-1")
    body = json.dumps(reg.model_dump()).encode()
    token = {"Authorization": f"Bearer {sec.tokens.mint('default', 'magnanimo')}"}
    with pytest.raises(AuthError, match="belongs to another service"):
        sec.authorize_registration(token, "/api/v1/register", body, reg)


def test_registration_into_an_undeclared_mesh_is_refused_with_404(tmp_path: Path) -> None:
    sec = Security(_cp(tmp_path, Mtls()), tmp_path / "state")  # type: ignore[arg-type]
    reg = Registration(service="magnanimo", admin_address="127.0.0.1:1", mesh="nowhere")
    body = json.dumps(reg.model_dump()).encode()
    token = {"Authorization": f"Bearer {sec.tokens.mint('nowhere', 'magnanimo')}"}
    with pytest.raises(AuthError) as e:
        sec.authorize_registration(token, "/api/v1/register", body, reg)
    assert e.value.status == 404 and "'nowhere' is not declared" in e.value.reason


def test_admin_api_refuses_a_non_loopback_address_unless_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import sidecar_main

    assert sidecar_main(["--service", "benigno", "--admin", "0.0.0.0:0", "--insecure-admin"]) == 2
    assert "--admin-allow-remote" in capsys.readouterr().err
