"""TLS termination for the gateway's ``HTTPS`` listeners: certificates from files, SNI, reload.

One ``ssl.SSLContext`` per certificate file (a PEM holding the chain and its private key, as a
MeshGateway's ``tls.certificates: [{file: PATH}]`` names it). The first file's context is the
listener's; its SNI callback hands a handshake to the context whose certificate names the
requested host (exact names first, then a ``*.`` wildcard one label deep), so one port serves
several hostnames. Every context offers ``h2`` and ``http/1.1`` by ALPN (``runtime.h2proxy``
reads the choice).

``reload`` re-reads files whose modification time changed, into the same contexts: connections
already open keep the certificate they were made with, new handshakes get the new one, and a
file that does not load (half written, wrong key) is reported and leaves the old certificate in
place.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Sequence

__all__ = ["GatewayCerts"]


def _warn(message: str) -> None:
    print(f"meshc: {message}", file=sys.stderr, flush=True)


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


def _context(path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.load_cert_chain(path)
    return ctx


class GatewayCerts:
    """The TLS contexts of one HTTPS listener. Raises ``OSError``/``ssl.SSLError``/``ValueError``
    when a file cannot be loaded at start (a listener is never bound with a missing certificate)."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise ValueError("an HTTPS listener needs at least one certificate file")
        self.paths = tuple(paths)
        self.contexts = [_context(p) for p in self.paths]
        self.names = [_names(p) for p in self.paths]
        self._mtimes = [self._mtime(p) for p in self.paths]
        self.context = self.contexts[0]
        self.context.sni_callback = self._sni

    @staticmethod
    def _mtime(path: str) -> float:
        try:
            return os.stat(path).st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate names ``server_name`` (the default one otherwise)."""
        if server_name:
            host = server_name.lower().rstrip(".")
            for names, ctx in zip(self.names, self.contexts, strict=True):
                if host in names:
                    return ctx
            _, _, parent = host.partition(".")
            for names, ctx in zip(self.names, self.contexts, strict=True):
                if f"*.{parent}" in names:
                    return ctx
        return self.context

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = self.pick(server_name)
        if ctx is not self.context:
            sslobj.context = ctx

    def reload(self) -> int:
        """Re-read the files that changed; how many certificates were replaced."""
        replaced = 0
        for i, path in enumerate(self.paths):
            mtime = self._mtime(path)
            if mtime == self._mtimes[i]:
                continue
            self._mtimes[i] = mtime
            try:
                names = _names(path)
                _context(path)  # checked on a scratch context first: the live one never breaks
                self.contexts[i].load_cert_chain(path)
            except (OSError, ssl.SSLError, ValueError) as e:
                _warn(f"gateway certificate {path} not reloaded (the previous one stays): {e}")
                continue
            self.names[i] = names
            replaced += 1
        return replaced
