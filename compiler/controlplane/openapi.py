"""The control plane's API described once: the OpenAPI 3.1 document and the ``/api/v1/`` index.

The data plane protocol's bodies are the pydantic models of ``runtime.protocol`` (their JSON
Schema is generated, so it cannot drift from what the handlers parse); the JSON views get a
schema of the keys their handlers promise. A test checks that every route the app serves is in
this table and that live answers validate against the schemas given here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from runtime.protocol import (
    CertificateReply,
    CertificateRequest,
    Heartbeat,
    PieceRequest,
    Registration,
    RegistrationReply,
)

__all__ = ["ENDPOINTS", "Endpoint", "index", "openapi_document"]

JsonSchema = dict[str, Any]


def _obj(*required: str, **props: JsonSchema) -> JsonSchema:
    schema: JsonSchema = {"type": "object", "required": list(required)}
    if props:
        schema["properties"] = props
    return schema


_NULLABLE_STR: JsonSchema = {"type": ["string", "null"]}
_ROW = _obj(
    "instance",
    "service",
    "mesh",
    "kind",
    "state",
    "status",
    "slots",
    "digest",
    "lag_s",
    state={"enum": ["Online", "Offline"]},
    status={"enum": ["SYNCED", "STALE", "NOT SENT"]},
    lag_s={"type": ["number", "null"], "description": "Seconds its oldest unacknowledged change waits."},
    last_lag_s={"type": ["number", "null"], "description": "Change to ACK, for its last ACK."},
    pieces_formats={
        "type": ["array", "null"],
        "items": {"type": "integer"},
        "description": "The mesh manifest formats it registered as running (null: none declared, format 1).",
    },
    pieces_format={
        "type": ["integer", "null"],
        "description": "The manifest format it is served (null: whole mesh bundles, or no format in common).",
    },
)
_STATUS = _obj(
    "release",
    "commit",
    "digests",
    "manifests",
    "dataplanes",
    "slowest",
    release=_NULLABLE_STR,
    commit=_NULLABLE_STR,
    digests={"type": "object", "additionalProperties": {"type": "string"}},
    manifests={
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Mesh -> the digest of its bundle's manifest: what a data plane taking pieces runs.",
    },
    manifest_formats={
        "type": "object",
        "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
        "description": "Mesh -> manifest format -> its digest, of the formats made for some data plane.",
    },
    dataplanes={"type": "array", "items": _ROW},
    slowest={
        "type": "array",
        "items": _obj("instance", "lag_s"),
        "description": "Up to 5 data planes, the most lagging first (waiting now, else by last ACK).",
    },
)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str
    response: JsonSchema | type[BaseModel]
    request: type[BaseModel] | None = None
    tag: str = "views"
    errors: tuple[int, ...] = ()


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/v1/register",
        "Register a data plane (bootstrap token or current certificate); get its certificate and "
        "the push-signing key.",
        RegistrationReply,
        Registration,
        "data plane protocol",
        (400, 401, 403),
    ),
    Endpoint(
        "POST",
        "/api/v1/heartbeat",
        "Report liveness and the running digests; 404 means register again.",
        _obj("ok"),
        Heartbeat,
        "data plane protocol",
        (400, 404),
    ),
    Endpoint(
        "POST",
        "/api/v1/deregister",
        'Leave after draining (body {"instance": NAME}).',
        _obj("ok"),
        None,
        "data plane protocol",
        (400, 401, 403, 404),
    ),
    Endpoint(
        "POST",
        "/api/v1/certificate",
        "Renew the instance's mesh certificate (authenticated by the current one).",
        CertificateReply,
        CertificateRequest,
        "data plane protocol",
        (400, 401, 403, 404),
    ),
    Endpoint(
        "POST",
        "/api/v1/pieces",
        "Mesh pieces by digest, on demand (authenticated like a heartbeat); newline-delimited pieces.",
        {"type": "string", "description": "application/x-ndjson: one piece's canonical JSON a line"},
        PieceRequest,
        "data plane protocol",
        (400, 401, 403, 404),
    ),
    Endpoint("GET", "/api/v1/", "This index: every endpoint with its method and summary.", _obj("endpoints")),
    Endpoint("GET", "/api/v1/openapi.json", "This API as an OpenAPI 3.1 document.", _obj("openapi", "paths")),
    Endpoint("GET", "/api/v1/status", "Per data plane sync state (what `meshc status` prints).", _STATUS),
    Endpoint(
        "GET",
        "/api/v1/overview",
        "Meshes, counts of data planes online and synced, the current release and its source.",
        _obj("meshes", "release", "dataplanes", "online", "synced", "last_compile_ok"),
    ),
    Endpoint(
        "GET",
        "/api/v1/services",
        "The catalog of the current release with instances per subset.",
        _obj("services", services={"type": "array", "items": _obj("mesh", "service", "subsets")}),
    ),
    Endpoint(
        "GET",
        "/api/v1/policies",
        "The policies of the current release: kind, name, file:line and the bundles each shapes.",
        _obj(
            "policies",
            policies={"type": "array", "items": _obj("kind", "name", "file", "line", "bundles")},
        ),
    ),
    Endpoint(
        "GET",
        "/api/v1/diagnostics",
        "The last compile's diagnostics and the recent compile history.",
        _obj("last", "history"),
    ),
    Endpoint(
        "GET",
        "/api/v1/traffic",
        "Configured routes with the split observed since the current release (scraped from sidecars).",
        _obj("routes"),
    ),
    Endpoint(
        "GET",
        "/api/v1/release",
        "The current release: commit, bundle digests and provenance; 404 before the first compile.",
        _obj("id", "bundles"),
        errors=(404,),
    ),
    Endpoint("GET", "/api/v1/rollouts", "Recent pushes: what changed, to whom, ACK/NACK.", _obj("rollouts")),
    Endpoint(
        "GET",
        "/api/v1/replicas",
        "The control plane replicas sharing the store, the leader (and its fencing token), this replica.",
        _obj("store", "replica", "leading", "leader", "replicas"),
    ),
    Endpoint(
        "GET",
        "/api/v1/canaries",
        "Every Canary of the current release: its steps, the step and weight it is at, its phase, "
        "the last analysis run and its history.",
        _obj("canaries"),
    ),
    Endpoint(
        "POST",
        "/api/v1/canaries/{mesh}/{name}/{action}",
        "Act on a Canary: `promote` (past the pause or hold it waits at), `abort` (back to the "
        "weights in Git), `retry` (start an ended canary again).",
        _obj("message", "canary"),
        errors=(400, 404, 409),
    ),
    Endpoint(
        "GET",
        "/api/v1/dashboard",
        "Every view at once (what the GUI renders).",
        _obj(
            "overview", "services", "traffic", "dataplanes", "policies", "diagnostics", "rollouts", "canaries"
        ),
    ),
    Endpoint(
        "GET",
        "/api/v1/dashboard/fragments",
        "The GUI's sections as HTML fragments (its live refresh).",
        {"type": "object", "additionalProperties": {"type": "string"}},
    ),
    Endpoint("GET", "/gui", "The dashboard (HTML).", {"type": "string"}, tag="gui"),
    Endpoint("GET", "/gui/", "The dashboard (HTML).", {"type": "string"}, tag="gui"),
    Endpoint("GET", "/favicon.ico", "The dashboard's icon (SVG).", {"type": "string"}, tag="gui"),
    Endpoint("GET", "/metrics", "Prometheus metrics of the control plane.", {"type": "string"}, tag="ops"),
    Endpoint("GET", "/healthz", "Liveness and the current release id.", _obj("ok", "release"), tag="ops"),
    Endpoint("GET", "/", "Redirects to /gui.", {"type": "string"}, tag="gui"),
)

_MEDIA = {
    "/gui": "text/html",
    "/gui/": "text/html",
    "/": "text/html",
    "/metrics": "text/plain",
    "/favicon.ico": "image/svg+xml",
}


def _ref(model: type[BaseModel], components: dict[str, JsonSchema]) -> JsonSchema:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schema(s: JsonSchema | type[BaseModel], components: dict[str, JsonSchema]) -> JsonSchema:
    return _ref(s, components) if isinstance(s, type) else s


def _operation_id(ep: Endpoint) -> str:
    base = re.sub(r"[{}]", "", ep.path.strip("/")).replace("/", "_").replace(".", "_") or "root"
    if ep.path.endswith("/") and ep.path != "/":
        base += "_index"
    return f"{ep.method.lower()}_{base}"


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    components: dict[str, JsonSchema] = {}
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        media = _MEDIA.get(ep.path, "application/json")
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {media: {"schema": _schema(ep.response, components)}}}
        }
        for code in ep.errors:
            responses[str(code)] = {
                "description": "refused; the body says why",
                "content": {"application/json": {"schema": _obj("error")}},
            }
        op: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": _operation_id(ep),
            "tags": [ep.tag],
            "responses": responses,
        }
        if ep.path == "/":
            op["responses"] = {"302": {"description": "to /gui"}}
        params = re.findall(r"{(\w+)}", ep.path)
        if params:
            op["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in params
            ]
        if ep.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(ep.request, components)}},
            }
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshc control plane API",
            "version": version,
            "description": "The data plane protocol (register, heartbeat, deregister, certificate) "
            "and the JSON views behind `meshc status` and the dashboard. When the control plane "
            "runs with --token, every endpoint but the protocol and /healthz needs "
            "`Authorization: Bearer TOKEN`.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }


def index() -> dict[str, Any]:
    return {
        "endpoints": [
            {"method": ep.method, "path": ep.path, "summary": ep.summary, "tag": ep.tag} for ep in ENDPOINTS
        ],
        "openapi": "/api/v1/openapi.json",
    }
