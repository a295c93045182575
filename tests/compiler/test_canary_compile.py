"""The Canary compile stage (issue 16): every step's bundles are exactly what a commit with that
step's weights would compile to, in both dialects; bad canaries point at the line; the incremental
compiler agrees with the cold one byte for byte."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.canary import reweigh
from compiler.incremental import IncrementalCompiler
from compiler.pipeline import compile_dir
from compiler.plan import make_plan, render_text
from compiler.source import read_policy_dir
from runtime.bundle import canonical_json

REPO = Path(__file__).resolve().parents[2]

CANARY = """\
apiVersion: meshc/v1alpha1
kind: Canary
mesh: default
metadata:
  name: benigno-v2
spec:
  targetRef: {kind: %(kind)s, name: route-1}
  canary: {version: v2}
  steps:
    - setWeight: 25
    - pause: {duration: 30s}
    - setWeight: 100
"""
CANARY_TR = CANARY % {"kind": "TrafficRoute"}
CANARY_MHR = CANARY % {"kind": "MeshHTTPRoute"}


@given(
    st.lists(st.integers(0, 1000), min_size=2, max_size=6),
    st.integers(0, 100),
    st.data(),
)
@settings(max_examples=200, deadline=None, derandomize=True)
def test_reweigh_gives_the_canary_its_share_and_keeps_the_others_in_proportion(
    weights: list[int], percent: int, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(weights) - 1))
    out = reweigh(weights, at, percent)
    assert sum(out) == 100 and out[at] == percent and min(out) >= 0
    others = [i for i in range(len(weights)) if i != at]
    total = sum(weights[i] for i in others)
    for i in others:
        exact = (100 - percent) * (weights[i] / total if total else 1 / len(others))
        assert abs(out[i] - exact) < 1  # largest remainder: never a whole point off


def _repo(tmp_path: Path, src: Path, canary: str) -> Path:
    d = tmp_path / "repo"
    shutil.copytree(src, d)
    (d / "canary.yaml").write_text(canary)
    return d


def _set_weights(d: Path, v1: int, v2: int) -> None:
    """Edit the route's weights as a person would in a commit (the seed's 90/10)."""
    for f in d.glob("*.yaml"):
        text = f.read_text()
        if "route-1" not in text or "Canary" in text:
            continue
        text = re.sub(r"weight: 90(\b)", rf"weight: {v1}\1", text)
        text = re.sub(r"weight: 10(\b)", rf"weight: {v2}\1", text)
        f.write_text(text)


@pytest.mark.parametrize(
    ("src", "canary"),
    [(REPO / "policies", CANARY_TR), (REPO / "docs" / "examples" / "targetref", CANARY_MHR)],
    ids=["TrafficRoute", "MeshHTTPRoute"],
)
def test_each_step_compiles_to_what_a_commit_with_its_weights_would(
    tmp_path: Path, src: Path, canary: str
) -> None:
    d = _repo(tmp_path, src, canary)
    r = compile_dir(d)
    assert r.errors == 0, [x.message for x in r.diagnostics]
    rec = r.canaries["default/benigno-v2"]
    assert rec["git_weight"] == 10 and sorted(rec["overlays"]) == ["100", "25"]
    assert [s["weight"] for s in rec["splits"]["25"]] == [75, 25]
    for w in (25, 100):
        edited = tmp_path / f"w{w}"
        shutil.copytree(d, edited)
        _set_weights(edited, 100 - w, w)
        want = compile_dir(edited)
        overlay = rec["overlays"][str(w)]
        assert overlay, "a step that changes the split changes a bundle"
        for key, digest in want.digests.items():
            expected = overlay.get(key, r.digests[key])
            assert expected == digest, (w, key)
            if key in overlay:
                assert r.step_bundles[digest] == want.bundles[key]


def test_a_canary_changes_no_release_bundle(tmp_path: Path) -> None:
    base = compile_dir(REPO / "policies")
    with_canary = compile_dir(_repo(tmp_path, REPO / "policies", CANARY_TR))
    assert with_canary.digests == base.digests
    assert "canaries" not in base.release and "canaries" in with_canary.release


def test_plan_shows_each_steps_weights_and_the_bundles_it_changes(tmp_path: Path) -> None:
    base = compile_dir(REPO / "policies")
    head = compile_dir(_repo(tmp_path, REPO / "policies", CANARY_TR))
    text = render_text(make_plan(base, head))
    assert "Canary default/benigno-v2 (TrafficRoute route-1 -> benigno)" in text
    assert "1. setWeight 25: version=v1 75% / version=v2 25% (canary); changes default/magnanimo" in text
    assert "2. pause 30s" in text and "3. setWeight 100: version=v1 0% / version=v2 100%" in text


@pytest.mark.parametrize(
    ("edit", "code", "line", "column"),
    [
        (lambda t: t.replace("name: route-1", "name: route-9"), "E4001", 7, 41),
        (lambda t: t.replace("canary: {version: v2}", "canary: {version: v3}"), "E4002", 8, 3),
        (lambda t: t.replace("setWeight: 25", "setWeight: 250"), "E1005", 10, 18),
        (lambda t: t + "---\n" + t.replace("name: benigno-v2", "name: second"), "E4003", 20, 3),
    ],
    ids=["unknown-route", "tags-pick-nothing", "weight-range", "two-canaries-one-route"],
)
def test_a_bad_canary_points_at_the_line(
    tmp_path: Path, edit: object, code: str, line: int, column: int
) -> None:
    assert callable(edit)
    d = _repo(tmp_path, REPO / "policies", edit(CANARY_TR))
    r = compile_dir(d)
    got = [(x.code, x.file, x.span.line, x.span.column) for x in r.diagnostics if x.severity == "error"]
    assert got[0][:3] == (code, "canary.yaml", line), got
    assert got[0][3] == column, got
    assert not r.bundles, "a compile with errors builds nothing"


def test_the_incremental_compiler_agrees_byte_for_byte(tmp_path: Path) -> None:
    d = _repo(tmp_path, REPO / "policies", CANARY_TR)
    inc = IncrementalCompiler(out=tmp_path / "out")
    first = inc.update(read_policy_dir(d))
    cold = compile_dir(d)
    assert canonical_json(first.result.release) == canonical_json(cold.release)
    assert first.release_bytes == canonical_json(cold.release) + b"\n"  # the fast fragment path
    assert first.result.step_bundles == cold.step_bundles
    (d / "canary.yaml").write_text(CANARY_TR.replace("setWeight: 25", "setWeight: 40"))
    upd = inc.update(read_policy_dir(d))
    second = upd.result
    cold = compile_dir(d)
    assert upd.release_bytes == canonical_json(cold.release) + b"\n"
    assert second.step_bundles == cold.step_bundles
    assert sorted(second.canaries["default/benigno-v2"]["overlays"]) == ["100", "40"]
    written = {p.name.removesuffix(".json") for p in (tmp_path / "out" / "bundles").iterdir()}
    assert set(second.step_bundles) <= written, "step bundles are written beside the others"
