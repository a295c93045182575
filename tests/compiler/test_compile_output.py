"""``meshc compile``: canonical, content-addressed output that changes only where behaviour does.

Runs the real CLI on copies of ``policies/`` in temporary directories (outside any Git repo) and
reads what it wrote: ``out/bundles/<sha256>.json`` and ``out/releases/<id>.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from compiler.cli import main

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
BUNDLE_SCHEMA = REPO / "schemas" / "bundle" / "v1.schema.json"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def compile_to(policy_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["compile", str(policy_dir), "--out", str(out), "--format", "text"])
    return code, capsys.readouterr().out


def release(out: Path) -> dict[str, Any]:
    [path] = list((out / "releases").glob("*.json"))
    data: dict[str, Any] = json.loads(path.read_bytes())
    return data


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    dst = tmp_path / "policies"
    shutil.copytree(POLICIES, dst)
    return dst


def test_seed_policies_compile_clean(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = compile_to(policies, tmp_path / "out", capsys)
    assert code == 0, out
    rel = release(tmp_path / "out")
    assert sorted(rel["bundles"]) == [
        "default",
        "default/benigno",
        "default/edge-gateway",
        "default/magnanimo",
    ]
    assert rel["commit"] is None
    assert rel["format"] == 1


def test_two_compiles_are_byte_identical(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compile_to(policies, tmp_path / "a", capsys)[0] == 0
    assert compile_to(policies, tmp_path / "b", capsys)[0] == 0
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert a == b
    # Compiling again into the same directory verifies the existing files and changes nothing.
    assert compile_to(policies, tmp_path / "a", capsys)[0] == 0
    assert tree(tmp_path / "a") == a


def test_bundles_are_canonical_content_addressed_and_valid(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compile_to(policies, tmp_path / "out", capsys)[0] == 0
    schema = json.loads(BUNDLE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    rel = release(tmp_path / "out")
    files = sorted((tmp_path / "out" / "bundles").glob("*.json"))
    assert {p.stem for p in files} == set(rel["bundles"].values())
    for path in files:
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.stem
        bundle = json.loads(data)
        canonical = json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert data == canonical
        assert bundle["format"] == 1
        errors = sorted(validator.iter_errors(bundle), key=str)
        assert not errors, f"{path.name}: {errors[0].message} at {list(errors[0].absolute_path)}"
        # No provenance in a bundle: no file names, commits or lines.
        text = data.decode()
        assert ".yaml" not in text


def test_compile_with_errors_writes_nothing(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = policies / "traffic-route.yaml"
    route.write_text(route.read_text().replace("version: v2", "version: v3"))
    out = tmp_path / "out"
    code, text = compile_to(policies, out, capsys)
    assert code == 1
    assert "E2002" in text
    assert not out.exists() or not any(out.rglob("*"))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _move_to_subdir(p: Path) -> None:
    (p / "sub").mkdir()
    (p / "traffic-route.yaml").rename(p / "sub" / "traffic-route.yaml")


EDITS: list[tuple[str, Callable[[Path], object], set[str]]] = [
    # The Retry is from '*' to benigno: the mesh bundle's default for benigno carries it, and so
    # does magnanimo's bundle (some policy names magnanimo as a source of benigno). Nothing else.
    (
        "retry-num-retries",
        lambda p: _edit(p / "benigno-retry.yaml", "numRetries: 2", "numRetries: 4"),
        {"default", "default/magnanimo"},
    ),
    # The 90/10 route is from magnanimo only: only magnanimo's bundle changes.
    (
        "route-weights",
        lambda p: _edit(p / "traffic-route.yaml", "weight: 90", "weight: 80"),
        {"default/magnanimo"},
    ),
    # A catalog port is in the mesh bundle only.
    ("service-port", lambda p: _edit(p / "magnanimo.yaml", "port: 4000", "port: 4001"), {"default"}),
    # The gateway's route changes the gateway's bundle only.
    (
        "gateway-path",
        lambda p: _edit(p / "gateway-route.yaml", "value: /route1", "value: /route2"),
        {"default/edge-gateway"},
    ),
    # Who may call benigno is in benigno's bundle only.
    (
        "permission-source",
        lambda p: _edit(
            p / "permission-magnanimo-benigno.yaml", "kuma.io/service: magnanimo", "kuma.io/service: '*'"
        ),
        {"default/benigno"},
    ),
    # No behaviour changes: a comment, a rename, a reordering of keys, another spelling.
    ("comment", lambda p: _edit(p / "benigno-retry.yaml", "# Retry", "# A new comment line\n# Retry"), set()),
    ("rename", lambda p: (p / "benigno-retry.yaml").rename(p / "retries-for-benigno.yml"), set()),
    (
        "key-order",
        lambda p: _edit(
            p / "benigno-retry.yaml",
            "      numRetries: 2\n      perTryTimeout: 2s\n",
            "      perTryTimeout: 2s\n      numRetries: 2\n",
        ),
        set(),
    ),
    ("snake-case", lambda p: _edit(p / "benigno-retry.yaml", "numRetries:", "num_retries:"), set()),
    ("move-to-subdir", _move_to_subdir, set()),
]


@pytest.mark.parametrize(("name", "edit", "changed"), EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_changes_only_the_bundles_it_affects(
    name: str,
    edit: Callable[[Path], object],
    changed: set[str],
    policies: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert compile_to(policies, tmp_path / "before", capsys)[0] == 0
    edit(policies)
    code, out = compile_to(policies, tmp_path / "after", capsys)
    assert code == 0, out
    before, after = release(tmp_path / "before")["bundles"], release(tmp_path / "after")["bundles"]
    assert before.keys() == after.keys()
    assert {k for k in before if before[k] != after[k]} == changed


def test_seed_traffic_route_with_kuma_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DESIGN §1: the article's TrafficRoute, with Kuma's long names, as written."""
    policy_dir = tmp_path / "seed"
    shutil.copytree(FIXTURES / "good" / "seed-long-names", policy_dir)
    route = (policy_dir / "route-1.yaml").read_text()
    assert "kuma.io/service: magnanimo_kong-mesh-app_svc_4000" in route and "weight: 90" in route
    code, out = compile_to(policy_dir, tmp_path / "out", capsys)
    assert code == 0, out
    rel = release(tmp_path / "out")
    src = "default/magnanimo_kong-mesh-app_svc_4000"
    assert src in rel["bundles"]
    bundle = json.loads((tmp_path / "out" / "bundles" / f"{rel['bundles'][src]}.json").read_bytes())
    [rule] = bundle["outbound"]["benigno_kong-mesh-app_svc_5000"]["route"]
    split = [(s["weight"], s["service"], s["tags"]) for s in rule["conf"]["split"]]
    assert split == [
        (90, "benigno_kong-mesh-app_svc_5000", {"version": "v1"}),
        (10, "benigno_kong-mesh-app_svc_5000", {"version": "v2"}),
    ]
