"""Kuma conformance: meshc reaches Kuma's verdict on each case from Kuma's own validator tests.

The cases live beside the repo in ``../shared/conformance/kuma-cases/`` (127 of them, from Kuma
v2.14.3; see its README). Each is written into a temporary policy directory as ``policy.yaml`` and
``catalog.yaml`` and compiled the way ``meshc validate`` does. meshc must agree with Kuma's
``valid`` on every case but one: ``trafficroute-03-valid`` carries a misplaced key that Kuma's
parser drops silently and meshc rejects (E1001 at that key), on purpose.

For an invalid case, every error must be in ``policy.yaml`` (the catalog is valid), and every
field Kuma reports must have a meshc error at that field, inside it, or at the object that holds it
(Kuma's field paths and meshc's key paths are compared after folding camelCase and snake_case).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from compiler.diagnostics import Diagnostic
from compiler.pipeline import compile_dir

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CASES_DIR = SHARED / "conformance" / "kuma-cases"

if not CASES_DIR.is_dir():
    pytest.skip(
        f"{CASES_DIR} is absent: the Kuma conformance cases live in ../shared beside the repo "
        "(CI has them; a plain clone does not)",
        allow_module_level=True,
    )

CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "expected.json").is_file())

DELIBERATE = "trafficroute-03-valid"
"""Kuma: valid (its parser drops ``modify.path.host``). meshc: E1001 at that key."""
DELIBERATE_LINE, DELIBERATE_COLUMN = 31, 11

KUMA_FIELD_QUIRKS: list[tuple[re.Pattern[str], str]] = [
    # Kuma names a gateway path match's value without its `path` object.
    (re.compile(r"^(conf\.http\.rules\[\d+\]\.matches\[\d+\])\.value$"), r"\1.path.value"),
    # Kuma's RateLimit validator spells the list `header` and indexes it with a quoted string.
    (re.compile(r'onRateLimit\.header\["(\d+)"\]'), r"onRateLimit.headers[\1]"),
]
"""Where Kuma's reported field is not the path of the offending input (its own quirks)."""

KUMA_FIELD_OVERRIDES: dict[tuple[str, str], str] = {
    # Kuma reports the index of the rewrite filter, not of the header filter that sets `host`.
    (
        "meshgatewayroute-22-invalid",
        "conf.http.rules[0].filters[0].request_header.set[0]",
    ): "conf.http.rules[0].filters[1].request_header.set[0]",
}

_STEP = re.compile(r'([^.\[\]]+)|\[(\d+)\]|\["([^"]*)"\]')


def _kuma_path(case: str, field: str, root: str) -> tuple[str | int, ...]:
    field = KUMA_FIELD_OVERRIDES.get((case, field), field)
    for rx, repl in KUMA_FIELD_QUIRKS:
        field = rx.sub(repl, field)
    steps: list[str | int] = [] if root == "object" else ["spec"]
    for m in _STEP.finditer(field):
        if m.group(1) is not None:
            steps.append(m.group(1))
        elif m.group(2) is not None:
            steps.append(int(m.group(2)))
        else:
            steps.append(m.group(3))
    return _fold(tuple(steps))


def _fold(path: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """camelCase and snake_case spellings of one field compare equal."""
    return tuple(s.lower().replace("_", "") if isinstance(s, str) else s for s in path)


def _covers(meshc: tuple[str | int, ...], kuma: tuple[str | int, ...]) -> bool:
    """The meshc error is at Kuma's field, inside it, or on the object holding it (not the root)."""
    if meshc[: len(kuma)] == kuma:
        return True
    return len(meshc) > 1 and kuma[: len(meshc)] == meshc


def _compile_case(case: str, tmp_path: Path) -> tuple[dict[str, Any], list[Diagnostic], bool]:
    src = CASES_DIR / case
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    shutil.copyfile(src / "policy.yaml", policy_dir / "policy.yaml")
    shutil.copyfile(src / "catalog.yaml", policy_dir / "catalog.yaml")
    expected = json.loads((src / "expected.json").read_text(encoding="utf-8"))
    result = compile_dir(policy_dir)
    return expected, result.diagnostics, bool(result.bundles)


def test_all_cases_present() -> None:
    assert len(CASES) == 127, f"expected the 127 cases of the README, found {len(CASES)}"


@pytest.mark.parametrize("case", CASES)
def test_kuma_verdict(case: str, tmp_path: Path) -> None:
    expected, diags, compiled = _compile_case(case, tmp_path)
    errors = [d for d in diags if d.severity == "error"]
    shown = "\n".join(f"{d.file}:{d.span}: {d.code} {d.message}" for d in diags)

    assert not [d for d in diags if d.file != "policy.yaml"], f"the catalog must be clean:\n{shown}"
    for d in errors:
        assert d.span is not None and d.span.line > 1, f"an error at the document's first line:\n{shown}"

    if case == DELIBERATE:
        assert expected["valid"] is True
        assert [(d.code, d.span.line, d.span.column) for d in errors if d.span] == [
            ("E1001", DELIBERATE_LINE, DELIBERATE_COLUMN)
        ], shown
        assert "'host'" in errors[0].message
        return

    meshc_valid = not errors
    assert meshc_valid == expected["valid"], (
        f"Kuma says valid={expected['valid']}, meshc says valid={meshc_valid}:\n{shown}\n"
        f"Kuma: {expected['kuma_violations']}"
    )
    if meshc_valid:
        assert compiled, "a valid case must compile to bundles"
        return

    assert len({(d.loc.path, d.code) for d in errors}) >= 1
    meshc_paths = [_fold(d.loc.path) for d in errors]
    missed = [
        v
        for v in expected["kuma_violations"]
        if not any(_covers(p, _kuma_path(case, v["field"], expected["field_root"])) for p in meshc_paths)
    ]
    assert not missed, f"Kuma reports fields meshc does not:\n{missed}\nmeshc:\n{shown}"
