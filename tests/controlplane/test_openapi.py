"""The API's one table of endpoints: every route the control plane serves is documented."""

from __future__ import annotations

from pathlib import Path

from cp_harness import REPO
from openapi_spec_validator import validate

from compiler.controlplane.api import make_app
from compiler.controlplane.openapi import ENDPOINTS, openapi_document
from compiler.controlplane.server import Config, ControlPlane


def test_every_served_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    cp = ControlPlane(Config(policy_dir=REPO / "policies", out=tmp_path / "out", state_dir=tmp_path / "st"))
    app = make_app(cp)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(e.method, e.path) for e in ENDPOINTS}
    assert served == documented


def test_the_document_is_valid_openapi_with_the_protocol_models() -> None:
    doc = openapi_document()
    validate(doc)
    schemas = doc["components"]["schemas"]
    for model in ("Registration", "RegistrationReply", "Heartbeat", "CertificateRequest", "CertificateReply"):
        assert model in schemas
    reg = doc["paths"]["/api/v1/register"]["post"]
    assert reg["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Registration"
    }
    assert "admin_address" in schemas["Registration"]["required"]
