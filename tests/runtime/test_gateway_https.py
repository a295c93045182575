"""HTTPS at the gateway: TLS terminated with certificates from files (a test CA made here), SNI
per hostname, HTTP/2 or HTTP/1.1 by ALPN, and a certificate replaced on disk without dropping
the connections already open. Real gateway processes, real curl and Python TLS clients."""

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
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        os.replace(tmp, path)
        return serial


def _gateway(
    plane: Callable[..., Plane], tmp_path: Path, app: str, certs: tuple[Path, ...]
) -> tuple[str, int]:
    rules = (
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/")),),
            backends=(GatewayBackend(weight=1, service="magnanimo"),),
        ),
    )
    listener = GatewayListener(
        port=8443, protocol="HTTPS", rules=rules, certificates=tuple(str(c) for c in certs)
    )
    bundle = service_bundle("edge", gateway=GatewayConf(listeners=(listener,)))
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"magnanimo": [(app, {})]}).model_dump_json())
    gw = plane(
        "--bundle", write_bundle(tmp_path, bundle), "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--endpoints", eps, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        module="runtime.gateway",
    )  # fmt: skip
    host, _, port = gw.listening["listener:8443"].rpartition(":")
    return host, int(port)


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
    _, port = _gateway(plane, tmp_path, app.address, (a, b))
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
    assert _serial(ca, "a.example", port) == second
