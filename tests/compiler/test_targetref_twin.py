"""``docs/examples/targetref/``: the seed scenario of ``policies/`` in Kuma's targetRef dialect."""

from __future__ import annotations

from pathlib import Path

from compiler.pipeline import compile_dir

REPO = Path(__file__).resolve().parents[2]
LEGACY = REPO / "policies"
TWIN = REPO / "docs" / "examples" / "targetref"
CATALOG = ("mesh.yaml", "benigno.yaml", "magnanimo.yaml", "gateway.yaml")


def _body(path: Path) -> str:
    """The file without its editor modeline (the schema path differs by folder depth)."""
    return "".join(line for line in path.read_text().splitlines(True) if "yaml-language-server" not in line)


def test_the_twin_has_the_same_catalog() -> None:
    for name in CATALOG:
        assert _body(TWIN / name) == _body(LEGACY / name), name


def test_every_legacy_policy_has_its_twin() -> None:
    legacy = {p.name for p in LEGACY.glob("*.yaml")} - set(CATALOG)
    twin = {p.name for p in TWIN.glob("*.yaml")} - set(CATALOG)
    assert legacy == twin


def test_the_twin_validates() -> None:
    r = compile_dir(TWIN)
    assert not r.errors, [(d.file, d.code, d.message) for d in r.diagnostics if d.severity == "error"]
    assert not r.diagnostics, [(d.file, d.code, d.message) for d in r.diagnostics]


def test_the_twin_compiles_to_the_same_bundles() -> None:
    legacy, twin = compile_dir(LEGACY), compile_dir(TWIN)
    assert legacy.digests and twin.digests == legacy.digests
