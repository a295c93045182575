"""Control-plane <-> data-plane protocol messages (DESIGN §5): HTTP/JSON.

Data planes call the control plane (register, heartbeat, deregister); the control plane calls each
data plane's admin API (``PUT /bundle``, ``PUT /endpoints``). Both sides import these models, so
this module depends on pydantic and the standard library only.

Data plane -> control plane (``runtime/registration.py``; ``--control-plane URL``):

* ``POST {URL}/api/v1/register`` body ``Registration`` -> 200 ``RegistrationReply``. The data
  plane sends the instance name it was given before (kept in its state dir) so a restart keeps it.
* the registration carries ``boot_id``, random per process start; every push is signed for it.
* every ``heartbeat_interval_ms``: ``POST {URL}/api/v1/heartbeat`` body ``Heartbeat`` (running
  digest and generation of every slot, endpoints included; the boot id), authenticated like a
  registration -> 200; a 404 (unknown instance or another boot) or 401/403 makes the data plane
  register again.
* on a clean exit, after draining: ``POST {URL}/api/v1/deregister`` body ``{"instance": name}``.
* before its certificate expires (at 2/3 of its lifetime): ``POST {URL}/api/v1/certificate`` body
  ``CertificateRequest`` -> 200 ``CertificateReply`` (404: unknown instance, register again).
* authentication (DESIGN §6) of register, heartbeat, certificate and deregister: the bootstrap
  token bound to (mesh, service, expiry) (``Authorization: Bearer <token>``, ``meshc token --mesh M
  --service NAME``) or the current certificate:
  ``HDR_CLIENT_CERT`` (base64 DER) and ``HDR_PROOF`` (``<unix seconds>.<hex ECDSA signature over
  auth_message(...)>`` by the certificate's key). The identity comes from the authenticated
  service, never from the CSR's text; a data plane's key never leaves its process.
* a control plane that is down or answers an error is retried with jittered exponential backoff
  (0.25 s doubling to 30 s); the data plane keeps serving its last-known-good state meanwhile.

Control plane -> data plane admin API (``runtime/admin.py``, loopback by default):

* ``PUT /bundle``: body = the bundle's exact bytes; ``HDR_DIGEST`` required, ``HDR_GENERATION``
  (default 0), ``HDR_BUNDLE_ROLE`` (``mesh``/``service``, else taken from the bundle's ``type``).
  A data plane that registered with ``pieces`` gets its mesh slot as a delta push instead
  (``HDR_PIECES: 1``, role ``mesh``): the body is newline-delimited, the mesh manifest's exact
  bytes and then the pieces it lacks (``runtime.pieces``); ``HDR_DIGEST`` (signed) is the
  manifest's sha256. The manifest's format is the newest of its ``pieces_formats`` that the
  control plane makes (format 1 when it declared none: data planes from before format 2).
  It swaps to the whole set at once or NACKs: 400 for a piece the manifest does not name
  (forged, mismatched), 422 ``Nack(nack, missing=[digests])`` for pieces it needs and neither
  holds nor was sent (the control plane sends them again).
  200 ``Ack(ack=digest)`` or ``Nack(nack=reason)`` with 400 (not JSON, schema, unknown format,
  digest mismatch, role mismatch, another service's bundle, cannot be compiled), 409 (generation
  older than the running one for that slot), 413 (over ``bundle.MAX_BUNDLE_BYTES``) or 500 (state
  dir not writable). Re-pushing the running digest is acknowledged again and changes nothing.
* ``PUT /endpoints``: body ``EndpointSet`` -> 200 ``Ack(ack=sha256 hex of the body)`` or a NACK
  (400 schema or bad address, 409 older generation, 413 over 16 MiB). A data plane that
  registered with ``endpoint_deltas`` gets per-service sets (``runtime.endpoints``): a sidecar
  only the services in its scope (``scoped``: the others are fetched on demand), and after the
  first push only the services that changed over the set it runs (``base``, ``removed``); the
  body names the resulting set's ``digest`` (``endpoint_set_digest``, signed with the body),
  which it checks. 422 ``Nack``: it does not run ``base`` (the control plane sends the whole set).
* with a trusted control plane key (from registration, ``--trust-key``, or kept in the state dir)
  every push carries ``HDR_SIGNATURE``: Ed25519 over ``push_message(target, slot, digest,
  generation)``, the target being (mesh, service, instance, boot id) of this data plane in this
  boot (for endpoints the digest is the sha256 hex of the body). Unsigned, forged, or signed for
  another mesh, service, instance, boot or slot: 403; older generations: 409. A data plane with a
  control plane refuses every push (403) until it has registered in this boot.
* ``GET /ready`` (200 once both bundles are loaded and not draining, else 503), ``GET /config``,
  ``GET /metrics``.

On demand, data plane -> control plane: ``POST {URL}/api/v1/pieces`` body ``PieceRequest``,
authenticated like a heartbeat -> 200 newline-delimited pieces (each checked against the digest
asked for), 404 when the control plane holds none of them. A scoped data plane asks for the
destination piece of a service it lacks at its first request there (Envoy's on-demand CDS).
``PieceRequest.endpoints`` names services whose endpoints a scoped data plane lacks: they join
its scope, and the control plane answers once the data plane has ACKed the endpoint push that
carries them (200, with the pieces asked for if any; 504 when that took too long).
The data plane keeps the services it asked for (in its state dir) and declares them in every
registration and heartbeat (``endpoints_on_demand``, Envoy's resource subscriptions on a new
stream): a control plane that never saw it ask (another replica, a restart) keeps them in its
scope. With ``running_endpoints`` (the set it runs, Envoy's ``initial_resource_versions``) or a
heartbeat whose running digest the control plane can rebuild, the next push is a delta over
that set; a delta is only ever sent over a set the data plane ACKed or reported running.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "HDR_BUNDLE_ROLE",
    "HDR_CLIENT_CERT",
    "HDR_DIGEST",
    "HDR_GENERATION",
    "HDR_PIECES",
    "HDR_PROOF",
    "HDR_SIGNATURE",
    "MAX_ON_DEMAND",
    "Ack",
    "CertificateReply",
    "CertificateRequest",
    "Endpoint",
    "EndpointSet",
    "Heartbeat",
    "Nack",
    "PieceRequest",
    "PushTarget",
    "Registration",
    "RegistrationReply",
    "SignedEndpoints",
    "auth_message",
    "endpoint_set_digest",
    "endpoints_digest",
    "push_message",
    "service_endpoints_digest",
    "spiffe_uri",
    "tag_uri",
]

HDR_DIGEST = "X-Meshc-Digest"
"""sha256 hex of the pushed body; the data plane recomputes it."""
HDR_GENERATION = "X-Meshc-Generation"
"""Monotonic push generation; an older one than the last accepted is a replay."""
HDR_SIGNATURE = "X-Meshc-Signature"
"""Ed25519 signature (hex) over ``push_message(target, slot, digest, generation)``."""
HDR_CLIENT_CERT = "X-Meshc-Client-Cert"
"""A data plane's current certificate (base64 DER) authenticating a control-plane call."""
HDR_PROOF = "X-Meshc-Proof"
"""``<unix seconds>.<hex signature>``: the certificate's key signed ``auth_message``."""
HDR_BUNDLE_ROLE = "X-Meshc-Bundle-Role"
"""``mesh`` or ``service``: which slot of the data plane the pushed bundle fills."""
MAX_ON_DEMAND = 4096
"""The most services a registration or heartbeat declares as fetched on demand."""
HDR_PIECES = "X-Meshc-Pieces"
"""``1``: the mesh slot's push is a manifest and pieces (``runtime.pieces``), not a bundle."""


