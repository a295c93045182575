"""Each kind's compiled bundle fragment, held to a checked-in golden JSON.

``cases/<Kind>.yaml`` holds documents of one kind (several, to exercise ranking, wildcards and
defaults); the case repo is that file plus ``_services.yaml``, and ``_mesh.yaml`` unless the case
declares its own Mesh. ``golden/<Kind>.json`` holds the part of the bundles that kind fills (its
``fragment``) and the digest of every bundle of the case repo, so a refactor that changes one byte
of any bundle fails here even where the fragment looks the same.

After a deliberate change to what a kind compiles to, regenerate with
``MESHC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/compiler/kinds`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from compiler.kinds import REGISTRY
from compiler.pipeline import compile_dir

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
GOLDEN = HERE / "golden"
UPDATE = os.environ.get("MESHC_UPDATE_GOLDEN") == "1"
KINDS = sorted(p.stem for p in CASES.glob("*.yaml") if not p.name.startswith("_"))


def _fragment(kind: str, bundles: dict[str, Any]) -> Any:
    """What ``kind`` fills in the bundles, keyed by bundle key."""
    kdef = REGISTRY[kind]
    mesh = {k: v for k, v in bundles.items() if v["type"] == "mesh"}
    services = {k: v for k, v in bundles.items() if v["type"] == "service"}
    if kdef.direction == "outbound":
        field = kdef.bundle_field
        out = {k: {d: x[field] for d, x in v["destinations"].items()} for k, v in mesh.items()}
        out.update({k: {d: x[field] for d, x in v["outbound"].items()} for k, v in services.items()})
        return out
    if kdef.direction == "inbound":
        return {k: v["inbound"][kdef.bundle_field] for k, v in services.items()}
    if kind == "MeshAccessLog":
        out = {k: {d: x["traffic_log"] for d, x in v["destinations"].items()} for k, v in mesh.items()}
        for k, v in services.items():
            out[k] = {d: x["traffic_log"] for d, x in v["outbound"].items()}
            out[k]["<inbound>"] = v["inbound"].get("traffic_log", [])
        return out
    if kind == "MeshTrace":
        return {k: v.get("tracing") for k, v in bundles.items()}  # a service bundle leaves out None
    if kind == "Mesh":
        return {k: {f: v[f] for f in ("logging", "mtls", "passthrough", "tracing")} for k, v in mesh.items()}
    if kind == "Service":
        return {k: v["services"] for k, v in mesh.items()}
    return {k: v["gateway"] for k, v in services.items() if v["gateway"] is not None}


def _compile_case(kind: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    repo = tmp_path / kind
    repo.mkdir()
    text = (CASES / f"{kind}.yaml").read_text()
    shutil.copy(CASES / f"{kind}.yaml", repo / "case.yaml")
    shutil.copy(CASES / "_services.yaml", repo / "services.yaml")
    if "kind: Mesh\n" not in text:
        shutil.copy(CASES / "_mesh.yaml", repo / "mesh.yaml")
    res = compile_dir(repo)
    assert res.errors == 0, [d.message for d in res.diagnostics]
    assert res.warnings == 0, [d.message for d in res.diagnostics]
    assert res.bundles, "the case compiled to no bundle"
    return {k: json.loads(v) for k, v in res.bundles.items()}, res.digests


def test_every_compiled_kind_has_a_case() -> None:
    compiled = {k for k, d in REGISTRY.items() if d.bundle_field is not None}
    compiled |= {"Mesh", "Service", "MeshGateway", "MeshGatewayRoute"}  # mesh and gateway parts
    assert compiled <= set(KINDS), f"kinds with no golden case: {sorted(compiled - set(KINDS))}"


@pytest.mark.parametrize("kind", KINDS)
def test_kind_fragment_matches_golden(kind: str, tmp_path: Path) -> None:
    bundles, digests = _compile_case(kind, tmp_path)
    got = {"fragment": _fragment(kind, bundles), "digests": dict(sorted(digests.items()))}
    path = GOLDEN / f"{kind}.json"
    if UPDATE:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.exists(), f"no golden for {kind}: run with MESHC_UPDATE_GOLDEN=1 and review it"
    want = json.loads(path.read_text())
    assert got == want
    assert want["fragment"], f"{kind}'s fragment is empty: the case exercises nothing"
