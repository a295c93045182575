"""TLS termination for the gateway's ``HTTPS`` listeners: certificates from files or mounted
Secrets, SNI, reload.

One ``ssl.SSLContext`` per certificate: a PEM file holding the chain and its private key (a
MeshGateway's ``tls.certificates: [{file: PATH}]``), or a ``kubernetes.io/tls`` Secret
(``[{secret: NAME}]``) read from ``SECRETS_DIR/NAME/tls.crt`` and ``tls.key``, as a Secret volume
mounted at ``SECRETS_DIR/NAME`` lays it out. The listener's own context only dispatches: its SNI
callback (OpenSSL calls it for every ClientHello, with no name too) hands each handshake to the
current context whose certificate names the requested host (exact names first, then a ``*.``
wildcard one label deep), else to the first certificate's, so one port serves several
hostnames. Every context offers ``h2`` and ``http/1.1`` by ALPN (``runtime.h2proxy`` reads the
choice).

``reload`` notices a changed certificate by the identity of the files it reads (device, inode,
mtime, size, symlinks followed): a file rewritten or renamed over, and the kubelet's update of a
mounted Secret (new files in a new timestamped dir, then an atomic rename of the ``..data``
symlink) all change it. A new certificate is loaded into a fresh context that replaces the old
one only once it loaded: connections already open keep the certificate they were made with, new
handshakes get the new one, and a certificate that does not load (half written, missing, wrong
key) is logged once and the last good one stays.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its default dir: it stays light
    from runtime.bundle import GatewayCertificate

__all__ = ["DEFAULT_SECRETS_DIR", "GatewayCerts", "certificates_stamp"]

DEFAULT_SECRETS_DIR = "/var/run/secrets/meshc/tls"
"""Where ``meshc manifests`` mounts the Secrets a gateway's MeshGateway names."""

_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _warn(message: str) -> None:
    print(f"meshc: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Source:
    label: str
    """For log lines: the file's path, or ``secret NAME (DIR/NAME)``."""
    cert: str
    key: str | None
    """None: the key is in the ``cert`` file."""

    def files(self) -> tuple[str, ...]:
        return (self.cert,) if self.key is None else (self.cert, self.key)

    def stamp(self) -> _Stamp:
        out: list[tuple[int, int, int, int] | None] = []
        for path in self.files():
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)


def _source(cert: str | GatewayCertificate, secrets_dir: str) -> _Source:
    if isinstance(cert, str):
        return _Source(cert, cert, None)
    d = os.path.join(secrets_dir, cert.secret)
    return _Source(f"secret {cert.secret} ({d})", os.path.join(d, "tls.crt"), os.path.join(d, "tls.key"))


def certificates_stamp(certificates: Sequence[str | GatewayCertificate], secrets_dir: str) -> object:
    """The identity of the files these certificates are read from: it changes with any of them
    (so a listener left unbound is retried only when something changed)."""
    return tuple(_source(c, secrets_dir).stamp() for c in certificates)


def _names(path: str) -> tuple[str, ...]:
    """The DNS names (SANs, else the common name) of the first certificate in a PEM file."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


def _context(src: _Source) -> ssl.SSLContext:
    for path in src.files():
        if not os.path.isfile(path):  # OpenSSL's error names no file: say which one is missing
            hint = " (is the Secret mounted there, with keys tls.crt and tls.key?)" if src.key else ""
            raise FileNotFoundError(f"{path} is missing{hint}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.load_cert_chain(src.cert, src.key)
    return ctx


class GatewayCerts:
    """The TLS contexts of one HTTPS listener. Raises ``OSError``/``ssl.SSLError``/``ValueError``
    when a certificate cannot be loaded at start (a listener is never bound with one missing)."""

    def __init__(
        self, certificates: Sequence[str | GatewayCertificate], secrets_dir: str = DEFAULT_SECRETS_DIR
    ) -> None:
        if not certificates:
            raise ValueError("an HTTPS listener needs at least one certificate")
        self.sources = tuple(_source(c, secrets_dir) for c in certificates)
        self._stamps = [s.stamp() for s in self.sources]
        self.contexts: list[ssl.SSLContext] = []
        self.names: list[tuple[str, ...]] = []
        for src in self.sources:
            try:
                self.contexts.append(_context(src))
                self.names.append(_names(src.cert))
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ValueError(f"{src.label}: {e}") from e
        self._failed: list[_Stamp | None] = [None] * len(self.sources)
        self.context = _context(self.sources[0])  # the listener's: dispatches by SNI, never replaced
        self.context.sni_callback = self._sni

    @property
    def labels(self) -> list[str]:
        """What each certificate is read from (for events and logs)."""
        return [s.label for s in self.sources]

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        """The current context whose certificate names ``server_name`` (the first one otherwise)."""
        if server_name:
            host = server_name.lower().rstrip(".")
            for names, ctx in zip(self.names, self.contexts, strict=True):
                if host in names:
                    return ctx
            _, _, parent = host.partition(".")
            for names, ctx in zip(self.names, self.contexts, strict=True):
                if f"*.{parent}" in names:
                    return ctx
        return self.contexts[0]

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.pick(server_name)

    def reload(self) -> int:
        """Load the certificates whose files changed; how many were replaced."""
        replaced = 0
        for i, src in enumerate(self.sources):
            before = src.stamp()
            if before == self._stamps[i] or before == self._failed[i]:
                continue
            try:
                ctx = _context(src)
                names = _names(src.cert)
            except (OSError, ssl.SSLError, ValueError) as e:
                if src.stamp() != before:
                    continue  # changed while read (a Secret update under way): next round
                self._failed[i] = before  # logged once per broken state, retried when it changes
                _warn(f"gateway certificate {src.label} not reloaded (the last good one stays): {e}")
                continue
            if src.stamp() != before:
                continue  # the files may be from two versions: read them again next round
            self.contexts[i], self.names[i] = ctx, names
            self._stamps[i], self._failed[i] = before, None
            replaced += 1
        return replaced
