"""One data plane process: its lifecycle (sidecar and gateway modes).

Start-up order makes the last-known-good state answer first: the state dir (and any bundle or
endpoint files on the command line) is loaded and compiled (``runtime.pushes``, which also
applies every later push) before a single listener is bound. SIGTERM stops the
listeners, lets in-flight requests and tunnels finish (bounded by ``--drain-seconds``),
deregisters and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.bundle import GatewayCertificate, ServiceBundle
from runtime.decide import inbound_header_timeout
from runtime.engine import Engine, Snapshot
from runtime.fastmetrics import Identity
from runtime.fastproxy import FastHttp
from runtime.gatewaytls import DEFAULT_SECRETS_DIR, GatewayCerts, certificates_stamp
from runtime.h1guard import GuardedListener
from runtime.h2sniff import LazyH2
from runtime.healthcheck import HealthChecker
from runtime.limits import ListenerLimits
from runtime.metrics import Metrics
from runtime.pieces import FORMATS
from runtime.protocol import Heartbeat, Registration, RegistrationReply
from runtime.pushes import Pushes, StartupError
from runtime.registration import Registrar
from runtime.security import Credentials, MtlsListener, PushTrust
from runtime.state import StateDir
from runtime.tcp import OutboundSniffer, TcpProxy

if TYPE_CHECKING:  # aiohttp only for --dataplane aiohttp: ~11 MB of RSS a fast path does without
    from aiohttp import web

    from runtime._http import AdminRequest, AdminResponse
    from runtime.proxy import HttpProxy

__all__ = ["Addr", "DataPlane", "Options", "StartupError", "parse_addr", "serve"]

Addr = tuple[str, int]
MAX_ENDPOINTS_BYTES = 16 * 1024 * 1024
_CERT_WATCH_S = 1.0


def parse_addr(value: str, default_host: str = "127.0.0.1") -> Addr:
    """``host:port``, ``[v6]:port``, ``v6:port`` or ``:port`` / ``port`` (on ``default_host``).

    ``v6:port`` without brackets is what ``$(POD_IP):PORT`` expands to on an IPv6 Kubernetes
    cluster (meshc inject writes it so for either family): the port is the part after the last
    colon, and the rest must then be an IPv6 address."""
    value = value.strip()
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    elif value.isdigit():
        host, port = default_host, value
    else:
        host, _, port = value.rpartition(":")
        host = host or default_host
    if not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address (write [v6]:port)") from None
    return host, int(port)


def _fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


@dataclass
class Options:
    kind: Literal["sidecar", "gateway"] = "sidecar"
    service: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    """Its Dataplane labels (Kuma's Dataplane targetRef ``labels``; ``kuma.io/display-name`` is
    its name, ``k8s.kuma.io/namespace`` its namespace), apart from its tags."""
    app: str | None = None
    inbound: Addr | None = None
    outbound: Addr | None = None
    admin: Addr = ("127.0.0.1", 0)
    listen: list[Addr] = field(default_factory=list)
    tls_secrets_dir: str = DEFAULT_SECRETS_DIR
    """Where the Secrets of HTTPS listeners' ``{secret: NAME}`` certificates are mounted."""
    state_dir: Path | None = None
    control_plane: str | None = None
    """One control plane URL, or several comma-separated (replicas sharing one store)."""
    bundle: Path | None = None
    mesh_bundle: Path | None = None
    endpoints: Path | None = None
    drain_s: float = 10.0
    dataplane: Literal["fast", "aiohttp"] = "aiohttp"
    mesh: str = "default"
    token: str | None = None
    """Bootstrap token for the first registration (``meshc token --service NAME``)."""
    trust_key: str | None = None
    """The control plane's Ed25519 public key (hex) when it is known in advance."""
    insecure_admin: bool = False
    """Accept unsigned pushes (no control plane; bundles fed by hand)."""
    admin_allow_remote: bool = False
    """Allow the admin API on a non-loopback address."""
    pieces: bool = True
    """Register for delta pushes (``runtime.pieces``); False: the whole mesh bundle every time."""
    pieces_formats: tuple[int, ...] = FORMATS
    """The mesh manifest formats declared on registration (``runtime.pieces.FORMATS``)."""
    reachable: list[str] | None = None
    """Kuma's reachableServices (registration); None: what the policies name, the rest on demand."""
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    """Read timeouts and the connection limit of every listener (the admin API included)."""
    """Head/body read timeouts and the connection limit of the admin listener."""


