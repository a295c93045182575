"""MeshGateway certificates in bundles: files and Kubernetes Secrets are read (by name, never key
material), inline data and bad Secret names get W1005 and stay out of the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compiler.pipeline import compile_dir

CASE = Path(__file__).parent / "fixtures" / "bad" / "w1005-gateway-certificate-inline"

GATEWAY = """\
apiVersion: kuma.io/v1alpha1
kind: MeshGateway
mesh: default
metadata: {name: edge}
spec:
  selectors: [{match: {kuma.io/service: edge-gateway}}]
  conf:
    listeners:
      - port: 8443
        protocol: HTTPS
        tls:
          mode: TERMINATE
          certificates:
%s
"""


def _compile(tmp_path: Path, certs: list[str]) -> tuple[Any, list[str]]:
    repo = tmp_path / "repo"
    shutil.copytree(CASE, repo)
    (repo / "expected.txt").unlink()
    (repo / "gateway.yaml").write_text(GATEWAY % "\n".join(f"            - {c}" for c in certs))
    res = compile_dir(repo)
    codes = [d.code for d in res.diagnostics]
    gateways = [
        json.loads(v)["gateway"] for v in res.bundles.values() if json.loads(v).get("gateway") is not None
    ]
    return gateways, codes


def test_secret_and_file_certificates_are_read_in_order(tmp_path: Path) -> None:
    gateways, codes = _compile(
        tmp_path, ["{secret: edge-tls}", "{file: /etc/meshc/b.pem}", "{secret: api.example-tls}"]
    )
    assert codes == []
    [gw] = gateways
    assert gw["listeners"][0]["certificates"] == [
        {"secret": "edge-tls"},
        "/etc/meshc/b.pem",
        {"secret": "api.example-tls"},
    ]


def test_inline_certificates_and_bad_secret_names_are_w1005(tmp_path: Path) -> None:
    gateways, codes = _compile(
        tmp_path,
        ['{inlineString: "-----BEGIN CERTIFICATE-----"}', "{secret: ../etc}", "{secret: edge-tls}"],
    )
    assert codes == ["W1005", "W1005"]
    [gw] = gateways
    assert gw["listeners"][0]["certificates"] == [{"secret": "edge-tls"}]  # no key material, no path escape


def test_the_bundle_refuses_a_secret_name_that_leaves_the_dir() -> None:
    import pydantic
    import pytest

    from runtime.bundle import GatewayCertificate

    for bad in ("../etc", "a/b", "", "-x", "A"):
        with pytest.raises(pydantic.ValidationError):
            GatewayCertificate(secret=bad)
    assert GatewayCertificate(secret="edge.example-tls").secret == "edge.example-tls"
