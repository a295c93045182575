"""Fixture policy repos with the exact position of every diagnostic (cfn-lint snapshot style).

``fixtures/good/<case>/`` are repos that validate with no diagnostic at all. Each
``fixtures/bad/<case>/`` has an ``expected.txt`` listing every diagnostic of one ``meshc validate``
run as ``file:line:col: severity CODE``: the position is the offending key or value, never the
document's first line. A case is copied into a temporary directory outside any Git repo first, so
paths are relative to the policy directory, as ``meshc`` shows them there.

To regenerate the snapshots after a deliberate change, run with ``MESHC_UPDATE_FIXTURES=1`` and
review the diff line by line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compiler.cli import main
from compiler.yamlload import MAX_FILE_BYTES

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = sorted(p.name for p in (FIXTURES / "good").iterdir() if p.is_dir())
BAD = sorted(p.name for p in (FIXTURES / "bad").iterdir() if p.is_dir())
UPDATE = os.environ.get("MESHC_UPDATE_FIXTURES") == "1"

REQUIRED_CODES = {
    # issue 2, item 5: checks across the whole repo
    "E2001", "E2002", "E1009", "E1008", "E2003", "E3001", "E3002", "W1001", "W1002", "E1010",
    "E1011", "E1012", "E2004", "E3003", "E1006", "W2001", "W2002",
    # issue 2, item 4: diagnostics for broken input
    "E0001", "E0002", "E0003", "E0004", "E0006", "E1001", "E1002", "E1004",
}  # fmt: skip


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The real CLI entry point, in process."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def copy_case(kind: str, case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(FIXTURES / kind / case, dst, ignore=shutil.ignore_patterns("expected.txt"))
    return dst


def validate_json(policy_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, Any]:
    code, out, err = run(["validate", str(policy_dir), "--format", "json", *extra], capsys)
    assert err == ""
    return code, json.loads(out)


def snapshot(diagnostics: list[dict[str, Any]]) -> list[str]:
    return [f"{d['file']}:{d['line']}:{d['column']}: {d['severity']} {d['code']}" for d in diagnostics]


def expected_lines(case: str) -> list[str]:
    text = (FIXTURES / "bad" / case / "expected.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("case", GOOD)
def test_good_repo_is_clean(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_dir = copy_case("good", case, tmp_path)
    code, report = validate_json(policy_dir, capsys, "--strict")
    assert report["diagnostics"] == []
    assert code == 0
    assert report["summary"]["errors"] == report["summary"]["warnings"] == 0
    code, out, _ = run(
        ["compile", str(policy_dir), "--out", str(tmp_path / "out"), "--format", "text"], capsys
    )
    assert code == 0, out
    assert list((tmp_path / "out" / "bundles").glob("*.json"))


@pytest.mark.parametrize("case", BAD)
def test_bad_repo_positions(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_dir = copy_case("bad", case, tmp_path)
    code, report = validate_json(policy_dir, capsys)
    got = snapshot(report["diagnostics"])
    if UPDATE:
        header = "# file:line:col: severity CODE, one line per diagnostic of `meshc validate`\n"
        (FIXTURES / "bad" / case / "expected.txt").write_text(header + "".join(f"{g}\n" for g in got))
    assert got == expected_lines(case)
    errors = [d for d in report["diagnostics"] if d["severity"] == "error"]
    assert code == (1 if errors else 0)
    assert report["summary"]["errors"] == len(errors)
    assert report["summary"]["warnings"] == len(report["diagnostics"]) - len(errors)
    # The case is named after the code it shows; each diagnostic has a real span and a message.
    named = case.split("-")[0].upper()
    if re.fullmatch(r"[EW]\d{4}", named):
        assert named in {d["code"] for d in report["diagnostics"]}
    for d in report["diagnostics"]:
        assert d["message"]
        assert (d["end_line"], d["end_column"]) > (d["line"], d["column"])
        assert (policy_dir / d["file"]).is_file()


def test_every_required_check_has_a_fixture() -> None:
    shown = {line.split()[-1] for case in BAD for line in expected_lines(case)}
    assert not REQUIRED_CODES - shown, f"no fixture shows {sorted(REQUIRED_CODES - shown)}"


def test_warnings_fail_only_with_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case in ("w1002-shadowed-match", "w2001-permissions-without-mtls", "w2002-unreachable-service"):
        policy_dir = copy_case("bad", case, tmp_path)
        code, report = validate_json(policy_dir, capsys)
        assert code == 0 and report["summary"]["warnings"] >= 1 and report["summary"]["errors"] == 0
        code, _ = validate_json(policy_dir, capsys, "--strict")
        assert code == 1


def test_conflict_names_the_other_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = validate_json(copy_case("bad", "e3002-equal-specificity", tmp_path), capsys)
    assert code == 1
    [d] = report["diagnostics"]
    assert (d["code"], d["file"], d["line"], d["column"]) == ("E3002", "retry-b.yaml", 8, 7)
    assert "'retry-a'" in d["message"] and "'retry-b'" in d["message"]
    [rel] = d["related"]
    assert (rel["file"], rel["line"], rel["column"]) == ("retry-a.yaml", 8, 7)
    assert "retry-a" in rel["message"]


@pytest.mark.parametrize(
    ("case", "code", "file", "related_file", "related_line"),
    [
        ("e3001-duplicate-name", "E3001", "route-b.yaml", "route-a.yaml", 5),
        ("e3003-duplicate-gateway-match", "E3003", "route-b.yaml", "route-a.yaml", 14),
        ("w1002-shadowed-match", "W1002", "route.yaml", "route.yaml", 15),
    ],
)
def test_two_document_findings_have_related(
    case: str,
    code: str,
    file: str,
    related_file: str,
    related_line: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, report = validate_json(copy_case("bad", case, tmp_path), capsys)
    [d] = [d for d in report["diagnostics"] if d["code"] == code]
    assert d["file"] == file
    assert [(r["file"], r["line"]) for r in d["related"]] == [(related_file, related_line)]


def test_text_format_reads_file_line_col(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_dir = copy_case("bad", "e2002-undeclared-subset", tmp_path)
    code, out, _ = run(["validate", str(policy_dir), "--format", "text"], capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("route.yaml:22:20: error E2002 no subset of 'benigno' carries {version: v3}")
    assert len(lines) == 2  # the finding, then one summary line


def test_one_run_reports_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, report = validate_json(copy_case("bad", "every-diagnostic-of-every-file", tmp_path), capsys)
    by_file: dict[str, set[str]] = {}
    for d in report["diagnostics"]:
        by_file.setdefault(d["file"], set()).add(d["code"])
    assert by_file == {
        "retry.yaml": {"E1002", "E1006"},
        "route.yaml": {"E1001", "E2002"},
        "syntax.yaml": {"E0001"},
    }


def test_duplicate_keys_all_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, report = validate_json(copy_case("bad", "e0002-duplicate-keys", tmp_path), capsys)
    dups = [d for d in report["diagnostics"] if d["code"] == "E0002"]
    assert len(dups) == 2 and {d["file"] for d in dups} == {"route.yaml"}


def _limited_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess that may use at most 2 GiB of address space and 60 s."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from compiler.cli import main; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        check=False,
    )


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree(FIXTURES / "good" / "canary-split", policy_dir)
    line = b"# " + b"x" * 1021 + b"\n"
    (policy_dir / "huge.yaml").write_bytes(line * (MAX_FILE_BYTES // len(line) + 1))
    proc = _limited_cli(["validate", str(policy_dir), "--format", "json"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    [d] = json.loads(proc.stdout)["diagnostics"]
    assert (d["code"], d["file"]) == ("E0004", "huge.yaml")
    assert str(MAX_FILE_BYTES) in d["message"]


def test_alias_bomb_stays_bounded(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree(FIXTURES / "bad" / "e0004-alias-bomb", policy_dir, ignore=shutil.ignore_patterns("*.txt"))
    # Twelve levels of nine: 9**12 (about 2.8e11) nodes if anything expanded it.
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)]
    (policy_dir / "bigger.yaml").write_text("\n".join(levels) + "\n")
    proc = _limited_cli(["validate", str(policy_dir), "--format", "json"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    codes = [(d["file"], d["code"]) for d in json.loads(proc.stdout)["diagnostics"]]
    assert codes == [("bigger.yaml", "E0004"), ("bomb.yaml", "E0004")]
