"""``meshc plan``: real temporary Git repos, both sides read from the object store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler.cli import main
from compiler.pipeline import compile_dir
from compiler.plan import make_plan, render_text

REPO = Path(__file__).resolve().parents[2]

SERVICE = """\
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: payments}
spec: {port: 8080, protocol: http, subsets: [{version: v1}]}
---
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {name: magnanimo-to-payments}
spec:
  sources: [{match: {kuma.io/service: magnanimo}}]
  destinations: [{match: {kuma.io/service: payments}}]
"""


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    shutil.copytree(REPO / "policies", r / "policies")
    (r / "README.md").write_text("policies\n")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "base")
    return r


def plan(repo: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", str(repo / "policies"), *args])
    out, err = capsys.readouterr()
    return code, out, err


def edit_weights(repo: Path, v1: int, v2: int) -> None:
    p = repo / "policies" / "traffic-route.yaml"
    text = p.read_text().replace("weight: 90", f"weight: {v1}").replace("weight: 10", f"weight: {v2}")
    p.write_text(text)


def status(repo: Path) -> str:
    return git(repo, "status", "--porcelain", "--untracked-files=all")


def test_weight_change_shows_split_delta_and_exit_1(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_weights(repo, 50, 50)
    code, out, err = plan(repo, capsys, "--base", "HEAD", "--exit-code")
    assert code == 1, err
    line = next(x for x in out.splitlines() if x.startswith("~ default/magnanimo"))
    assert "benigno split: v1 90→50, v2 10→50" in line
    assert "Plan: 0 to add, 1 to change, 0 to remove, 3 unchanged." in out
    # Without --exit-code a successful plan exits 0 whatever it found.
    code, out2, _ = plan(repo, capsys, "--base", "HEAD")
    assert code == 0 and out2 == out


def test_retry_and_timeout_deltas(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = repo / "policies" / "benigno-retry.yaml"
    p.write_text(p.read_text().replace("numRetries: 2", "numRetries: 3"))
    t = repo / "policies" / "benigno-timeout.yaml"
    t.write_text(t.read_text().replace("requestTimeout: 5s", "requestTimeout: 1500ms"))
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--exit-code")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("~ default/magnanimo"))
    assert "retries 2→3" in line and "request timeout 5s→1500ms" in line
    # The retry and timeout apply to every caller: the mesh bundle's default for benigno changes too.
    assert any(x.startswith("~ default ") and "retries 2→3" in x for x in out.splitlines())


def test_comment_only_edit_and_rename_is_no_change(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = repo / "policies" / "traffic-route.yaml"
    p.write_text("# a reviewer's note\n" + p.read_text().replace("# The tutorial", "# Our tutorial"))
    (repo / "policies" / "benigno-retry.yaml").rename(repo / "policies" / "retries.yaml")
    code, out, err = plan(repo, capsys, "--base", "HEAD", "--exit-code")
    assert code == 0, err
    assert "No changes" in out
    assert "Plan: 0 to add, 0 to change, 0 to remove, 4 unchanged." in out


def test_broken_head_exits_2_with_diagnostics(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = repo / "policies" / "traffic-route.yaml"
    p.write_text(p.read_text().replace("version: v2", "version: v3"))
    code, out, err = plan(repo, capsys, "--base", "HEAD", "--exit-code")
    assert code == 2
    assert out == ""
    assert "head (work tree) does not compile" in err
    assert "policies/traffic-route.yaml:" in err and "E2002" in err


def test_broken_base_exits_2(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = repo / "policies" / "mesh.yaml"
    good = p.read_text()
    p.write_text(good + "  unknownKey: 1\n")
    git(repo, "commit", "-q", "-am", "broken")
    p.write_text(good)
    code, _, err = plan(repo, capsys, "--base", "HEAD")
    assert code == 2
    assert "the base (HEAD) does not compile" in err


def test_unknown_revision_exits_2(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(repo, capsys, "--base", "no-such-branch")
    assert code == 2 and out == ""
    # says which flag, what is wrong and what to do (not a bare `git rev-parse ...:`)
    assert err.startswith("meshc plan: --base no-such-branch: revision 'no-such-branch' is not a commit")
    assert "git fetch" in err and "rev-parse" not in err


def test_plan_outside_git_names_the_base_not_ref(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    code, out, err = plan(tmp_path, capsys, "--base", "main")
    assert code == 2 and out == ""
    assert err.startswith("meshc plan: --base main: ") and "not in a Git repository" in err
    assert "--ref" not in err


def test_json_paths_have_no_empty_segment(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = repo / "policies" / "benigno-retry.yaml"
    p.write_text(p.read_text().replace("numRetries: 2", "numRetries: 3"))
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--format", "json")
    assert code == 0
    paths = [d["path"] for rc in json.loads(out)["resource_changes"] for d in rc["change"]["deltas"]]
    assert ["retry", "*", "http", "num_retries"] in paths
    assert all(seg for path in paths for seg in path), paths


def test_add_service_is_create_in_json(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "policies" / "payments.yaml").write_text(SERVICE)
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--format", "json", "--exit-code")
    assert code == 1
    doc = json.loads(out)
    assert doc["format_version"] == "1.0"
    assert doc["base"]["ref"] == "HEAD" and len(doc["base"]["commit"]) == 40
    assert doc["head"]["ref"] == "work tree" and doc["head"]["commit"] is None
    changes = {c["address"]: c for c in doc["resource_changes"]}
    pay = changes["default/payments"]["change"]
    assert pay["actions"] == ["create"] and pay["before"] is None and len(pay["after"]) == 64
    assert changes["default/benigno"]["change"]["actions"] == ["no-op"]
    mesh = changes["default"]["change"]
    assert mesh["actions"] == ["update"] and mesh["before"] != mesh["after"]
    assert any(d["text"].startswith("catalog +service payments (:8080 http") for d in mesh["deltas"])
    mag = changes["default/magnanimo"]["change"]
    assert mag["actions"] == ["no-op"] and mag["deltas"] == []
    assert doc["summary"] == {"add": 1, "change": 1, "remove": 0, "unchanged": 3, "has_changes": True}


def test_remove_service_is_delete(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "policies" / "payments.yaml").write_text(SERVICE)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "payments")
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--head", "HEAD~1", "--format", "json")
    assert code == 0
    changes = {c["address"]: c["change"] for c in json.loads(out)["resource_changes"]}
    assert changes["default/payments"]["actions"] == ["delete"]
    assert changes["default/payments"]["after"] is None


def test_permission_and_gateway_deltas(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "policies" / "permission-gateway-magnanimo.yaml").unlink()
    g = repo / "policies" / "gateway-route.yaml"
    g.write_text(g.read_text().replace("value: /route1", "value: /v2"))
    code, out, _ = plan(repo, capsys, "--base", "HEAD")
    assert code == 0
    lines = out.splitlines()
    assert any(
        x.startswith("~ default/magnanimo") and "inbound permissions: -edge-gateway" in x for x in lines
    )
    gw = next(x for x in lines if x.startswith("~ default/edge-gateway"))
    assert "-listener :8080 HTTP route /route1*" in gw and "+listener :8080 HTTP route /v2*" in gw


def test_head_revision_and_nothing_written(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_weights(repo, 80, 20)
    git(repo, "commit", "-q", "-am", "canary 20%")
    edit_weights(repo, 0, 100)  # an uncommitted edit that --head HEAD must not see
    before = status(repo)
    files_before = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".git" not in p.parts)
    code, out, _ = plan(repo, capsys, "--base", "HEAD~1", "--head", "HEAD", "--exit-code")
    assert code == 1
    assert "benigno split: v1 90→80, v2 10→20" in out
    assert status(repo) == before
    assert sorted(p.relative_to(repo) for p in repo.rglob("*") if ".git" not in p.parts) == files_before


def test_markdown_renders_table_and_details(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_weights(repo, 50, 50)
    (repo / "policies" / "payments.yaml").write_text(SERVICE)
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--format", "markdown")
    assert code == 0
    assert out.startswith("### meshc plan: HEAD (`")
    assert "**Plan: 1 to add, 2 to change, 0 to remove, 2 unchanged.**" in out
    assert "| | Bundle | Digest | Changes |" in out
    row = next(x for x in out.splitlines() if x.startswith("| `~` | `default/magnanimo`"))
    assert "benigno split: v1 90→50, v2 10→50" in row and row.endswith("|")
    assert "| `+` | `default/payments` |" in out
    assert "<details><summary>Details</summary>" in out and out.rstrip().endswith("</details>")


def test_markdown_no_changes(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(repo, capsys, "--base", "HEAD", "--format", "markdown", "--exit-code")
    assert code == 0
    assert "No changes" in out and "|" not in out


def test_make_plan_is_pure_and_conditioned_rules_are_labelled(tmp_path: Path) -> None:
    base = tmp_path / "a"
    shutil.copytree(REPO / "policies", base)
    head = tmp_path / "b"
    shutil.copytree(REPO / "policies", head)
    (head / "v2-route.yaml").write_text(
        """\
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata: {name: v2-callers}
spec:
  sources: [{match: {kuma.io/service: magnanimo, version: v2}}]
  destinations: [{match: {kuma.io/service: benigno}}]
  conf:
    destination: {kuma.io/service: benigno, version: v2}
