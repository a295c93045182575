"""docs/diagnostics.md and docs/policies.md are generated (``python -m compiler.docgen``) and fresh."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from compiler.diagnostics import CODES
from compiler.docgen import diagnostics_md, policies_md, write_docs
from compiler.kinds import REGISTRY

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_committed_docs_are_up_to_date() -> None:
    stale = write_docs(DOCS, check=True)
    assert not stale, f"docs out of date: {stale}; run `python -m compiler.docgen` and commit docs/"


def test_every_code_is_documented() -> None:
    text = diagnostics_md()
    for code in CODES.values():
        section = text.split(f"\n## {code.code}\n", 1)
        assert len(section) == 2, f"{code.code} has no section"
        body = section[1].split("\n## ", 1)[0]
        assert f"**`{code.title}`** ({code.severity})" in body
        assert code.description.split("`")[0].strip() in body
        assert f"| [{code.code}](#{code.code.lower()}) | `{code.title}` | {code.severity} |" in text


def test_every_kind_has_examples_and_every_field() -> None:
    text = policies_md()
    for kind in REGISTRY.values():
        section = text.split(f"\n## {kind.kind}\n", 1)
        assert len(section) == 2, f"{kind.kind} has no section"
        body = section[1].split("\n## ", 1)[0]
        blocks = re.findall(r"```yaml\n(.*?)```", body, re.S)
        assert len(blocks) >= 2, f"{kind.kind}: a valid and an invalid example"
        assert re.search(r"^Valid\b.*:\n\n```yaml", body, re.M), kind.kind
        assert re.search(r"^Invalid\b.*:\n\n```yaml", body, re.M), kind.kind
        example = yaml.safe_load(blocks[0])
        assert example["kind"] == kind.kind and example["apiVersion"] == kind.api_version
        for name, f in kind.spec.model_fields.items():
            field = f.serialization_alias or name
            assert f"| `spec.{field}` |" in body, f"{kind.kind}: spec.{field} is not in the table"


def test_nested_fields_types_defaults_and_descriptions() -> None:
    text = policies_md()
    # A nested model's field, its duration type and its doc (compiler/kinds/timeout.py).
    assert "| `spec.conf.http.requestTimeout` | duration |" in text
    # Defaults and descriptions come from the models.
    assert '| `spec.protocol` | `"http"` \\| `"tcp"` | `http` | `http` gets L7 routing' in text
    assert "| `spec.port` | integer | required | The port clients use in URLs" in text
    # Lists of models are walked into ([]), so selectors' tags are listed.
    assert "| `spec.sources[].match` | tags (map of string to string) |" in text


def test_module_check_mode(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "compiler.docgen", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "docs"
    stale.mkdir()
    (stale / "diagnostics.md").write_text("old\n")
    bad = subprocess.run(
        [sys.executable, "-m", "compiler.docgen", "--check", "--out", str(stale)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "diagnostics.md" in bad.stderr and "policies.md" in bad.stderr
    assert (stale / "diagnostics.md").read_text() == "old\n"  # --check writes nothing
    wrote = subprocess.run(
        [sys.executable, "-m", "compiler.docgen", "--out", str(stale)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert wrote.returncode == 0
    assert (stale / "diagnostics.md").read_text() == (DOCS / "diagnostics.md").read_text()