@dataclass(frozen=True)
class PushTarget:
    """Who a push is for: one instance of one service of one mesh, in one boot of its process.

    ``boot`` is a random value the data plane draws at start and sends in its registration (and
    heartbeats): a push signed for it cannot be replayed into another mesh, another instance, or
    the same instance after a restart (docs/security.md)."""

    mesh: str
    service: str
    instance: str
    boot: str


def push_message(target: PushTarget, slot: str, digest: str, generation: int) -> bytes:
    """The exact bytes a push signature covers (DESIGN §6): the target (mesh, service, instance,
    boot), the slot (endpoints, mesh, service), the body's digest and the generation."""
    t = target
    fields = ("meshc-push/v2", t.mesh, t.service, t.instance, t.boot, slot, digest, str(generation))
    if any("\n" in f for f in fields):
        raise ValueError("a push target field holds a newline")
    return "\n".join(fields).encode()


def endpoints_digest(services: Mapping[str, Sequence[Endpoint]]) -> str:
    """The content digest of an endpoint set (generation aside): what a heartbeat reports as the
    running ``endpoints`` slot and what the control plane wants it to be."""
    doc = {k: [e.model_dump(mode="json") for e in v] for k, v in sorted(services.items())}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def service_endpoints_digest(service: str, endpoints: Sequence[Endpoint]) -> str:
    """The content digest of one service's endpoints: what a per-service set is built from."""
    doc = {"endpoints": [e.model_dump(mode="json") for e in endpoints], "service": service}
    return hashlib.sha256(_canonical(doc)).hexdigest()


