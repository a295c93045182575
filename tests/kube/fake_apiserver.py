"""An in-test Kubernetes API server on 127.0.0.1 that speaks the real wire protocol.

It serves what meshc's control plane uses, in the shapes kube-apiserver returns them:
lists with ``metadata.resourceVersion`` (items without kind/apiVersion, as in a real list),
watches as a chunked stream of JSON lines (``{"type", "object"}``, objects with kind/apiVersion)
resumed from a resourceVersion, an ``ERROR`` event with a 410 ``Expired`` Status when that
version was compacted away, TokenReview creation, and Leases with optimistic concurrency
(409 ``Conflict`` on a stale resourceVersion, 409 ``AlreadyExists`` on a second create).
Not a mock of meshc's code: a server the real client library talks to over real HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

RESOURCES = {
    # path (cluster-wide list) -> (apiVersion, kind, list kind)
    "/api/v1/pods": ("v1", "Pod", "PodList"),
    "/api/v1/services": ("v1", "Service", "ServiceList"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList"),
}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Store:
    rv: int = 100
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: {p: {} for p in RESOURCES}
    )
    events: dict[str, list[tuple[int, str, dict[str, Any]]]] = field(
        default_factory=lambda: {p: [] for p in RESOURCES}
    )
    compacted: int = 0
    """Watches from a resourceVersion below this get 410 Gone (etcd compaction)."""
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    """token -> TokenReview status.user; the audiences each token is valid for under "audiences"."""
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    lease_conflicts: int = 0
    requests: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _next(self) -> str:
        self.rv += 1
        return str(self.rv)

    def put(self, path: str, obj: dict[str, Any], kind: str | None = None) -> None:
        """Add or modify an object (ADDED / MODIFIED event)."""
        api, k, _ = RESOURCES[path]
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = api, k
        meta = obj["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])
        meta["resourceVersion"] = self._next()
        typ = kind or ("MODIFIED" if key in self.objects[path] else "ADDED")
        self.objects[path][key] = obj
        self.events[path].append((self.rv, typ, copy.deepcopy(obj)))
        self._wake()

    def delete(self, path: str, namespace: str, name: str) -> None:
        obj = self.objects[path].pop((namespace, name))
        obj["metadata"]["resourceVersion"] = self._next()
        self.events[path].append((self.rv, "DELETED", obj))
        self._wake()

    def compact(self) -> None:
        """Forget every event so far (etcd compaction): a watch from an older version gets 410."""
        self.compacted = int(self._next())
        for p in self.events:
            self.events[p] = []
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def app(store: Store) -> web.Application:
    async def list_or_watch(request: web.Request) -> web.StreamResponse:
        path = request.path
        store.requests.append(f"{request.method} {request.path_qs}")
        api, _, list_kind = RESOURCES[path]
        if request.query.get("watch") in ("true", "1", "True"):
            return await _watch(request, path)
        items = []
        for obj in store.objects[path].values():
            item = copy.deepcopy(obj)
            item.pop("apiVersion"), item.pop("kind")
            items.append(item)
        body = {
            "kind": list_kind,
            "apiVersion": api,
            "metadata": {"resourceVersion": str(store.rv)},
            "items": items,
        }
        return web.json_response(body)

    async def _watch(request: web.Request, path: str) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or store.rv)
        timeout = float(request.query.get("timeoutSeconds") or 30)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if since < store.compacted:
            msg = f"too old resource version: {since} ({store.compacted})"
            err = {"type": "ERROR", "object": status(410, "Expired", msg)}
            await resp.write(json.dumps(err).encode() + b"\n")
            return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent = since
        while True:
            for rv, typ, obj in store.events[path]:
                if rv > sent:
                    await resp.write(json.dumps({"type": typ, "object": obj}).encode() + b"\n")
                    sent = rv
            left = deadline - loop.time()
            if left <= 0:
                return resp
            waiter = store.changed
            try:
                await asyncio.wait_for(waiter.wait(), left)
            except TimeoutError:
                return resp
            if sent < store.compacted:
                msg = f"too old resource version: {sent} ({store.compacted})"
                err = {"type": "ERROR", "object": status(410, "Expired", msg)}
                await resp.write(json.dumps(err).encode() + b"\n")
                return resp

    async def token_review(request: web.Request) -> web.Response:
        store.requests.append(f"POST {request.path}")
        body = await request.json()
        token = body["spec"]["token"]
        wanted = body["spec"].get("audiences") or []
        user = store.tokens.get(token)
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
        }
        review["spec"] = body["spec"]
        if user is None or not set(wanted) <= set(user.get("audiences", [])):
            review["status"] = {"authenticated": False, "error": "invalid bearer token", "user": {}}
        else:
            u = {k: v for k, v in user.items() if k != "audiences"}
            review["status"] = {"authenticated": True, "user": u, "audiences": wanted}
        return web.json_response(review, status=201)

    async def get_pod(request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = store.objects["/api/v1/pods"].get((ns, name))
        if obj is None:
            return web.json_response(status(404, "NotFound", f'pods "{name}" not found'), status=404)
        return web.json_response(obj)

    async def lease(request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info.get("name")
        store.requests.append(f"{request.method} {request.path}")
        if request.method == "POST":
            body = await request.json()
            key = (ns, body["metadata"]["name"])
            if key in store.leases:
                store.lease_conflicts += 1
                msg = f'leases.coordination.k8s.io "{key[1]}" already exists'
                return web.json_response(status(409, "AlreadyExists", msg), status=409)
            return web.json_response(_store_lease(key, body), status=201)
        assert name is not None
        cur = store.leases.get((ns, name))
        if cur is None:
            msg = f'leases.coordination.k8s.io "{name}" not found'
            return web.json_response(status(404, "NotFound", msg), status=404)
        if request.method == "GET":
            return web.json_response(cur)
        body = await request.json()
        if body["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]:
            store.lease_conflicts += 1
            msg = (
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
            return web.json_response(status(409, "Conflict", msg), status=409)
        return web.json_response(_store_lease((ns, name), body))

    def _store_lease(key: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "coordination.k8s.io/v1", "Lease"
        obj["metadata"]["namespace"] = key[0]
        obj["metadata"]["resourceVersion"] = store._next()
        obj["metadata"].setdefault("uid", f"uid-{key[1]}")
        store.leases[key] = obj
        return obj

    a = web.Application()
    for path in RESOURCES:
        a.router.add_get(path, list_or_watch)
    a.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", token_review)
    a.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", get_pod)
    a.router.add_post("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", lease)
    a.router.add_route("*", "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}", lease)
    return a


async def start(store: Store) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app(store), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


# --- the seed's benigno, in the shapes the API returns -----------------------------------------

PODS, SERVICES, SLICES = tuple(RESOURCES)
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl"
"""A token shaped like a projected service-account token (a JWT), for the TokenReview path."""
BENIGNO = "benigno_kong-mesh-app_svc_5000"
NS = "kong-mesh-app"


def pod(name: str, ip: str, version: str, meshed: bool = True) -> dict[str, Any]:
    containers = [{"name": "benigno", "image": "claudioacquaviva/benigno"}]
    init = [{"name": "meshc-sidecar", "image": "meshc", "restartPolicy": "Always"}] if meshed else []
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {"app": "benigno", "version": version, "pod-template-hash": "fd4567d95"},
        },
        "spec": {"serviceAccountName": "benigno", "containers": containers, "initContainers": init},
        "status": {"phase": "Running", "podIP": ip},
    }


SERVICE = {
    "metadata": {"name": "benigno", "namespace": NS, "labels": {"app": "benigno"}},
    "spec": {
        "type": "ClusterIP",
        "selector": {"app": "benigno"},
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP", "targetPort": 5000}],
    },
}


def endpoint_slice(*members: tuple[str, str, bool]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "benigno-abcde",
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": "benigno",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "benigno", "uid": "svc-uid"}],
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": name, "uid": f"uid-{name}"},
                "nodeName": "node-1",
            }
            for name, ip, ready in members
        ],
    }


def tokens(store: Store) -> None:
    store.tokens["good"] = {
        "username": f"system:serviceaccount:{NS}:benigno",
        "uid": "sa-uid",
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"],
        "extra": {
            "authentication.kubernetes.io/pod-name": ["benigno-v1-a"],
            "authentication.kubernetes.io/pod-uid": ["uid-benigno-v1-a"],
        },
        "audiences": ["meshc"],
    }
    store.tokens["other-audience"] = {**store.tokens["good"], "audiences": ["https://kubernetes.default.svc"]}
    store.tokens["unbound"] = {**store.tokens["good"], "extra": {}}
    store.tokens["user"] = {**store.tokens["good"], "username": "alice"}
    store.tokens[JWT] = store.tokens["good"]
