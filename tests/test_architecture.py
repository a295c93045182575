"""Import boundaries (DESIGN §2) that need a running interpreter.

The static boundaries (runtime never imports compiler, no compiler stage imports the control
plane, where aiohttp may be imported, no cycle between the control plane's server, API and
security) are import-linter contracts in ``pyproject.toml``, checked by ``make lint``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules_loaded(code: str) -> set[str]:
    """The modules ``code`` imports; the code must run to its end (an ImportError fails the test)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code + "\nprint('ran to the end')\n"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0 and "ran to the end" in out.stdout, out.stderr[-3000:]
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return mods


def test_sidecar_command_loads_no_compiler_module() -> None:
    code = (
        "import contextlib, io\n"
        "from compiler.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['sidecar', '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert out.getvalue().startswith('usage: meshc sidecar'), out.getvalue()[:200]\n"
    )
    mods = _modules_loaded(code)
    assert "runtime.cli" in mods, "the sidecar's help did not come from runtime.cli"
    loaded = {m for m in mods if m == "compiler" or m.startswith("compiler.")}
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
