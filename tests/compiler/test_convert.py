"""``meshc convert``: legacy policies rewritten as targetRef policies, or kept with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import _layout, _sources, policy_sets

from compiler.cli import main
from compiler.kinds import REGISTRY
from compiler.migrate import CONVERTERS
from compiler.migrate_cli import convert_repo
from compiler.pipeline import compile_dir, compile_sources

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TWIN = REPO / "docs" / "examples" / "targetref"
MESH = "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n"
SERVICES = "".join(
    "---\napiVersion: meshc/v1alpha1\nkind: Service\nmesh: default\n"
    f"metadata: {{name: {n}}}\nspec: {{port: 80}}\n"
    for n in ("a", "b", "c")
)


def _convert(src: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = main(["convert", str(src), "--out", str(out)])
    return rc, capsys.readouterr().out.splitlines()


def test_the_seed_converts_to_its_documented_twin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines = _convert(REPO / "policies", tmp_path / "out", capsys)
    assert rc == 0
    assert lines[-1].startswith("8 policy(ies) converted, 0 kept")
    r = compile_dir(tmp_path / "out")
    assert not r.errors, [(d.file, d.message) for d in r.diagnostics if d.severity == "error"]
    for twin in sorted(TWIN.glob("*.yaml")):
        got = (tmp_path / "out" / twin.name).read_text()
        assert list(yaml.safe_load_all(got)) == list(yaml.safe_load_all(twin.read_text())), twin.name
    # The comment above each policy stays; the modeline names the new kind's schema.
    route = (tmp_path / "out" / "traffic-route.yaml").read_text().splitlines()
    assert route[0] == "# yaml-language-server: $schema=../schemas/policy/meshhttproute.schema.json"
    assert route[1].startswith("# The tutorial's canary")


def test_every_fixture_repo_that_compiles_still_compiles(tmp_path: Path) -> None:
    converted = kept = 0
    for repo in sorted(p for kind in ("good", "bad") for p in (FIXTURES / kind).iterdir() if p.is_dir()):
        if compile_dir(repo).errors:
            continue
        files = {str(p.relative_to(repo)): p.read_text() for p in repo.rglob("*.y*ml")}
        out, report = convert_repo(files)
        target = tmp_path / repo.parent.name / repo.name
        for rel, text in out.items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_text(text)
        r = compile_dir(target)
        assert not r.errors, (
            repo.name,
            [(d.file, d.message) for d in r.diagnostics if d.severity == "error"],
        )
        converted += sum(" -> " in line for line in report)
        kept += sum(" kept: no exact translation: " in line for line in report)
    assert converted >= 20 and kept >= 4, (converted, kept)


def test_what_has_no_exact_translation_is_kept_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "repo"
    src.mkdir()
    (src / "mesh.yaml").write_text(MESH + SERVICES)
    two_sources = (
        "# two callers\napiVersion: kuma.io/v1alpha1\nkind: Retry\nmesh: default\nmetadata: {name: r}\n"
        "spec:\n  sources: [{match: {kuma.io/service: a}}, {match: {kuma.io/service: b}}]\n"
        "  destinations: [{match: {kuma.io/service: c}}]\n  conf: {tcp: {maxConnectAttempts: 3}}\n"
    )
    timeout = (
        "---\n# keep me\napiVersion: kuma.io/v1alpha1\nkind: Timeout\nmesh: default\nmetadata: {name: t}\n"
        "spec:\n  sources: [{match: {kuma.io/service: '*'}}]\n"
        "  destinations: [{match: {kuma.io/service: c}}]\n"
        "  conf: {connectTimeout: 3s, tcp: {idleTimeout: 1m}}\n"
    )
    (src / "policies.yaml").write_text(two_sources + timeout)
    rc = main(["convert", str(src)])  # in place
    assert rc == 0
    text = (src / "policies.yaml").read_text()
    assert text.startswith(two_sources), "the unconverted document is unchanged"
    rest = text[len(two_sources) :]
    assert rest.startswith("---\n# keep me\napiVersion: kuma.io/v1alpha1\nkind: MeshTimeout\n")
    t = list(yaml.safe_load_all(text))[1]
    assert t["spec"] == {
        "targetRef": {"kind": "Mesh"},
        "to": [
            {
                "targetRef": {"kind": "MeshService", "name": "c"},
                "default": {"connectionTimeout": "3s", "idleTimeout": "1m"},
            }
        ],
    }
    assert (src / "mesh.yaml").read_text() == MESH + SERVICES
    assert not compile_dir(src).errors


def test_the_report_names_each_policy_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = FIXTURES / "bad" / "w2003-traffic-denied-by-permissions"
    rc, lines = _convert(repo, tmp_path / "out", capsys)
    assert rc == 0
    assert "policies.yaml:37: Retry 'callers-to-benigno' kept: no exact translation: 2 sources" in "\n".join(
        lines
    )
    assert any(line.endswith("-> MeshTrafficPermission") for line in lines)


def test_a_repo_with_errors_is_not_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = FIXTURES / "bad" / "e1001-unknown-key"
    rc = main(["convert", str(repo), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "fix them first" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "src",
    [
        pytest.param(REPO / "policies", id="seed"),
        pytest.param(FIXTURES / "good" / "every-kind", id="every-kind"),
    ],
)
def test_converted_repos_compile_to_byte_identical_bundles(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / src.name
    assert _convert(src, out, capsys)[0] == 0
    assert compile_dir(out).digests == compile_dir(src).digests


@settings(max_examples=25, derandomize=True, database=None, deadline=None)
@given(docs=policy_sets(), forms=st.lists(st.booleans(), min_size=1, max_size=4))
def test_generated_legacy_repos_convert_to_valid_repos(docs: list[dict[str, Any]], forms: list[bool]) -> None:
    files = _layout(docs, [0, 1, 2], forms, "p")
    assert not compile_sources(_sources(files)).errors
    out, report = convert_repo(files)
    assert len(report) == sum(d["kind"] in CONVERTERS for d in docs)
    result = compile_sources(_sources(out))
    errors = [(d.file, d.code, d.message) for d in result.diagnostics if d.severity == "error"]
    assert not errors, (errors, report)
    kinds = [d.get("kind", "") for text in out.values() for d in yaml.safe_load_all(text) if d]
    converted = [k for line in report if " -> " in line for k in line.rsplit(" -> ", 1)[1].split(" + ")]
    assert sorted(
        k for k in kinds if k.startswith("Mesh") and k in REGISTRY and REGISTRY[k].dialect == "targetref"
    ) == sorted(converted)
