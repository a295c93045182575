"""The ``meshc`` command line: help, exit codes (independent of the format), the seed repo.

Help and exit-2 cases run the real command in subprocesses (as a user or CI would); the rest
call the CLI's entry point ``compiler.cli.main`` in process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = ("text", "json", "github", "sarif")


SUBCOMMANDS = (
    "validate", "compile", "schemas", "sidecar", "gateway", "plan", "controlplane", "token", "secrets",
    "status", "demo", "inject", "manifests", "convert", "explain", "canary",
)  # fmt: skip
"""Every subcommand, written out: a list read from the parser would shrink with a lost module."""


def meshc(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help() -> None:
    proc = meshc("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: meshc")
    for name in ("validate", "compile", "schemas", "exit codes"):
        assert name in proc.stdout
    listed = re.findall(r"^    ([a-z]+)(?:  |$)", proc.stdout.split("options:")[0], re.MULTILINE)
    assert sorted(listed) == sorted(SUBCOMMANDS), "`meshc --help` lists other commands than SUBCOMMANDS"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    proc = meshc(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: meshc {command}")
    # Real documentation: a description paragraph and the options explained, not only usage.
    blocks = proc.stdout.split("\n\n")
    description = next(b for b in blocks[1:] if not b.startswith(("options:", "positional arguments:")))
    assert len(description) >= 25, description
    assert "options:" in proc.stdout and "--help" in proc.stdout


@pytest.mark.parametrize("command", ["validate", "compile"])
def test_diagnostic_commands_document_their_flags(command: str) -> None:
    out = meshc(command, "--help").stdout
    for flag in ("--ref", "--format", "--strict", "text", "json", "github", "sarif"):
        assert flag in out


def test_no_command_is_a_usage_error() -> None:
    proc = meshc()
    assert proc.returncode == 2
    assert "usage: meshc" in proc.stdout + proc.stderr


def test_unknown_flag_is_exit_2() -> None:
    proc = meshc("validate", "policies", "--no-such-flag")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--no-such-flag" in proc.stderr


def test_missing_directory_is_exit_2(tmp_path: Path) -> None:
    proc = meshc("validate", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "nowhere" in proc.stderr


def test_seed_policies_validate_clean_with_one_summary_line() -> None:
    proc = meshc("validate", "policies/")
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("no problems")
    assert proc.stderr == ""


def test_seed_policies_validate_clean_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["validate", str(POLICIES), "--format", "json", "--strict"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["diagnostics"] == []
    assert report["summary"] == {
        "files": len(list(POLICIES.glob("*.yaml"))),
        "documents": len(list(POLICIES.glob("*.yaml"))),
        "errors": 0,
        "warnings": 0,
    }


def _case(tmp_path: Path, kind: str, case: str) -> Path:
    dst = tmp_path / case
    shutil.copytree(FIXTURES / kind / case, dst, ignore=shutil.ignore_patterns("*.txt"))
    return dst


@pytest.mark.parametrize(
    ("kind", "case", "plain", "strict"),
    [
        ("good", "every-kind", 0, 0),
        ("bad", "every-diagnostic-of-every-file", 1, 1),
        ("bad", "w2002-unreachable-service", 0, 1),
    ],
)
@pytest.mark.parametrize("command", ["validate", "compile"])
def test_exit_codes_do_not_depend_on_the_format(
    kind: str,
    case: str,
    plain: int,
    strict: int,
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy_dir = _case(tmp_path, kind, case)
    for fmt in FORMATS:
        extra = ["--out", str(tmp_path / f"out-{fmt}")] if command == "compile" else []
        code, out, err = run([command, str(policy_dir), "--format", fmt, *extra], capsys)
        assert code == plain, (fmt, out, err)
        code, out, err = run([command, str(policy_dir), "--format", fmt, "--strict", *extra], capsys)
        assert code == strict, (fmt, out, err)
        if fmt in ("json", "sarif"):
            json.loads(out.split("\nrelease ", 1)[0])


def test_formats_carry_the_same_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_dir = _case(tmp_path, "bad", "e2002-undeclared-subset")
    _, text, _ = run(["validate", str(policy_dir), "--format", "text"], capsys)
    _, js, _ = run(["validate", str(policy_dir), "--format", "json"], capsys)
    _, gh, _ = run(["validate", str(policy_dir), "--format", "github"], capsys)
    _, sarif, _ = run(["validate", str(policy_dir), "--format", "sarif"], capsys)
    assert text.startswith("route.yaml:22:20: error E2002 ")
    [d] = json.loads(js)["diagnostics"]
    assert (d["file"], d["line"], d["column"], d["end_line"], d["end_column"]) == (
        "route.yaml",
        22,
        20,
        22,
        22,
    )
    assert gh.startswith("::error ") and "file=route.yaml" in gh and "line=22" in gh and "E2002" in gh
    [result] = json.loads(sarif)["runs"][0]["results"]
    assert result["ruleId"] == "E2002"
    region = result["locations"][0]["physicalLocation"]["region"]
    assert (region["startLine"], region["startColumn"]) == (22, 20)


@pytest.mark.parametrize("command", ["sidecar", "gateway"])
def test_data_plane_help_explains_every_flag_with_examples(command: str) -> None:
    out = meshc(command, "--help").stdout
    usage, _, rest = out.partition("\n\n")
    flags = sorted(set(re.findall(r"\[?(--[a-z-]+)", usage)) - {"--help"})
    assert len(flags) >= 12, flags
    lines = rest.splitlines()
    for flag in flags:
        i = next((n for n, ln in enumerate(lines) if ln.lstrip().startswith(flag)), None)
        assert i is not None, f"{flag} is not explained"
        after = lines[i].lstrip()[len(flag) :].split("  ", 1)
        text = after[1].strip() if len(after) > 1 else lines[i + 1].strip()
        assert len(text) >= 10, f"{flag}: {lines[i]!r}"
    assert "examples:" in rest and f"meshc {command} --service" in rest
    assert "exit codes:" in rest and "DESIGN" not in out