def endpoint_set_digest(digests: Mapping[str, str], scoped: bool) -> str:
    """The digest of a per-service endpoint set from its services' digests (``scoped``: the
    services not named are not held, rather than without endpoints): what a data plane that
    takes ``endpoint_deltas`` reports as its running ``endpoints`` slot."""
    return hashlib.sha256(
        _canonical({"scoped": scoped, "services": dict(sorted(digests.items()))})
    ).hexdigest()


def auth_message(timestamp: int, path: str, body_sha256: str) -> bytes:
    """The exact bytes a data plane signs to authenticate a call with its certificate's key."""
    return f"meshc-auth/v1\n{timestamp}\n{path}\n{body_sha256}".encode()


def spiffe_uri(mesh: str, service: str) -> str:
    """The URI SAN that names a data plane's service in its certificate."""
    return f"spiffe://{mesh}/{service}"


def tag_uri(name: str, value: str) -> str:
    """The URI SAN for one of the instance's tags (Kuma's ``kuma://<tag>/<value>``)."""
    return f"kuma://{name}/{value}"


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Endpoint(_Msg):
    address: str = Field(description="host:port of the instance's inbound listener.")
    tags: dict[str, str] = Field(default_factory=dict)
    healthy: bool = True


class EndpointSet(_Msg):
    """Body of ``PUT /endpoints``: every instance of every service this data plane routes to.

    The fields after ``services`` are for data planes that registered with ``endpoint_deltas``
    (left out of the JSON otherwise, so older data planes get the bytes they always got)."""

    generation: int
    services: dict[str, list[Endpoint]]
    scoped: bool = Field(
        default=False,
        description="Only the services named are held; a request to another one fetches its endpoints.",
    )
    digest: str | None = Field(
        default=None,
        description="endpoint_set_digest of the set after this push (per-service form); checked.",
    )
    base: str | None = Field(
        default=None,
        description="A delta: only the changed services, over the running set of this digest.",
    )
    removed: list[str] = Field(default_factory=list, description="A delta: services no longer in the set.")

    @model_serializer(mode="wrap")
    def _unused_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The per-service fields are left out when unused: the JSON older data planes know."""
        return _without_empty(handler(self), "scoped", "digest", "base", "removed")


def _without_empty(out: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``out`` without those of ``keys`` that are unset: the JSON that peers which predate them
    know (they forbid fields they do not know)."""
    for key in keys:
        if key in out and not out[key]:
            del out[key]
    return out


class SignedEndpoints(_Msg):
    """The endpoint set a data plane runs, exactly as it was pushed, with the push's signature.

    A control plane started without its registry learns the mesh's last live set from it instead
    of holding endpoint pushes until every data plane is back: its own signature (over this
    data plane's target, the body's sha256 and the generation inside) proves the set is one it
    sent, so a data plane cannot make others route to addresses of its choosing."""

    body: str = Field(description="The pushed EndpointSet JSON, byte for byte.")
    signature: str = Field(description="The push's X-Meshc-Signature (hex).")
    assembled: str | None = Field(
        default=None,
        description=(
            "When the body was a delta: the whole set it made (EndpointSet JSON), whose "
            "endpoint_set_digest is the signed body's digest."
        ),
    )


