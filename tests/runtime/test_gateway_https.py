"""HTTPS at the gateway: TLS terminated with certificates from files or mounted Secrets (a test
CA made here), SNI per hostname, HTTP/2 or HTTP/1.1 by ALPN, and a certificate replaced on disk
(a file renamed over, or a Secret updated by the kubelet's atomic ``..data`` symlink swap, done
here the same way) without dropping the connections already open. Real gateway processes, real
curl and Python TLS clients."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from runtime_harness import (
    HANG_DEADLINE,
    Plane,
    endpoint_set,
    mesh_bundle,
    service_bundle,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    GatewayBackend,
    GatewayCertificate,
    GatewayConf,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    StringMatch,
)

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (scripts/ensure-system-deps.sh)"
)


class LocalCA:
    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshc test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, path: Path, *names: str) -> int:
        """Write a certificate for ``names`` and its key to ``path`` (atomically); its serial."""
        cert, key, serial = self.pair(*names)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cert + key)
        os.replace(tmp, path)
        return serial

    def pair(self, *names: str) -> tuple[bytes, bytes, int]:
        """A certificate for ``names`` and its key (PEM, as a Secret's tls.crt and tls.key); its serial."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def _port(gw: Plane) -> int:
    return int(gw.listening["listener:8443"].rpartition(":")[2])


def _gateway(
    plane: Callable[..., Plane],
    tmp_path: Path,
    app: str,
    certs: tuple[Path | GatewayCertificate, ...],
    *extra: str | Path,
) -> Plane:
    rules = (
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/")),),
            backends=(GatewayBackend(weight=1, service="magnanimo"),),
        ),
    )
    listener = GatewayListener(
        port=8443,
        protocol="HTTPS",
        rules=rules,
        certificates=tuple(c if isinstance(c, GatewayCertificate) else str(c) for c in certs),
    )
    bundle = service_bundle("edge", gateway=GatewayConf(listeners=(listener,)))
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"magnanimo": [(app, {})]}).model_dump_json())
    gw = plane(
        "--bundle", write_bundle(tmp_path, bundle), "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--endpoints", eps, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *extra,
        module="runtime.gateway",
    )  # fmt: skip
    return gw


def _curl(ca: LocalCA, name: str, port: int, *args: str) -> tuple[str, str]:
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca.path), "--resolve", f"{name}:{port}:127.0.0.1",
         "-w", "\n%{http_version}", *args, f"https://{name}:{port}/hello"],
        capture_output=True, text=True, timeout=HANG_DEADLINE, check=True,
    )  # fmt: skip
    body, _, version = out.stdout.rpartition("\n")
    return body, version


def _serial(ca: LocalCA, name: str, port: int) -> int:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=HANG_DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def test_https_listener_with_sni_alpn_and_reload(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    ca = LocalCA(tmp_path)
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    first = ca.leaf(a, "a.example")
    ca.leaf(b, "b.example", "*.wild.example")
    app = upstream("magnanimo")
    gw = _gateway(plane, tmp_path, app.address, (a, b))
    port = _port(gw)
    body, version = _curl(ca, "a.example", port)
    assert version == "2" and json.loads(body)["name"] == "magnanimo"  # HTTP/2 by ALPN
    body, version = _curl(ca, "a.example", port, "--http1.1")
    assert version == "1.1" and json.loads(body)["path"] == "/hello"
    # SNI picks the certificate (curl verifies the name against it): exact and wildcard names.
    assert json.loads(_curl(ca, "b.example", port)[0])["name"] == "magnanimo"
    assert json.loads(_curl(ca, "x.wild.example", port)[0])["name"] == "magnanimo"
    # A connection opened now, then the certificate replaced on disk.
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.check_hostname = False  # names are checked by _serial; this one only keeps a connection
    kept = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=HANG_DEADLINE)
    kept.request("GET", "/before", headers={"Host": "a.example"})
    assert kept.getresponse().read() and _serial(ca, "a.example", port) == first
    second = ca.leaf(a, "a.example")
    wait_until(lambda: _serial(ca, "a.example", port) == second, "new handshakes to get the new certificate")
    kept.request("GET", "/after", headers={"Host": "a.example"})  # the old connection was not dropped
    resp = kept.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["path"] == "/after"
    kept.close()
    # A broken file is not taken: the last good certificate stays.
    a.write_text("not a certificate")
    wait_until(lambda: f"{a} not reloaded" in gw.stderr(), "the broken file to be logged")
    assert _serial(ca, "a.example", port) == second


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret volume (its AtomicWriter): the files in
    a timestamped dir, ``..data`` a symlink to it, each key a symlink through ``..data``. An update
    writes a new timestamped dir, renames a new ``..data`` link over the old one (the atomic step)
    and removes the old dir."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self._n = 0

    def update(self, files: dict[str, bytes]) -> None:
        self._n += 1
        old = os.readlink(self.dir / "..data") if (self.dir / "..data").is_symlink() else None
        ts = f"..2026_12_03_12_00_00.{self._n:09d}"
        (self.dir / ts).mkdir()
        for key, data in files.items():
            (self.dir / ts / key).write_bytes(data)
        os.symlink(ts, self.dir / "..data_tmp")
        os.replace(self.dir / "..data_tmp", self.dir / "..data")
        for key in files:
            if not (self.dir / key).is_symlink():
                os.symlink(f"..data/{key}", self.dir / key)
        if old is not None and (self.dir / old).is_dir():
            shutil.rmtree(self.dir / old)

    def tls(self, cert: bytes, key: bytes) -> None:
        self.update({"tls.crt": cert, "tls.key": key})


