"""``--format github`` and ``--format sarif`` (issue 3 item 3), and the format chosen under Actions.

The SARIF output is checked against the official SARIF 2.1.0 JSON Schema, vendored as
``tests/data/sarif-2.1.0-rtm.5.json`` (from npm's ``@microsoft/jest-sarif`` 1.0.0-beta.0,
``lib/schemas/sarif-2.1.0-rtm.5.json``, MIT; identical to SchemaStore's ``sarif-2.1.0-rtm.5``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema  # type: ignore[import-untyped]
import pytest

from compiler.cli import main

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "tests" / "data" / "sarif-2.1.0-rtm.5.json"
FIXTURES = REPO / "tests" / "compiler" / "fixtures"

GITHUB_LINE = re.compile(
    r"^::(?P<level>error|warning) file=(?P<file>[^,]+),line=(?P<line>\d+),col=(?P<col>\d+),"
    r"endLine=(?P<end_line>\d+),endColumn=(?P<end_col>\d+),title=(?P<code>[EW]\d{4})::(?P<msg>.+)$"
)


# RFC 3986 URI-reference, relative form (what SARIF's artifactLocation.uri holds for a repo path):
# unreserved, sub-delims, ":" "@" "/" and percent-escapes only. The schema says "uri-reference",
# which jsonschema checks only when an optional package is installed, so it is checked here.
URI_REFERENCE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$")


def uris(doc: dict[str, Any]) -> list[str]:
    found = []
    for res in doc["runs"][0]["results"]:
        for loc in res["locations"] + res.get("relatedLocations", []):
            found.append(loc["physicalLocation"]["artifactLocation"]["uri"])
    return found


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    assert "2.1.0" in schema["title"]
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


@pytest.fixture()
def bad_repo(tmp_path: Path) -> Path:
    """The seed policies with four errors (one with a related location) and a warning."""
    d = tmp_path / "policies"
    shutil.copytree(REPO / "policies", d)
    shutil.copy(d / "traffic-route.yaml", d / "traffic-route-copy.yaml")  # E3001 + E3002, related
    retry = d / "benigno-retry.yaml"
    retry.write_text(retry.read_text().replace("numRetries: 2", "numRetries: 2\n      bogusKey: 1"))  # E1001
    (d / "odd, name: x.yaml").write_text(  # a path that needs escaping in annotations
        "apiVersion: kuma.io/v1alpha1\nkind: Timeout\nmesh: default\nmetadata: {name: t}\nspec:\n"
        "  sources: [{match: {kuma.io/service: '*', team: 'a,b'}}]\n"
        "  destinations: [{match: {kuma.io/service: benigno}}]\n"
        "  conf: {connectTimeout: 2s}\n"
    )
    return d


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def diagnostics(capsys: pytest.CaptureFixture[str], d: Path) -> list[dict[str, Any]]:
    _, out, _ = run(capsys, "validate", str(d), "--format", "json")
    items: list[dict[str, Any]] = json.loads(out)["diagnostics"]
    return items


def test_sarif_is_valid_sarif_2_1_0(
    bad_repo: Path, capsys: pytest.CaptureFixture[str], sarif_validator: jsonschema.Draft4Validator
) -> None:
    expected = diagnostics(capsys, bad_repo)
    code, out, _ = run(capsys, "validate", str(bad_repo), "--format", "sarif")
    assert code == 1
    doc = json.loads(out)
    errors = sorted(sarif_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert doc["version"] == "2.1.0"
    (run_,) = doc["runs"]
    rules = run_["tool"]["driver"]["rules"]
    results = run_["results"]
    assert len(results) == len(expected) >= 4
    for res, diag in zip(results, expected, strict=True):
        assert res["ruleId"] == diag["code"]
        assert rules[res["ruleIndex"]]["id"] == diag["code"]
        assert res["level"] == diag["severity"]
        region = res["locations"][0]["physicalLocation"]["region"]
        assert (region["startLine"], region["startColumn"]) == (diag["line"], diag["column"])
        assert (region["endLine"], region["endColumn"]) == (diag["end_line"], diag["end_column"])
        assert unquote(res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]) == diag["file"]
        assert len(res.get("relatedLocations", [])) == len(diag.get("related", []))
    assert any(res.get("relatedLocations") for res in results)
    assert all(URI_REFERENCE.match(u) for u in uris(doc)), uris(doc)
    assert "odd%2C%20name%3A%20x.yaml" in uris(doc)


def _cases() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*/*") if p.is_dir()) if FIXTURES.is_dir() else []


@pytest.mark.parametrize("case", _cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sarif_of_every_fixture_is_valid(
    case: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sarif_validator: jsonschema.Draft4Validator,
) -> None:
    d = tmp_path / case.name
    shutil.copytree(case, d, ignore=shutil.ignore_patterns("expected.txt"))
    code_text, _, _ = run(capsys, "validate", str(d))
    code, out, _ = run(capsys, "validate", str(d), "--format", "sarif")
    assert code == code_text  # the exit code never depends on the format
    doc = json.loads(out)
    errors = list(sarif_validator.iter_errors(doc))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert all(URI_REFERENCE.match(u) for u in uris(doc)), uris(doc)


def test_sarif_with_no_findings_is_valid(
    capsys: pytest.CaptureFixture[str], sarif_validator: jsonschema.Draft4Validator
) -> None:
    code, out, _ = run(capsys, "validate", str(REPO / "policies"), "--format", "sarif")
    assert code == 0
    doc = json.loads(out)
    assert not list(sarif_validator.iter_errors(doc))
    assert doc["runs"][0]["results"] == []


def test_github_annotations(bad_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = diagnostics(capsys, bad_repo)
    code, out, _ = run(capsys, "validate", str(bad_repo), "--format", "github")
    assert code == 1
    lines = [x for x in out.splitlines() if x.startswith("::")]
    assert len(lines) == len(expected)
    for line, diag in zip(lines, expected, strict=True):
        m = GITHUB_LINE.match(line)
        assert m, line
        file = m["file"].replace("%3A", ":").replace("%2C", ",").replace("%25", "%")
        assert file == diag["file"]
        assert m["level"] == diag["severity"]
        assert (int(m["line"]), int(m["col"]), int(m["end_line"]), int(m["end_col"])) == (
            diag["line"],
            diag["column"],
            diag["end_line"],
            diag["end_column"],
        )
        assert m["code"] == diag["code"]
        assert m["msg"].startswith(diag["message"].replace("%", "%25"))
    odd = next(x for x in lines if "odd" in x)
    assert "file=odd%2C name%3A x.yaml," in odd
    # A related location rides in the message as an escaped second line.
    assert any("%0Atraffic-route-copy.yaml:" in x for x in lines)


def test_github_format_is_the_default_under_github_actions(
    bad_repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    code_text, text, _ = run(capsys, "validate", str(bad_repo))
    assert not text.startswith("::")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, _ = run(capsys, "validate", str(bad_repo))
    _, explicit, _ = run(capsys, "validate", str(bad_repo), "--format", "github")
    assert out == explicit and out.startswith("::error file=")
    assert code == code_text == 1
    # An explicit --format still wins.
    _, as_json, _ = run(capsys, "validate", str(bad_repo), "--format", "json")
    assert json.loads(as_json)["summary"]["errors"] >= 4


@pytest.mark.parametrize("fmt", ["text", "json", "github", "sarif"])
def test_exit_code_does_not_depend_on_format(
    fmt: str, bad_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "validate", str(bad_repo), "--format", fmt)[0] == 1
    assert run(capsys, "validate", str(REPO / "policies"), "--format", fmt)[0] == 0
