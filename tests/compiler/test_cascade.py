"""A broken catalog document is reported once, not again at every reference to it."""

from __future__ import annotations

import shutil
from pathlib import Path

from compiler.pipeline import compile_dir

REPO = Path(__file__).resolve().parents[2]


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(REPO / "policies", d)
    return d


def test_invalid_service_is_reported_once(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    f = d / "benigno.yaml"
    f.write_text(f.read_text().replace("port: 5000", 'port: "five thousand"'))
    result = compile_dir(d)
    codes = [(x.code, Path(x.file).name) for x in result.diagnostics]
    assert codes == [("E1002", "benigno.yaml")]


def test_invalid_mesh_is_reported_once(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    f = d / "mesh.yaml"
    f.write_text(f.read_text().replace("enabledBackend: ca-1", "enabledBackend: [ca-1]"))
    result = compile_dir(d)
    assert [x.code for x in result.diagnostics] == ["E1002"]
    assert Path(result.diagnostics[0].file).name == "mesh.yaml"


def test_a_missing_service_is_still_reported(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    (d / "benigno.yaml").unlink()
    result = compile_dir(d)
    assert "E2001" in {x.code for x in result.diagnostics}