"""
    )
    m = head / "magnanimo.yaml"
    m.write_text(m.read_text() + "  subsets: [{version: v1}, {version: v2}]\n")
    a, b = compile_dir(base), compile_dir(head)
    assert not b.errors, b.diagnostics
    text = render_text(make_plan(a, b, "a", "b"))
    line = next(x for x in text.splitlines() if x.startswith("~ default/magnanimo"))
    assert "benigno +route [on v2] (split v2 100)" in line, line


def test_plan_help_is_real(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--base REV" in out and "--exit-code" in out and "exit codes:" in out


def test_mesh_bundle_slices_match_a_full_decode() -> None:
    from compiler.plan import _MeshView, _pruned_mesh_pair, _split_mesh

    raw = compile_dir(REPO / "policies").bundles["default"]
    cut = _split_mesh(raw)
    assert cut is not None
    slices, rest = cut
    full = json.loads(raw)
    assert {k: json.loads(v) for k, v in slices.items()} == full["destinations"]
    assert json.loads(rest) == {**full, "destinations": {}}
    # A layout it does not know (no destinations marker) falls back to a full decode.
    odd = raw.replace(b'"circuit_breaker"', b'"a_new_first_field":1,"circuit_breaker"')
    assert _split_mesh(odd) is None
    view = _MeshView(odd)
    assert view.destination("benigno") == json.loads(odd)["destinations"]["benigno"]
    old, new = _pruned_mesh_pair(_MeshView(raw), _MeshView(raw))
    assert old["destinations"] == {} == new["destinations"]


def test_inbound_timeout_and_limit_deltas(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Inbound MeshTimeout and MeshCircuitBreaker show as the service's inbound rules, a circuit
    breaker by its connection limits (outlier detection is not used inbound)."""
    (repo / "policies" / "benigno-inbound.yaml").write_text(
        "apiVersion: kuma.io/v1alpha1\nkind: MeshTimeout\n"
        "metadata: {name: benigno-in, labels: {kuma.io/mesh: default}}\n"
        "spec:\n  targetRef: {kind: MeshService, name: benigno}\n"
        "  from: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 2s}}]\n---\n"
        "apiVersion: kuma.io/v1alpha1\nkind: MeshCircuitBreaker\n"
        "metadata: {name: benigno-cb, labels: {kuma.io/mesh: default}}\n"
        "spec:\n  targetRef: {kind: MeshService, name: benigno}\n"
        "  from: [{targetRef: {kind: Mesh}, default: {connectionLimits: {maxConnections: 2}}}]\n"
    )
    code, out, err = plan(repo, capsys, "--base", "HEAD", "--exit-code")
    assert code == 1, err
    line = next(x for x in out.splitlines() if x.startswith("~ default/benigno"))
    assert "inbound +timeout * (connect timeout 2s" in line
    assert "+circuit breaker * (thresholds max connections 2," in line and "ejection" not in line