class Registration(_Msg):
    """Body of ``POST /api/v1/register``."""

    service: str
    tags: dict[str, str] = Field(default_factory=dict)
    kind: Literal["sidecar", "gateway"] = "sidecar"
    inbound_address: str | None = None
    admin_address: str
    mesh: str = "default"
    instance: str | None = Field(default=None, description="Stable instance name; derived when absent.")
    csr_pem: str | None = None
    boot_id: str | None = Field(
        default=None,
        description="Random per process start; every push is signed for it (none: pushes cannot verify).",
    )
    pieces: bool = Field(
        default=False, description="Takes its mesh slot as a manifest and pieces (delta pushes)."
    )
    reachable_services: list[str] | None = Field(
        default=None,
        description=(
            "Kuma's reachableServices: the destinations it calls besides those its policies name; "
            "the others come on demand (with pieces)."
        ),
    )
    running_endpoints: SignedEndpoints | None = Field(
        default=None, description="The signed endpoint set this process runs, when it runs one."
    )
    endpoint_deltas: bool = Field(
        default=False,
        description=(
            "Takes endpoints per service: scoped (a sidecar: what it reaches, the rest on demand) "
            "and only what changed (runtime.endpoints)."
        ),
    )
    endpoints_on_demand: list[str] = Field(
        default_factory=list,
        max_length=MAX_ON_DEMAND,
        description=(
            "Services whose endpoints it fetched on demand: they stay in its scope with a control "
            "plane that never saw it ask (another replica, a restart). Left out when empty."
        ),
    )
    endpoints_running: str | None = Field(
        default=None,
        description=(
            "The running endpoint set's digest, as a heartbeat reports it (a set loaded from the "
            "state dir has no running_endpoints): a control plane that can rebuild that set "
            "sends a delta over it, or nothing. Left out when unset."
        ),
    )
    pieces_formats: list[int] | None = Field(
        default=None,
        description=(
            "With pieces: the mesh manifest formats it runs (runtime.pieces.FORMATS); the control "
            "plane serves the newest both speak. Absent: format 1 only (data planes from before)."
        ),
    )

    @model_serializer(mode="wrap")
    def _unset_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields a control plane from before them does not know are left out when unset."""
        out = _without_empty(handler(self), "endpoints_on_demand", "endpoints_running")
        if out.get("pieces_formats", 0) is None:
            del out["pieces_formats"]
        return out


class RegistrationReply(_Msg):
    instance: str
    heartbeat_interval_ms: int
    certificate_pem: str | None = None
    ca_pem: str | None = None
    signing_key: str | None = Field(default=None, description="Control plane's Ed25519 public key (hex).")


class CertificateRequest(_Msg):
    """Body of ``POST /api/v1/certificate``: a rotation, authenticated like a registration."""

    instance: str
    csr_pem: str


class CertificateReply(_Msg):
    certificate_pem: str
    ca_pem: str
    signing_key: str = Field(description="Control plane's Ed25519 public key (hex).")


class Heartbeat(_Msg):
    """Body of ``POST /api/v1/heartbeat``, authenticated like a registration: what the data plane
    runs, so that the control plane's status is what runs and not what it believes it sent."""

    instance: str
    running: dict[str, str] = Field(
        default_factory=dict,
        description="slot (endpoints|mesh|service) -> running digest (endpoints: endpoints_digest).",
    )
    generations: dict[str, int] = Field(
        default_factory=dict, description="slot -> generation of what runs (0: loaded from a file)."
    )
    endpoints_generation: int = 0
    boot_id: str | None = Field(default=None, description="As registered; another one makes it register.")
    endpoints_on_demand: list[str] = Field(
        default_factory=list,
        max_length=MAX_ON_DEMAND,
        description=(
            "As in the registration: a control plane that restarted from its saved registry (no "
            "registration again) keeps pushing these services' endpoints. Left out when empty."
        ),
    )

    @model_serializer(mode="wrap")
    def _unused_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_empty(handler(self), "endpoints_on_demand")


class Ack(_Msg):
    ack: str


class Nack(_Msg):
    nack: str
    missing: list[str] | None = Field(
        default=None, description="422: the piece digests a delta push needs and did not carry."
    )


class PieceRequest(_Msg):
    """Body of ``POST /api/v1/pieces``: pieces of the running manifest, by digest."""

    instance: str
    digests: list[str] = Field(max_length=1024)
    endpoints: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="Services whose endpoints it lacks: pushed to it before the answer.",
    )
