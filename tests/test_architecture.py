"""Import boundaries (DESIGN §2): runtime never imports compiler; `meshc sidecar` stays lean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((REPO / "runtime").rglob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_compiler(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if n == "compiler" or n.startswith("compiler."))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_compiler_takes_only_contracts_and_entry_points_from_runtime() -> None:
    allowed = {"runtime", "runtime.bundle", "runtime.protocol", "runtime.cli"}
    for path in sorted((REPO / "compiler").rglob("*.py")):
        used = {n for n in _imports(path) if n == "runtime" or n.startswith("runtime.")}
        assert used <= allowed, f"{path.relative_to(REPO)} imports {sorted(used - allowed)} from runtime"


def _modules_loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return mods


def test_sidecar_command_loads_no_compiler_module() -> None:
    pytest.importorskip("runtime.cli", reason="the sidecar entry point has not landed")
    code = (
        "import sys\n"
        "from compiler.cli import main\n"
        "try:\n"
        "    main(['sidecar', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    loaded = {m for m in _modules_loaded(code) if m == "compiler" or m.startswith("compiler.")}
    assert loaded == {"compiler", "compiler.cli"}, loaded


@pytest.mark.parametrize(
    "module",
    sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for pkg in ("compiler", "runtime")
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__main__.py"
    ),
)
def test_every_module_imports_alone(module: str) -> None:
    """aiohttp's test_circular_imports: each module imports in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
