"""The control plane's HTTP API (aiohttp): the data plane protocol, JSON views, metrics, the GUI.

Data plane protocol (DESIGN §5): ``POST /api/v1/register`` (``Registration`` ->
``RegistrationReply``), ``POST /api/v1/heartbeat`` (``Heartbeat``; 404 for an unknown instance,
which makes the data plane register again), ``POST /api/v1/deregister`` (``{"instance"}``),
``POST /api/v1/certificate`` (a renewal: ``CertificateRequest`` -> ``CertificateReply``). Register,
heartbeats, renewal and deregistration are authenticated by a bootstrap token or the current certificate and
answer 401/403 otherwise (``compiler.controlplane.security``, DESIGN §6).

Views (GET, JSON): ``/api/v1/status`` (per data plane sync, what ``meshc status`` prints),
``/api/v1/overview``, ``/api/v1/services``, ``/api/v1/policies``, ``/api/v1/diagnostics``,
``/api/v1/traffic``, ``/api/v1/release``, ``/api/v1/rollouts``, and ``/api/v1/dashboard`` (all of
them at once). ``/metrics`` is Prometheus text; ``/gui`` the dashboard; ``/healthz`` liveness.
``/api/v1/`` lists every endpoint and ``/api/v1/openapi.json`` describes them
(``compiler.controlplane.openapi``, the one table of them).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from pydantic import ValidationError

from compiler.controlplane import openapi
from compiler.controlplane.canary import CanaryController
from compiler.controlplane.endpoints import ON_DEMAND_WAIT_S
from compiler.controlplane.metrics import CONTENT_TYPE, ControlPlaneMetrics
from compiler.controlplane.pusher import DataPlaneSync, Pusher
from compiler.controlplane.registry import DataPlane
from compiler.controlplane.release import Compiler
from compiler.controlplane.security import AuthError, Host, Security
from compiler.controlplane.status import dataplane_row
from compiler.controlplane.traffic import TrafficView, configured_routes
from runtime.pieces import join_lines
from runtime.protocol import Heartbeat, PieceRequest, Registration, RegistrationReply, SignedEndpoints


class KubeAuth(Protocol):
    """What registration needs of the Kubernetes side (``kube.runtime.KubeControlPlane``)."""

    def is_service_account_token(self, token: str) -> bool: ...

    async def authorize(self, token: str, reg: Registration) -> object: ...


class ControlPlane(Host, Protocol):
    """What the API reads of the control plane (``server.ControlPlane`` is one): typed by shape,
    so this module does not import the server that serves it."""

    @property
    def started_at(self) -> float: ...

    @property
    def metrics(self) -> ControlPlaneMetrics: ...

    @property
    def compiler(self) -> Compiler: ...

    @property
    def pusher(self) -> Pusher: ...

    @property
    def security(self) -> Security: ...

    @property
    def traffic(self) -> TrafficView: ...

    @property
    def kube(self) -> KubeAuth | None: ...

    @property
    def canaries(self) -> CanaryController: ...

    def rejoined(self, dp: DataPlane, signed: SignedEndpoints | None) -> None: ...
    def sync_of(self, dp: DataPlane) -> DataPlaneSync | None:
        """The sync view of a data plane, this replica's or (another replica's) from the store."""

    def ha_data(self) -> dict[str, object]:
        """The replicas, the leader, this replica."""

    def refresh_gauges(self) -> None:
        """Bring the data plane gauges up to date (before ``/metrics`` renders them)."""


__all__ = ["ControlPlane", "dashboard_data", "make_app"]

_PROTOCOL = (
    "/api/v1/register",
    "/api/v1/heartbeat",
    "/api/v1/deregister",
    "/api/v1/certificate",
    "/api/v1/pieces",
)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        # No indent: json's C encoder runs only without one, and the status of 1,000 data planes
        # (polled by the GUI and `meshc status`) took the pure-Python encoder ~100 ms a call.
        body=json.dumps(data, sort_keys=False).encode(),
        status=status,
        content_type="application/json",
    )


# --- views --------------------------------------------------------------------------------------


def status_data(cp: ControlPlane) -> dict[str, Any]:
    now = time.time()
    rows = [
        dataplane_row(dp, cp.sync_of(dp), now)
        for dp in sorted(cp.registry.dataplanes.values(), key=lambda d: (d.mesh, d.service, d.instance))
    ]
    rel = cp.releases.current
    manifests = {}
    formats: dict[str, dict[str, str]] = {}
    for key in rel.digests if rel else ():
        mp = cp.pusher.mesh_pieces(rel, key) if "/" not in key else None
        if mp is not None:
            manifests[key] = mp.digest
            formats[key] = {str(v.format): v.digest for v in mp.views()}
    slow = sorted(
        (r for r in rows if r["lag_s"] is not None or r["last_lag_s"] is not None),
        key=lambda r: (r["lag_s"] is None, -(r["lag_s"] or r["last_lag_s"] or 0.0)),
    )
    return {
        "release": rel.id if rel else None,
        "commit": rel.commit if rel else None,
        "digests": rel.digests if rel else {},
        "manifests": manifests,
        "manifest_formats": formats,
        "controlplane": cp.ha_data(),
        "dataplanes": rows,
        "slowest": [
            {"instance": r["instance"], "lag_s": r["lag_s"], "last_lag_s": r["last_lag_s"]} for r in slow[:5]
        ],
    }


def services_data(cp: ControlPlane) -> list[dict[str, Any]]:
    rel = cp.releases.current
    out: list[dict[str, Any]] = []
    if rel is None:
        return out
    for key, data in sorted(rel.bundles.items()):
        if "/" in key:
            continue
        doc = json.loads(data)
        for name, svc in sorted((doc.get("services") or {}).items()):
            instances = [
                dp for dp in cp.registry.dataplanes.values() if dp.mesh == key and dp.service == name
            ]
            subsets = []
            for tags in svc.get("subsets") or []:
                match = [dp for dp in instances if all(dp.tags.get(k) == v for k, v in tags.items())]
                subsets.append(
                    {
                        "tags": tags,
                        "instances": len(match),
                        "online": sum(1 for dp in match if dp.online),
                    }
                )
            out.append(
                {
                    "mesh": key,
                    "service": name,
                    "port": svc.get("port"),
                    "protocol": svc.get("protocol"),
                    "gateway": bool(svc.get("gateway")),
                    "subsets": subsets,
                    "instances": len(instances),
                    "online": sum(1 for dp in instances if dp.online),
                    "digest": rel.digests.get(f"{key}/{name}"),
                }
            )
    return out


def policies_data(cp: ControlPlane) -> list[dict[str, Any]]:
    rel = cp.releases.current
    if rel is None:
        return []
    seen: dict[tuple[str, str, str, int], list[str]] = {}
    for key, items in rel.provenance.items():
        for p in items:
            seen.setdefault((p["kind"], p["name"], p["file"], int(p["line"])), []).append(key)
    return [
        {"kind": k, "name": n, "file": f, "line": line, "bundles": sorted(b)}
        for (k, n, f, line), b in sorted(seen.items(), key=lambda x: (x[0][0], x[0][1]))
    ]


def diagnostics_data(cp: ControlPlane) -> dict[str, Any]:
    last = cp.releases.last
    return {
        "last": last.as_json() if last else None,
        "history": [
            {k: v for k, v in r.as_json().items() if k != "diagnostics"}
            for r in reversed(cp.releases.history)
        ][:20],
    }


def overview_data(cp: ControlPlane) -> dict[str, Any]:
    rel = cp.releases.current
    dps = list(cp.registry.dataplanes.values())
    st = status_data(cp)["dataplanes"]
    meshes = sorted({k for k in (rel.digests if rel else {}) if "/" not in k} | cp.registry.meshes())
    last = cp.releases.last
    cfg = cp.config
    return {
        "meshes": [
            {
                "name": m,
                "services": sum(1 for k in (rel.digests if rel else {}) if k.startswith(f"{m}/")),
                "dataplanes": sum(1 for d in dps if d.mesh == m),
                "online": sum(1 for d in dps if d.mesh == m and d.online),
            }
            for m in meshes
        ],
        "release": rel.id if rel else None,
        "commit": rel.commit if rel else None,
        "release_applied_at": rel.applied_at if rel else None,
        "policies": len(policies_data(cp)),
        "dataplanes": len(dps),
        "online": sum(1 for d in dps if d.online),
        "synced": sum(1 for r in st if r["status"] == "SYNCED"),
        "last_compile_ok": last.ok if last else None,
        "source": f"{cfg.ref} (Git)" if cfg.ref else f"{cfg.policy_dir} (work tree)",
        "incremental": cp.compiler.incremental,
        "started_at": cp.started_at,
        "now": time.time(),
    }


async def traffic_data(cp: ControlPlane) -> dict[str, Any]:
    await cp.traffic.scrape()
    rel = cp.releases.current
    return cp.traffic.annotate(configured_routes(rel), since=rel.applied_at if rel else 0.0)


async def dashboard_data(cp: ControlPlane) -> dict[str, Any]:
    return {
        "overview": overview_data(cp),
        "services": services_data(cp),
        "traffic": await traffic_data(cp),
        "dataplanes": status_data(cp)["dataplanes"],
        "policies": policies_data(cp),
        "diagnostics": diagnostics_data(cp),
        "rollouts": [r.as_json() for r in reversed(cp.pusher.rollouts)][:10],
        "controlplane": cp.ha_data(),
        "canaries": cp.canaries.view(),
    }


# --- the app ------------------------------------------------------------------------------------


def make_app(cp: ControlPlane) -> web.Application:
    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = cp.config.token
        if token and request.path not in _PROTOCOL and request.path != "/healthz":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query.get("token", "") or request.cookies.get("meshc_token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _json({"error": "a token is required (Authorization: Bearer ...)"}, 401)
        return await handler(request)

    app = web.Application(middlewares=[auth], client_max_size=1024 * 1024)

    async def register(request: web.Request) -> web.Response:

        body = await request.read()
        try:
            reg = Registration.model_validate_json(body)
        except ValidationError as e:
            return _json({"error": f"bad registration: {e.errors(include_url=False)}"}, 400)
        # DESIGN §6: the token or the current certificate names the service; the certificate
        # issued for the CSR takes its identity from there (and the tags), never from the CSR.
        try:
            bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if cp.kube is not None and cp.kube.is_service_account_token(bearer):
                await cp.kube.authorize(bearer, reg)  # the pod's identity, by TokenReview
            else:
                cp.security.authorize_registration(request.headers, request.path, body, reg)
            issued = cp.security.issue(reg.mesh, reg.service, reg.tags, reg.csr_pem) if reg.csr_pem else None
        except AuthError as e:
            cp.log(f"registration of {reg.service!r} refused: {e.reason}")
            return _json({"error": e.reason}, e.status)
        dp = cp.registry.register(reg)
        cp.rejoined(dp, reg.running_endpoints)
        cp.pusher.adopt_endpoints(dp, reg.running_endpoints, reg.endpoints_running)
        reply = RegistrationReply(
            instance=dp.instance,
            heartbeat_interval_ms=int(cp.config.heartbeat_interval_s * 1000),
            certificate_pem=issued[0] if issued else None,
            ca_pem=issued[1] if issued else None,
            signing_key=cp.security.public_key_hex,
        )
        return web.Response(body=reply.model_dump_json().encode(), content_type="application/json")

    async def heartbeat(request: web.Request) -> web.Response:
        from compiler.controlplane.security import AuthError

        raw = await request.read()
        try:
            hb = Heartbeat.model_validate_json(raw)
        except ValidationError as e:
            return _json({"error": f"bad heartbeat: {e.errors(include_url=False)}"}, 400)
        known = cp.registry.known(hb)
        if known is None:
            # Unknown, or another boot than registered (a restart): 404 makes it register again.
            return _json(
                {"error": f"unknown instance {hb.instance!r} (or another boot); register again"}, 404
            )
        # A heartbeat moves status and triggers pushes: authenticated as the registered service.
        try:
            cp.security.authenticate(request.headers, request.path, raw, known.service, known.mesh)
        except AuthError as e:
            cp.log(f"heartbeat for {hb.instance} refused: {e.reason}")
            return _json({"error": e.reason}, e.status)
        cp.registry.heartbeat(hb)
        return _json({"ok": True})

    async def pieces(request: web.Request) -> web.Response:
        """On demand (runtime.pieces): a registered data plane asks for pieces by digest."""

        raw = await request.read()
        try:
            req = PieceRequest.model_validate_json(raw)
        except ValidationError as e:
            return _json({"error": f"bad piece request: {e.errors(include_url=False)}"}, 400)
        known = cp.registry.dataplanes.get(req.instance)
        if known is None:
            return _json({"error": f"unknown instance {req.instance!r}; register again"}, 404)
        try:
            cp.security.authenticate(request.headers, request.path, raw, known.service, known.mesh)
        except AuthError as e:
            return _json({"error": e.reason}, e.status)
        if req.endpoints:
            # on demand: they join its scope, and it has them once the push carrying them is
            # ACKed (within the data plane's own bounded wait)
            if not await cp.pusher.endpoints_for(known, req.endpoints, ON_DEMAND_WAIT_S):
                return _json({"error": "the endpoint push was not acknowledged in time"}, 504)
            if not req.digests:
                return web.Response(body=b"", content_type="application/x-ndjson")
        found = cp.pusher.pieces_for(known, req.digests)
        if not found:
            return _json({"error": "none of these pieces is in a recent release"}, 404)
        return web.Response(body=join_lines(found), content_type="application/x-ndjson")

    async def deregister(request: web.Request) -> web.Response:

        raw = await request.read()
        try:
            body = json.loads(raw)
            instance = str(body["instance"])
        except (ValueError, KeyError, TypeError):
            return _json({"error": 'expected {"instance": NAME}'}, 400)
        known = cp.registry.dataplanes.get(instance)
        if known is not None:
            try:
                cp.security.authenticate(request.headers, request.path, raw, known.service, known.mesh)
            except AuthError as e:
                return _json({"error": e.reason}, e.status)
        found = cp.registry.deregister(instance)
        return _json({"ok": found}, 200 if found else 404)

    async def get_status(_: web.Request) -> web.Response:
        return _json(status_data(cp))

    async def get_overview(_: web.Request) -> web.Response:
        return _json(overview_data(cp))

    async def get_services(_: web.Request) -> web.Response:
        return _json({"services": services_data(cp)})

    async def get_policies(_: web.Request) -> web.Response:
        return _json({"policies": policies_data(cp)})

    async def get_diagnostics(_: web.Request) -> web.Response:
        return _json(diagnostics_data(cp))

    async def get_traffic(_: web.Request) -> web.Response:
        return _json(await traffic_data(cp))

    async def get_release(_: web.Request) -> web.Response:
        rel = cp.releases.current
        if rel is None:
            return _json({"error": "no release compiled yet"}, 404)
        return _json({"id": rel.id, **rel.record})

    async def get_replicas(_: web.Request) -> web.Response:
        return _json(cp.ha_data())

    async def get_rollouts(_: web.Request) -> web.Response:
        return _json({"rollouts": [r.as_json() for r in reversed(cp.pusher.rollouts)]})

    async def get_canaries(_: web.Request) -> web.Response:
        return _json({"canaries": cp.canaries.view()})

    async def canary_action(request: web.Request) -> web.Response:
        m = request.match_info
        status, msg = cp.canaries.act(f"{m['mesh']}/{m['name']}", m["action"])
        body: dict[str, Any] = {"message": msg} if status == 200 else {"error": msg}
        view = [c for c in cp.canaries.view() if c["key"] == f"{m['mesh']}/{m['name']}"]
        if view:
            body["canary"] = view[0]
        return _json(body, status)

    async def get_dashboard(_: web.Request) -> web.Response:
        return _json(await dashboard_data(cp))

    async def get_fragments(_: web.Request) -> web.Response:
        from compiler.controlplane.gui import render_sections

        return _json(render_sections(await dashboard_data(cp)))

    async def get_gui(request: web.Request) -> web.Response:
        from compiler.controlplane.gui import render_page

        resp = web.Response(text=render_page(await dashboard_data(cp)), content_type="text/html")
        if cp.config.token and request.query.get("token"):
            resp.set_cookie("meshc_token", request.query["token"], httponly=True, samesite="Strict")
        return resp

    async def get_metrics(_: web.Request) -> web.Response:
        cp.refresh_gauges()
        return web.Response(body=cp.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return _json({"ok": True, "release": cp.releases.current.id if cp.releases.current else None})

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound("/gui")

    async def get_index(_: web.Request) -> web.Response:
        return _json(openapi.index())

    async def get_openapi(_: web.Request) -> web.Response:
        return _json(openapi.openapi_document())

    async def favicon(_: web.Request) -> web.Response:
        from compiler.controlplane.gui import FAVICON_SVG

        return web.Response(
            text=FAVICON_SVG, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    app.router.add_post("/api/v1/register", register)
    app.router.add_post("/api/v1/heartbeat", heartbeat)
    app.router.add_post("/api/v1/deregister", deregister)
    app.router.add_post("/api/v1/certificate", cp.security.handle_certificate)
    app.router.add_post("/api/v1/pieces", pieces)
    app.router.add_get("/api/v1/status", get_status)
    app.router.add_get("/api/v1/overview", get_overview)
    app.router.add_get("/api/v1/services", get_services)
    app.router.add_get("/api/v1/policies", get_policies)
    app.router.add_get("/api/v1/diagnostics", get_diagnostics)
    app.router.add_get("/api/v1/traffic", get_traffic)
    app.router.add_get("/api/v1/release", get_release)
    app.router.add_get("/api/v1/rollouts", get_rollouts)
    app.router.add_get("/api/v1/replicas", get_replicas)
    app.router.add_get("/api/v1/canaries", get_canaries)
    app.router.add_post("/api/v1/canaries/{mesh}/{name}/{action}", canary_action)
    app.router.add_get("/api/v1/dashboard", get_dashboard)
    app.router.add_get("/api/v1/dashboard/fragments", get_fragments)
    app.router.add_get("/gui", get_gui)
    app.router.add_get("/gui/", get_gui)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", root)
    app.router.add_get("/api/v1/", get_index)
    app.router.add_get("/api/v1/openapi.json", get_openapi)
    app.router.add_get("/favicon.ico", favicon)
    return app