_LOOPBACK = ("127.", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host.startswith(_LOOPBACK) or host == "::1"


def _bind(addr: Addr) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class DataPlane:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.service = opts.service or ""
        self.metrics = Metrics(Identity(self.service, opts.mesh, dict(opts.tags)))
        self.engine = Engine(self.service, opts.tags, labels=opts.labels)
        self.draining = False
        self.listening: dict[str, str] = {}
        self._gateway_ports: set[int] = set()  # gateway listeners bound so far
        self._listen_used: set[int] = set()  # indexes of --listen addresses bound so far
        self._runners: list[web.BaseRunner] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._admin_server: asyncio.Server | None = None
        self.own_addresses: set[Addr] = set()  # the outbound listener: never a destination
        # DESIGN §6: one identity shared by every forwarding layer; the key stays in memory.
        self.creds = Credentials()
        self.http: HttpProxy | None = None
        self.fast: FastHttp | None = None
        if opts.dataplane == "fast":  # the HTTP listeners on runtime.fastproxy instead of aiohttp
            self.fast = FastHttp(
                self.engine,
                self.metrics,
                app_address=opts.app,
                own_addresses=self.own_addresses,
                limits=opts.limits,
            )
        else:
            from runtime.proxy import HttpProxy

            self.http = HttpProxy(self.engine, self.metrics, app_address=opts.app)
            self.http.own_addresses = self.own_addresses
            self.http.creds = self.creds
        self.tcp = TcpProxy(self.engine, self.metrics, app_address=opts.app, own_addresses=self.own_addresses)
        # HTTP/2 (h2c with prior knowledge, or ALPN h2 under mTLS) on every HTTP listener, whichever
        # data plane serves HTTP/1.1 there: one h2 byte layer under the same decisions.
        self.h2 = LazyH2(
            self.engine,
            self.metrics,
            self.creds,
            app_address=opts.app,
            own_addresses=self.own_addresses,
            header_timeout_s=opts.limits.header_timeout_s,
            max_connections=opts.limits.max_connections,
            open_counts=self.fast.open if self.fast is not None else None,
        )
        self.health = HealthChecker(self.metrics)
        self.registrar: Registrar | None = None
        self._bg: asyncio.Future[None] | None = None
        self.tcp.creds = self.creds
        if self.fast is not None:
            self.fast.creds = self.creds
        self.creds.listeners.append(self._on_new_certificate)
        self.health.tls = self._peer_tls
        self.health.h2_tls = self.h2.client_ctx
        self.trust = PushTrust(opts.state_dir, opts.trust_key, opts.insecure_admin)
        self.pushes = Pushes(
            self.engine,
            self.metrics,
            StateDir(opts.state_dir) if opts.state_dir else None,
            self.trust,
            self._on_install,
            self._rebind_gateway,
            mesh=opts.mesh,
            registers=bool(opts.control_plane),
        )
        self._mtls_listeners: list[MtlsListener] = []
        self._gateway_certs: list[GatewayCerts] = []
        self._cert_watch: asyncio.Task[None] | None = None
        self._cert_pending: dict[int, tuple[tuple[str | GatewayCertificate, ...], object]] = {}
        """HTTPS listeners not bound because a certificate did not load: port -> (certificates,
        the stamp of their files then); bound as soon as the files change and load."""
        self._rotation: asyncio.Task[None] | None = None
        self._mtls_seen: tuple[bool, str | None, str | None] | None = None
        self._wake = asyncio.Event()
        self._renew_now = False
        self._last_renewal = 0.0

    # -- start-up ---------------------------------------------------------------------------

    def _on_install(self, snap: Snapshot) -> None:
        self.health.reconcile(snap)
        self._watch_mtls(snap)
        ident = self.metrics.stats.identity  # what the metrics say of this side
        ident.service = self.engine.service
        ident.mtls = snap.mesh is not None and snap.mesh.mtls.enabled

    async def start(self) -> None:
        opts = self.opts
        self.pushes.load(opts.mesh_bundle, opts.bundle, opts.endpoints)
        self.service = self.engine.service
        if self.http is not None:
            self.http.service = self.service
        if self.http is not None:
            await self.http.start()
        loop = asyncio.get_running_loop()
        if not is_loopback(opts.admin[0]) and not opts.admin_allow_remote:
            raise StartupError(
                f"the admin API may only listen on loopback (asked {_fmt(opts.admin)}); "
                "--admin-allow-remote overrides this"
            )
        if not opts.control_plane and self.trust.key is None and not opts.insecure_admin:
            _warn(
                "no control plane and no trusted key: the admin API refuses every push "
                "(--trust-key HEX, or --insecure-admin to accept unsigned pushes)"
            )
        try:
            from runtime._http import serve_admin

            sock = _bind(opts.admin)
            self._admin_server = await serve_admin(sock, self._admin, opts.limits)
            self.listening["admin"] = _fmt(sock.getsockname()[:2])
            if opts.kind == "sidecar":
                if opts.inbound is not None:
                    await self._start_inbound(opts.inbound)
                if opts.outbound is not None:
                    if self.fast is not None:
                        factory: Any = self.fast.factory("outbound")
                    else:
                        assert self.http is not None
                        factory = await self._guarded("outbound", self.http.outbound)
                    sock = _bind(opts.outbound)
                    assert factory is not None
                    factory = self.h2.sniffer(factory, "outbound")
                    server = await loop.create_server(
                        lambda: OutboundSniffer(factory, self.tcp, opts.limits.header_timeout_s), sock=sock
                    )
                    self._servers.append(server)
                    self.listening["outbound"] = _fmt(sock.getsockname()[:2])
                    self.own_addresses.add(sock.getsockname()[:2])
            else:
                await self._start_gateway()
        except OSError as e:
            raise StartupError(f"cannot listen: {e}") from e
        if opts.control_plane:
            self.registrar = Registrar(
                opts.control_plane,
                self._registration,
                self._heartbeat,
                self._registered,
                auth=self._auth_headers,
            )
            self.registrar.start()
            self.pushes.fetcher = self.registrar.fetch_pieces
            self.pushes.endpoint_fetch.fetcher = self.registrar.fetch_endpoints
            fetch = self.pushes.fetch
            self.tcp.fetch = fetch
            if self.fast is not None:
                self.fast.fetch = fetch
            if self.http is not None:
                self.http.fetch = fetch
            self.h2.fetch = fetch
            self._rotation = asyncio.ensure_future(self._rotate_loop())
        _emit({"event": "listening", "service": self.service, **self.listening})

    async def _guarded(self, listener: str, handler: Any) -> GuardedListener:
        """An aiohttp server for ``handler`` behind the data listeners' parser and limits."""
        server = (await self._runner(handler)).server
        assert server is not None
        refusals = self.metrics.listener_refusals
        limits = self.opts.limits
        engine = self.engine
        return GuardedListener(
            server,
            limits,
            lambda reason: refusals.labels(listener, reason).inc(),
            (lambda: inbound_header_timeout(engine.snapshot, limits.header_timeout_s))
            if listener == "inbound"
            else None,
        )

    async def _runner(self, handler: Any) -> web.ServerRunner:
        from aiohttp import web

        runner = web.ServerRunner(
            web.Server(handler, access_log=None, keepalive_timeout=75.0),
            handle_signals=False,
            shutdown_timeout=self.opts.drain_s,
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _start_inbound(self, addr: Addr) -> None:
        if self.opts.app is None:
            raise StartupError("--inbound needs --app")
        mesh = self.engine.snapshot.mesh
        catalog = mesh.services.get(self.service) if mesh else None
        sock = _bind(addr)
        # Every inbound listener accepts through MtlsListener: it looks at each connection's first
        # byte and hands it over with TLS or in plaintext as the running Mesh's mTLS mode says.
        factory: Any
        if catalog is not None and catalog.protocol == "tcp":

            def factory() -> asyncio.BaseProtocol:
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self.tcp.inbound_connection)

        elif self.fast is not None:
            factory = self.fast.factory("inbound")
        else:
            assert self.http is not None
            factory = await self._guarded("inbound", self.http.inbound)
        if catalog is None or catalog.protocol != "tcp":
            factory = self.h2.sniffer(factory, "inbound")
        listener = MtlsListener(sock, factory, self._current_mtls, self.creds, self._count_inbound)
        listener.start()
        self._mtls_listeners.append(listener)
        self.listening["inbound"] = _fmt(sock.getsockname()[:2])

    def _current_mtls(self) -> Any:
        mesh = self.engine.snapshot.mesh
        return mesh.mtls if mesh is not None else None

    def _peer_tls(self) -> ssl.SSLContext | None:
        """The mTLS client context for peer hops when the Mesh has mTLS on, else None."""
        mesh = self.engine.snapshot.mesh
        return self.creds.client_ctx if mesh is not None and mesh.mtls.enabled else None

    def _count_inbound(self, tls: str, result: str) -> None:
        self.metrics.inbound_connections.labels(tls, result).inc()

    async def _start_gateway(self) -> None:
        svc = self.pushes.slots.get("service")
        gw = svc.bundle.gateway if svc is not None and isinstance(svc.bundle, ServiceBundle) else None
        if gw is None:
            # With a control plane (or a key to verify pushes with), the listeners are bound when
            # the first gateway bundle arrives; without one nothing could ever configure them.
            if self.opts.control_plane or self.trust.key is not None or self.trust.insecure:
                return
            raise StartupError("gateway mode needs a service bundle with a gateway section")
        await self._bind_gateway(strict=True)

    async def _bind_gateway(self, strict: bool = False) -> bool:
        """Bind every listener of the running gateway section not bound yet (at start, on the first
        bundle, on a reload that adds a port). ``--listen`` addresses go to the listener with their
        port, else to the next unbound one; without ``--listen``, each listener on 127.0.0.1:port.
        An address with no listener left is an error at start and waits for a later bundle after.
        True when something was bound."""
        svc = self.pushes.slots.get("service")
        gw = svc.bundle.gateway if svc is not None and isinstance(svc.bundle, ServiceBundle) else None
        if gw is None:
            return False
        listeners = [lst for lst in gw.listeners if lst.port not in self._gateway_ports]
        if self.opts.listen:
            wanted = [a for i, a in enumerate(self.opts.listen) if i not in self._listen_used]
            indexes = [i for i in range(len(self.opts.listen)) if i not in self._listen_used]
        else:
            wanted = [("127.0.0.1", lst.port) for lst in listeners]
            indexes = [-1] * len(wanted)
        by_port = {lst.port: lst for lst in listeners}
        unmatched = iter([lst for lst in listeners if lst.port not in {p for _, p in wanted}])
        bound = False
        for index, addr in zip(indexes, wanted, strict=True):
            listener = by_port.pop(addr[1], None) or next(unmatched, None)
            if listener is None:
                if strict:
                    raise StartupError(f"no gateway listener left for --listen {_fmt(addr)}")
                continue
            port = listener.port
            tls: GatewayCerts | None = None
            if listener.protocol == "HTTPS":
                if self._cert_watch is None:
                    self._cert_watch = asyncio.ensure_future(self._watch_certificates())
                stamp = certificates_stamp(listener.certificates, self.opts.tls_secrets_dir)
                try:
                    tls = GatewayCerts(listener.certificates, self.opts.tls_secrets_dir)
                except (OSError, ssl.SSLError, ValueError) as e:
                    # Not fatal, at start neither: the other listeners serve, and this one is
                    # bound when its files change and load (a Secret mounted or fixed later).
                    if self._cert_pending.get(port) != (listener.certificates, stamp):
                        _warn(f"gateway listener {port} not bound until its certificates load: {e}")
                    self._cert_pending[port] = (listener.certificates, stamp)
                    continue
                self._cert_pending.pop(port, None)
                self._gateway_certs.append(tls)
            sock = _bind(addr)
            ctx = tls.context if tls is not None else None
            if listener.protocol == "TCP":
                self._servers.append(await asyncio.start_server(self.tcp.gateway_handler(port), sock=sock))
            elif self.fast is not None:
                loop = asyncio.get_running_loop()
                factory = self.h2.sniffer(self.fast.factory("gateway", port), "gateway", port)
                self._servers.append(await loop.create_server(factory, sock=sock, ssl=ctx))
            else:
                assert self.http is not None

                async def handler(
                    request: web.BaseRequest, port: int = port, http: HttpProxy = self.http
                ) -> web.StreamResponse:
                    return await http.gateway(request, port)

                loop = asyncio.get_running_loop()
                guarded = await self._guarded("gateway", handler)
                factory = self.h2.sniffer(guarded, "gateway", port)
                self._servers.append(await loop.create_server(factory, sock=sock, ssl=ctx))
            self._gateway_ports.add(port)
            if index >= 0:
                self._listen_used.add(index)
            self.listening[f"listener:{port}"] = _fmt(sock.getsockname()[:2])
            bound = True
        return bound

    async def _watch_certificates(self) -> None:
        """Re-read changed certificates of HTTPS listeners, files and mounted Secrets alike (new
        handshakes only)."""
        while True:
            await asyncio.sleep(_CERT_WATCH_S)
            if any(
                certificates_stamp(certs, self.opts.tls_secrets_dir) != stamp
                for certs, stamp in self._cert_pending.values()
            ):
                await self._rebind_gateway()
            for certs in self._gateway_certs:
                try:
                    replaced = certs.reload()
                except Exception as e:  # never end the watch: the next change must still be seen
                    _warn(
                        f"gateway certificates {certs.labels}: reload failed, the last good ones stay: {e!r}"
                    )
                    continue
                if replaced:
                    _emit({"event": "certificates_reloaded", "service": self.service, "files": certs.labels})

    async def _rebind_gateway(self) -> None:
        """After a pushed bundle: bind the listeners it adds; a failure is logged, not a NACK
        (the bundle itself is valid and already running)."""
        if self.opts.kind != "gateway" or self.draining:
            return
        try:
            bound = await self._bind_gateway()
        except OSError as e:
            _warn(f"cannot bind a gateway listener: {e}")
            return
        if bound:
            _emit({"event": "listening", "service": self.service, **self.listening})

    # -- control plane ----------------------------------------------------------------------

    def _registration(self) -> Registration:
        return Registration(
            service=self.service,
            tags=self.opts.tags,
            kind=self.opts.kind,
            inbound_address=self.listening.get("inbound"),
            admin_address=self.listening["admin"],
            mesh=self.opts.mesh,
            instance=self.pushes.instance,
            csr_pem=self.creds.csr(self.opts.mesh, self.service, self.opts.tags),
            boot_id=self.pushes.boot_id,
            pieces=self.opts.pieces,
            reachable_services=self.opts.reachable,
            running_endpoints=self.pushes.endpoints_signed,
            endpoint_deltas=self.opts.pieces,
            endpoints_on_demand=self.pushes.endpoint_fetch.declared(),
            endpoints_running=self.pushes.running()[0].get("endpoints") if self.opts.pieces else None,
            pieces_formats=list(self.opts.pieces_formats) if self.opts.pieces else None,
        )

    def _heartbeat(self, instance: str) -> Heartbeat:
        self.pushes.settle()
        running, generations = self.pushes.running()
        return Heartbeat(
            instance=instance,
            running=running,
            generations=generations,
            endpoints_generation=self.pushes.endpoints.generation if self.pushes.endpoints else 0,
            boot_id=self.pushes.boot_id,
            endpoints_on_demand=self.pushes.endpoint_fetch.declared(),
        )

    def _registered(self, reply: RegistrationReply) -> None:
        self._adopt(reply.certificate_pem, reply.ca_pem, reply.signing_key)
        self.pushes.registered = True
        if reply.instance != self.pushes.instance:
            self.pushes.instance = reply.instance
            if self.pushes.state is not None:
                self._bg = asyncio.ensure_future(self.pushes.persist_quietly())

    def _adopt(self, cert_pem: str | None, ca_pem: str | None, signing_key: str | None) -> None:
        self.trust.adopt(signing_key)
        if cert_pem and ca_pem:
            self.creds.install(cert_pem, ca_pem)

    def _on_new_certificate(self) -> None:
        ident = self.creds.identity
        if ident is None:
            return
        self.metrics.certificate_expiry.set(ident.not_after().timestamp())
        self.metrics.certificate_rotations.inc()
        if self.fast is not None:
            self.fast.on_new_certificate()
        self._wake.set()  # reschedule the renewal for the new certificate
        _emit(
            {
                "event": "certificate",
                "service": self.service,
                "serial": format(ident.serial, "x"),
                "not_after": ident.not_after().isoformat(),
            }
        )

    def _auth_headers(self, path: str, body: bytes, use_token: bool) -> dict[str, str]:
        """Authenticate a control-plane call: the current certificate, else the bootstrap token."""
        ident = self.creds.identity
        if ident is not None and self.creds.valid and not use_token:
            return ident.proof_headers(path, body)
        token = self.opts.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _rotate_loop(self) -> None:
        """Renew the certificate at 2/3 of its lifetime (at once when the Mesh's mTLS backend
        changed); retry with backoff while the control plane cannot answer. New connections use
        the new certificate; open ones keep theirs (nothing is dropped)."""
        backoff = 0.25
        while True:
            self._wake.clear()
            at = self.creds.renew_at()
            if at is None:
                await self._wake.wait()
                continue
            # Never more often than once a second, whatever the certificate says.
            delay = max(0.0 if self._renew_now else at - time.time(), self._last_renewal + 1.0 - time.time())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                if self._wake.is_set():
                    continue
            self._renew_now = False
            self._last_renewal = time.time()
            registrar = self.registrar
            if registrar is None or registrar.instance is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            csr = self.creds.csr(self.opts.mesh, self.service, self.opts.tags)
            try:
                reply = await registrar.renew(csr)
            except (OSError, ValueError, TimeoutError) as e:
                _warn(f"certificate renewal failed: {e}; retrying")
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.25
            if reply is not None:  # None: unknown instance; the registrar registers again
                self._adopt(reply.certificate_pem, reply.ca_pem, reply.signing_key)

    def _watch_mtls(self, snap: Snapshot) -> None:
        """A new Mesh mTLS backend needs a certificate from its CA: renew at once."""
        mesh = snap.mesh
        now = (mesh.mtls.enabled, mesh.mtls.backend, mesh.mtls.backend_type) if mesh is not None else None
        before, self._mtls_seen = self._mtls_seen, now
        if before is not None and now is not None and before != now:
            if self.fast is not None:
                self.fast.on_new_certificate()  # pooled connections were made for the old mode
            if self.creds.identity is not None:
                self._renew_now = True
                self._wake.set()

    # -- admin API --------------------------------------------------------------------------

    async def _admin(self, request: AdminRequest) -> AdminResponse:
        from runtime.admin import handle

        return await handle(self, request)

    def config(self) -> dict[str, Any]:
        now = self.engine.clock()
        endpoints = self.pushes.endpoints
        return {
            "service": self.service,
            "kind": self.opts.kind,
            "tags": self.opts.tags,
            "mesh": self.opts.mesh,
            "instance": self.pushes.instance,
            "boot_id": self.pushes.boot_id,
            "registered": self.pushes.registered,
            "listening": self.listening,
            "ready": self.ready,
            "draining": self.draining,
            "certificate": self.creds.describe(),
            "trusted_control_plane_key": self.trust.key,
            "control_plane": self.registrar.url if self.registrar is not None else None,
            "control_plane_switches": self.registrar.switches if self.registrar is not None else 0,
            "insecure_admin": self.trust.insecure,
            "bundles": {
                role: {
                    "digest": s.digest,
                    "generation": s.generation,
                    "bundle": json.loads(s.data) if s.pieces is None else s.bundle.model_dump(mode="json"),
                    **(
                        {"pieces": {"held": sorted(s.pieces.held), "pending": sorted(s.pieces.pending)}}
                        if s.pieces is not None
                        else {}
                    ),
                }
                for role, s in sorted(self.pushes.slots.items())
            },
            "endpoints": endpoints.model_dump(mode="json") if endpoints else None,
            "endpoints_on_demand": self.pushes.endpoint_fetch.declared(),
            "hosts": {
                h.address: {
                    "healthy": h.hc_healthy,
                    "control_plane_healthy": h.cp_healthy,
                    "ejected": h.is_ejected(now),
                    "ejections": h.ejections,
                    "active": h.active,
                }
                for h in self.engine.registry.hosts.values()
            },
        }

    @property
    def ready(self) -> bool:
        return self.engine.snapshot.ready and not self.draining

    # -- shutdown ---------------------------------------------------------------------------

    async def drain_and_stop(self) -> None:
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.drain_s
        for server in self._servers:
            server.close()
        for listener in self._mtls_listeners:
            listener.close()
        if self._rotation is not None:
            self._rotation.cancel()
        if self._cert_watch is not None:
            self._cert_watch.cancel()
        fast = [self.fast.drain(deadline)] if self.fast is not None else []
        await asyncio.gather(
            *(r.cleanup() for r in self._runners), self.tcp.drain(deadline), self.h2.drain(deadline), *fast
        )
        if self.registrar is not None:
            await self.registrar.stop(deregister=True)
        await self.health.close()
        if self.http is not None:
            await self.http.close()
        if self.fast is not None:
            await self.fast.close()
        await self.h2.close()
        if self._admin_server is not None:
            self._admin_server.close()


async def serve(opts: Options) -> int:
    plane = DataPlane(opts)
    try:
        await plane.start()
    except StartupError as e:
        print(f"meshc: {e}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            await plane.drain_and_stop()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _emit({"event": "draining", "service": plane.service})
    await plane.drain_and_stop()
    _emit({"event": "stopped", "service": plane.service})
    return 0


def _warn(message: str) -> None:
    print(f"meshc: {message}", file=sys.stderr, flush=True)


def _emit(doc: dict[str, Any]) -> None:
    """One JSON event line on stdout; a closed stdout must not stop a drain."""
    with contextlib.suppress(OSError, ValueError):
        print(json.dumps(doc), flush=True)


def run(opts: Options) -> int:
    """Run a data plane until SIGTERM/SIGINT; the exit code."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(opts))
