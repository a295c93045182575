"""The admin API of a data plane (loopback by default; DESIGN §5).

``PUT /bundle``     body = the bundle's exact bytes; headers ``X-Meshc-Digest`` (required),
                    ``X-Meshc-Generation`` (default 0) and ``X-Meshc-Bundle-Role`` (``mesh`` or
                    ``service``; taken from the bundle when absent). 200 ``{"ack": digest}`` or
                    ``{"nack": reason}`` with 400 (bad JSON, schema, format, digest, role, cannot be
                    compiled), 409 (stale generation), 413 (oversize) or 500 (state dir).
                    With ``X-Meshc-Pieces: 1`` (mesh slot): a manifest and pieces
                    (``runtime.pieces``); 422 ``{"nack", "missing": [digest]}`` when it lacks some.
``PUT /endpoints``  body = ``protocol.EndpointSet``; 200 ``{"ack": sha256 of the body}`` or NACK.
                    Both need ``X-Meshc-Signature`` (Ed25519 by the trusted control plane key over
                    digest, generation and this service; DESIGN §6) unless ``--insecure-admin``:
                    403 when unsigned, forged or signed for another service; 409 when older.
``GET /ready``      200 when both bundles are loaded and the process is not draining, else 503.
``GET /config``     running bundles (digest, generation, content), endpoints, host states.
``GET /metrics``    Prometheus text.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from runtime._http import AdminRequest, AdminResponse, BodyTooLarge
from runtime.bundle import MAX_BUNDLE_BYTES
from runtime.metrics import CONTENT_TYPE, Metrics
from runtime.protocol import HDR_BUNDLE_ROLE, HDR_DIGEST, HDR_GENERATION, HDR_PIECES, HDR_SIGNATURE
from runtime.pushes import Pushes

__all__ = ["AdminView", "handle"]


class AdminView(Protocol):
    """What the admin API reads and writes (``runtime.server.DataPlane``), named here so that
    this module does not import the server that serves it."""

    @property
    def pushes(self) -> Pushes: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...

    def config(self) -> dict[str, Any]: ...


_MAX_ENDPOINTS = 16 * 1024 * 1024


def _json(status: int, body: Any) -> AdminResponse:
    return AdminResponse(status, json.dumps(body).encode())


async def _read_capped(request: AdminRequest, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (read and dropped up to 4x the limit,
    so the client sees the NACK instead of a connection reset in the middle of its upload)."""
    try:
        return await request.read(limit)
    except BodyTooLarge:
        return None


async def handle(plane: AdminView, request: AdminRequest) -> AdminResponse:
    path, method = request.path, request.method
    if path == "/bundle" and method == "PUT":
        body = await _read_capped(request, MAX_BUNDLE_BYTES)
        if body is None:
            status, reply = plane.pushes.nack(
                request.headers.get(HDR_BUNDLE_ROLE.lower()) or "bundle",
                413,
                f"bundle is over the {MAX_BUNDLE_BYTES} byte limit",
            )
            resp = _json(status, reply)
            resp.close = True
            return resp
        try:
            generation = int(request.headers.get(HDR_GENERATION.lower(), "0"))
        except ValueError:
            status, reply = plane.pushes.nack("bundle", 400, f"{HDR_GENERATION} is not an integer")
            return _json(status, reply)
        status, reply = await plane.pushes.push_bundle(
            body,
            request.headers.get(HDR_DIGEST.lower()),
            generation,
            request.headers.get(HDR_BUNDLE_ROLE.lower()),
            request.headers.get(HDR_SIGNATURE.lower()),
            pieces=request.headers.get(HDR_PIECES.lower()) == "1",
        )
        return _json(status, reply)
    if path == "/endpoints" and method == "PUT":
        body = await _read_capped(request, _MAX_ENDPOINTS)
        if body is None:
            status, reply = plane.pushes.nack(
                "endpoints", 413, f"endpoint set is over the {_MAX_ENDPOINTS} byte limit"
            )
            resp = _json(status, reply)
            resp.close = True
            return resp
        gen_header = request.headers.get(HDR_GENERATION.lower())
        try:
            gen = int(gen_header) if gen_header is not None else None
        except ValueError:
            why = f"{HDR_GENERATION} is not an integer"
            status, reply = plane.pushes.nack("endpoints", 400, why)
            return _json(status, reply)
        status, reply = await plane.pushes.push_endpoints(
            body, gen, request.headers.get(HDR_SIGNATURE.lower())
        )
        return _json(status, reply)
    if method not in ("GET", "HEAD"):
        return _json(405, {"error": f"{method} {path} is not supported"})
    if path == "/live":
        return _json(200, {"live": True})  # the loop answers: what a liveness probe asks
    if path == "/ready":
        ready = plane.ready
        return _json(200 if ready else 503, {"ready": ready, "draining": plane.draining})
    if path == "/config":
        return _json(200, plane.config())
    if path == "/metrics":
        return AdminResponse(200, plane.metrics.render(), CONTENT_TYPE)
    return _json(404, {"error": f"no such admin path {path}"})
