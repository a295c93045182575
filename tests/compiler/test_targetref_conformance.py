"""Kuma conformance for the targetRef dialect: meshc reaches Kuma's verdict on each validator case.

The cases live beside the repo in ``../shared/conformance/kuma-targetref-cases/`` (296 of them,
from Kuma v2.14.3's own validator tests; see its README). Each is written into a temporary policy
directory as ``policy.yaml`` and ``catalog.yaml`` and compiled the way ``meshc validate`` does.

meshc must agree with Kuma's ``valid`` on every case but the two in ``STRICTER``: valid in Kuma
because its parser silently drops a misplaced key (``kuma_parser_leniency``), rejected by meshc
with E1001 at exactly those keys, on purpose.

For an invalid case every error is in ``policy.yaml`` (the catalog is valid) below the document's
first line, and every violation Kuma reports has a meshc error at exactly that field whose message
is Kuma's, word for word (a missing key's message may start with the key's path). Kuma's paths are
compared after ``KUMA_PATH_QUIRKS`` turns the few places where Kuma names another path than the
offending input into the input's path. A valid case compiles, with
no finding but the warning that the kind is not compiled into bundles yet (W1003) or has no
effect in meshc (W1004).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from compiler.diagnostics import Diagnostic
from compiler.kinds import REGISTRY
from compiler.parse import parse_documents
from compiler.pipeline import CompileResult, compile_dir
from compiler.yamlload import load_fast

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CASES_DIR = SHARED / "conformance" / "kuma-targetref-cases"

if not CASES_DIR.is_dir():
    pytest.skip(
        f"{CASES_DIR} is absent: the Kuma targetRef conformance cases live in ../shared beside the repo "
        "(CI has them; a plain clone does not)",
        allow_module_level=True,
    )

CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "expected.json").is_file())

STRICTER: dict[str, list[tuple[str | int, ...]]] = {
    # `healthyPanicThreshold` indented under `outlierDetection.detectors`, four times.
    "meshcircuitbreaker-01-valid": [
        ("spec", s, i, "default", "outlierDetection", "detectors", "healthyPanicThreshold")
        for s, i in (("from", 0), ("to", 0), ("to", 1), ("to", 2))
    ],
    # `set:` and `add:` beside `requestHeadersToAdd:` instead of under it.
    "meshhealthcheck-01-valid": [
        ("spec", "to", 0, "default", "http", "set"),
        ("spec", "to", 0, "default", "http", "add"),
    ],
}
"""Valid in Kuma, which drops these unknown keys; meshc reports E1001 at each (DESIGN: unknown keys
are errors)."""

KUMA_PATH_QUIRKS: list[tuple[re.Pattern[str], str]] = [
    # MeshFaultInjection puts the index after the fault type.
    (re.compile(r"\.http\.(abort|delay|responseBandwidth)\[(\d+)\]"), r".http[\2].\1"),
    # MeshRetry roots its conf checks at `default.conf`.
    (re.compile(r"\.default\.conf(?=\.|$)"), ".default"),
    # MeshTrafficPermission names a rule's matches without `default`.
    (re.compile(r"rules\[(\d+)\]\.(allow|allowWithShadowDeny|deny)\["), r"rules[\1].default.\2["),
    # MeshMetric names list items `backend[i]` / `application[i]` under the list.
    (re.compile(r"backends\.backend\[(\d+)\]\.port$"), r"backends[\1].prometheus.port"),
    (re.compile(r"backends\.backend\["), "backends["),
    (re.compile(r"applications\.application\[(\d+)\]$"), r"applications[\1].port"),
    # MeshService's name check is at `name`; in the Kubernetes form that is `metadata.name`.
    (re.compile(r"^name$"), "metadata.name"),
]

GRPC_SERVICE = re.compile(r"^(  protocol: )grpc$", re.M)
"""The catalogs of five cases declare a ``grpc`` Service (``catalog_notes``); meshc's Service
protocols are ``http`` (gRPC included) and ``tcp``, so the copy says ``http``. Kuma's validators
never read the catalog: the verdict cannot depend on it."""

ALLOWED_ON_VALID = {"W1003", "W1004", "W3004", "W3006"}
"""Not compiled / no effect, or compiled with a name-only tie or a part not resolved yet."""
_STEP = re.compile(r'([^.\[\]]+)|\[(\d+)\]|\["([^"]*)"\]')


def kuma_path(field: str) -> tuple[str | int, ...]:
    for rx, repl in KUMA_PATH_QUIRKS:
        field = rx.sub(repl, field)
    steps: list[str | int] = []
    for m in _STEP.finditer(field):
        if m.group(1) is not None:
            steps.append(m.group(1))
        elif m.group(2) is not None:
            steps.append(int(m.group(2)))
        else:
            steps.append(m.group(3))
    return tuple(steps)


def _compile_case(case: str, tmp_path: Path) -> tuple[dict[str, Any], CompileResult]:
    src = CASES_DIR / case
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    shutil.copyfile(src / "policy.yaml", policy_dir / "policy.yaml")
    catalog = (src / "catalog.yaml").read_text(encoding="utf-8")
    (policy_dir / "catalog.yaml").write_text(GRPC_SERVICE.sub(r"\1http", catalog), encoding="utf-8")
    expected = json.loads((src / "expected.json").read_text(encoding="utf-8"))
    return expected, compile_dir(policy_dir)


def _policy(case: str) -> bytes:
    return (CASES_DIR / case / "policy.yaml").read_bytes()


def _shown(diags: list[Diagnostic]) -> str:
    return "\n".join(f"{d.file}:{d.span}: {d.code} {d.loc.path} {d.message}" for d in diags)


def test_all_cases_present() -> None:
    assert len(CASES) == 296, f"expected the 296 cases of the README, found {len(CASES)}"
    assert set(STRICTER) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_kuma_verdict(case: str, tmp_path: Path) -> None:
    expected, result = _compile_case(case, tmp_path)
    diags = result.diagnostics
    errors = [d for d in diags if d.severity == "error"]
    shown = _shown(diags)

    assert not [d for d in diags if d.file != "policy.yaml"], f"the catalog must be clean:\n{shown}"
    for d in errors:
        assert d.span is not None and d.span.line > 1, f"an error at the document's first line:\n{shown}"

    if case in STRICTER:
        assert expected["valid"] is True and expected["kuma_parser_leniency"]
        assert sorted((d.code, d.loc.path) for d in errors) == sorted(("E1001", p) for p in STRICTER[case]), (
            shown
        )
        return

    meshc_valid = not errors
    assert meshc_valid == expected["valid"], (
        f"Kuma says valid={expected['valid']}, meshc says valid={meshc_valid}:\n{shown}\n"
        f"Kuma: {expected['kuma_violations']}"
    )
    if meshc_valid:
        assert {d.code for d in diags} <= ALLOWED_ON_VALID, shown
        kinds = {d.kind for d in parse_documents("policy.yaml", load_fast(_policy(case)) or [])[0]}
        if not all(REGISTRY[k].compiled for k in kinds):
            assert {"W1003", "W1004"} & {d.code for d in diags}, (
                "a targetRef policy must say it is not compiled"
            )
        assert result.bundles, "a valid case must compile to bundles"
        return

    missed = [
        v
        for v in expected["kuma_violations"]
        if not any(d.loc.path == kuma_path(v["field"]) and d.message.endswith(v["message"]) for d in errors)
    ]
    assert not missed, (
        f"Kuma's violations that meshc does not report at that field in Kuma's words:\n{missed}\n{shown}"
    )