def test_https_certificates_from_secrets_rotated_by_the_kubelet_swap(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    ca = LocalCA(tmp_path)
    secrets = tmp_path / "secrets"
    a, b = SecretVolume(secrets, "edge-a"), SecretVolume(secrets, "edge.b")
    cert, key, first = ca.pair("a.example")
    a.tls(cert, key)
    cert_b, key_b, serial_b = ca.pair("b.example")
    b.tls(cert_b, key_b)
    app = upstream("magnanimo")
    gw = _gateway(
        plane, tmp_path, app.address,
        (GatewayCertificate(secret="edge-a"), GatewayCertificate(secret="edge.b")),
        "--tls-secrets-dir", secrets,
    )  # fmt: skip
    port = _port(gw)
    body, version = _curl(ca, "a.example", port)
    assert version == "2" and json.loads(body)["name"] == "magnanimo"
    body, version = _curl(ca, "b.example", port, "--http1.1")  # SNI picks the second Secret's
    assert version == "1.1" and json.loads(body)["path"] == "/hello"
    assert _serial(ca, "a.example", port) == first and _serial(ca, "b.example", port) == serial_b
    # A keep-alive connection opened now, then the Secret updated as the kubelet does.
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.check_hostname = False
    kept = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=HANG_DEADLINE)
    kept.request("GET", "/before", headers={"Host": "a.example"})
    assert kept.getresponse().read()
    cert, key, second = ca.pair("a.example")
    a.tls(cert, key)
    wait_until(lambda: _serial(ca, "a.example", port) == second, "new handshakes to get the rotated Secret")
    assert gw.event("certificates_reloaded") is not None
    kept.request("GET", "/after", headers={"Host": "a.example"})  # the open connection stays
    resp = kept.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["path"] == "/after"
    assert kept.sock is not None
    der = kept.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert der is not None and x509.load_der_x509_certificate(der).serial_number == first
    kept.close()
    assert _serial(ca, "b.example", port) == serial_b  # the other Secret was not touched
    # A bad update (a key that is not the certificate's) is logged and the last good one stays.
    cert, _, _ = ca.pair("a.example")
    a.tls(cert, ca.pair("a.example")[1])
    wait_until(
        lambda: "secret edge-a" in gw.stderr() and "not reloaded" in gw.stderr(), "the bad Secret logged"
    )
    assert _serial(ca, "a.example", port) == second
    # The Secret's files gone (its data dir removed): logged, still the last good certificate.
    shutil.rmtree(a.dir / os.readlink(a.dir / "..data"))
    wait_until(lambda: gw.stderr().count("secret edge-a") >= 2, "the missing Secret logged")
    assert _serial(ca, "a.example", port) == second
    assert gw.proc.poll() is None
    # A good update after the bad ones is taken.
    cert, key, third = ca.pair("a.example")
    a.tls(cert, key)
    wait_until(lambda: _serial(ca, "a.example", port) == third, "the repaired Secret to be served")


def test_a_secret_missing_at_start_is_logged_and_bound_once_mounted(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """No certificate yet: the gateway starts (never a crash loop), says which Secret and where it
    looked, and binds the listener once the Secret is there (the kubelet mounting it late)."""
    ca = LocalCA(tmp_path)
    app = upstream("magnanimo")
    gw = _gateway(
        plane, tmp_path, app.address, (GatewayCertificate(secret="late"),),
        "--tls-secrets-dir", tmp_path / "secrets",
    )  # fmt: skip
    assert "listener:8443" not in gw.listening
    wait_until(
        lambda: "gateway listener 8443 not bound until its certificates load: secret late (" in gw.stderr(),
        "the missing Secret to be logged",
    )
    assert "secrets/late/tls.crt is missing" in gw.stderr() and gw.proc.poll() is None
    cert, key, serial = ca.pair("a.example")
    SecretVolume(tmp_path / "secrets", "late").tls(cert, key)

    def bound() -> str | None:
        with gw._events_lock:
            return next((e["listener:8443"] for e in gw.events if "listener:8443" in e), None)

    port = int(wait_until(bound, "the listener to be bound once the Secret is there").rpartition(":")[2])
    assert _serial(ca, "a.example", port) == serial
    assert json.loads(_curl(ca, "a.example", port)[0])["name"] == "magnanimo"
    assert gw.stderr().count("not bound until its certificates load") == 1  # logged once, not every second
