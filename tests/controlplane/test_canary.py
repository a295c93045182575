"""Canary (issue 16) on real processes: the seed mesh, its control plane following ``main`` of a temp
Git repo that holds a Canary of benigno v2, traffic through the real gateway.

One mesh, one story in order (each test builds on the one before, as a rollout does): low traffic
holds as inconclusive; a healthy v2 is promoted step by step and waits at a manual pause; a
control plane restarted mid-canary resumes at the same step; ``meshc canary promote`` finishes it;
a v2 that answers 503 is rolled back to the weights in Git after ``failureLimit`` failed runs.
Nothing in Git changes: the test checks the repo's HEAD at the end.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_harness import (
    chromium_api,
    commit_file,
    drive,
    git,
    launch_chromium,
    make_policy_repo,
    within_binomial,
)

from compiler.demo import DemoMesh
from compiler.pipeline import compile_dir

CANARY = """\
apiVersion: meshc/v1alpha1
kind: Canary
mesh: default
metadata:
  name: benigno-v2
spec:
  targetRef: {kind: TrafficRoute, name: route-1}
  canary: {version: v2}
  steps:
    - setWeight: 50
    - analysis: {runs: 2}
    - pause: {}
    - setWeight: 100
  analysis:
    interval: 1s
    failureLimit: 2
    inconclusiveLimit: 2
    minRequests: 10
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 95}}
      - {name: request-duration, percentile: 99, thresholdRange: {max: 5000}}
"""
KEY = "default/benigno-v2"
BRANCH = "meshc/promote/default-benigno-v2"
HANG = 90.0
"""Generous limits that only catch a hang; no test measures speed."""


@pytest.fixture(scope="module")
def policy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = make_policy_repo(tmp_path_factory.mktemp("gitops") / "repo")
    commit_file(r, "policies/canary.yaml", CANARY, "canary of benigno v2")
    return r


@pytest.fixture(scope="module")
def cp_extra_args() -> tuple[str, ...]:
    return ("--promote-commit",)


def canary(mesh: DemoMesh) -> dict[str, Any]:
    rows = [c for c in mesh.api("/api/v1/canaries")["canaries"] if c["key"] == KEY]
    assert len(rows) == 1
    return rows[0]


def meshc(mesh: DemoMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", "canary", *args, "--control-plane", mesh.cp_url],
        capture_output=True,
        text=True,
        timeout=60,
    )


class Traffic:
    """Background requests through the gateway while a phase runs (bounded in count and time)."""

    def __init__(self, mesh: DemoMesh, batches: int = 400) -> None:
        self.url = f"{mesh.gateway_url}/route1/hw2"
        self.batches = batches
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(self.batches):
            if self._stop.is_set():
                return
            drive(self.url, 20, concurrency=4)

    def __enter__(self) -> Traffic:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(timeout=60)


def until_phase(mesh: DemoMesh, *phases: str, step: int | None = None) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def ok() -> bool:
        got.update(canary(mesh))
        return got["phase"] in phases and (step is None or got["step"] == step)

    mesh.wait_until(ok, HANG, f"canary {KEY} in {phases} (step {step})")
    return got


def events(c: dict[str, Any]) -> list[str]:
    return [e["event"] for e in c["history"]]


def test_low_traffic_holds_as_inconclusive_not_failed(mesh: DemoMesh) -> None:
    c = until_phase(mesh, "Inconclusive")
    assert c["weight"] == 50 and c["overridden"], c
    assert c["failed"] == 0, "low traffic must never count as a failure"
    assert c["last_run"]["result"] == "inconclusive" and "fewer than 10" in c["last_run"]["reason"]
    assert c["step"] == 1, "held at the analysis step, not past it"
    # the held weight is what data planes run: the split the control plane reports is 50/50
    assert [s["weight"] for s in c["split"]] == [50, 50]


def test_abort_returns_to_git_weights_and_retry_starts_again(mesh: DemoMesh) -> None:
    r = meshc(mesh, "abort", KEY)
    assert r.returncode == 0, r.stderr
    c = canary(mesh)
    assert c["phase"] == "Aborted" and not c["overridden"] and c["weight"] == c["git_weight"] == 10
    r = meshc(mesh, "promote", KEY)
    assert r.returncode == 1 and "Aborted" in r.stderr  # nothing to promote: said so, exit 1
    mesh.wait_until(lambda: mesh.synced() == 4, HANG, "the Git bundles ACKed again")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 400)
    assert t.failed == 0 and within_binomial(t, 0.10), t


def test_a_healthy_canary_is_promoted_step_by_step_then_waits_at_the_pause(mesh: DemoMesh) -> None:
    with Traffic(mesh):
        assert meshc(mesh, "retry", KEY).returncode == 0
        c = until_phase(mesh, "Paused", step=2)
    ev = events(c)
    assert ev.count("analysis-succeeded") >= 2 and "analysis-failed" not in ev, ev
    assert c["weight"] == 50
    mesh.wait_until(lambda: mesh.synced() == 4, HANG, "the 50% bundles ACKed")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 600)
    assert t.failed == 0 and within_binomial(t, 0.50), t
    assert canary(mesh)["phase"] == "Paused"
    text = meshc(mesh, "status", KEY)
    assert text.returncode == 0 and "Paused" in text.stdout and "> 3. pause (until promoted)" in text.stdout


def test_a_restarted_control_plane_resumes_at_the_same_step(mesh: DemoMesh) -> None:
    before = canary(mesh)
    cp = mesh.procs["controlplane"]
    cp.stop()
    assert not cp.alive()
    mesh.start_controlplane()
    mesh.wait_until(lambda: mesh.synced() == 4, HANG, "all data planes SYNCED after the restart")
    after = canary(mesh)
    assert (after["phase"], after["step"], after["weight"]) == ("Paused", before["step"], 50)
    assert any("resumed" in line for line in mesh.procs["controlplane"].tail(200).splitlines())
    t = drive(f"{mesh.gateway_url}/route1/hw2", 600)
    assert t.failed == 0 and within_binomial(t, 0.50), t


def test_the_dashboard_shows_the_steps_live(mesh: DemoMesh) -> None:
    """The GUI marks the step the canary waits at, and follows a promotion without a reload."""
    sync_api = chromium_api()
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"{mesh.cp_url}/gui", wait_until="load", timeout=30_000)
            row = page.locator("#sec-canaries tbody tr", has_text=KEY)
            assert "Paused" in row.inner_text()
            assert page.locator("#sec-canaries li.now").inner_text() == "pause (until promoted)"
            assert "version=v2 50% (canary)" in row.inner_text()
            r = meshc(mesh, "promote", KEY)
            assert r.returncode == 0, r.stderr
            page.wait_for_function(
                "document.querySelector('#sec-canaries').innerText.includes('Succeeded')", timeout=60_000
            )
            assert "version=v2 100% (canary)" in page.locator("#sec-canaries").inner_text()
        finally:
            browser.close()


def test_promote_finishes_the_canary(mesh: DemoMesh) -> None:
    if canary(mesh)["phase"] != "Succeeded":  # the dashboard test promoted it where chromium runs
        r = meshc(mesh, "promote", KEY)
        assert r.returncode == 0, r.stderr
    c = until_phase(mesh, "Succeeded")
    assert c["weight"] == 100 and c["overridden"]
    mesh.wait_until(lambda: mesh.synced() == 4, HANG, "the promoted bundles ACKed")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 200)
    assert t.failed == 0 and t.v1 == 0 and t.v2 == 200, t
    metrics = mesh_metrics(mesh)
    assert f'meshc_canary_phase{{canary="{KEY}",phase="Succeeded"}} 1.0' in metrics
    assert f'meshc_canary_weight{{canary="{KEY}"}} 100.0' in metrics


def test_the_promotion_is_a_commit_on_a_branch_that_compiles_to_what_runs(
    mesh: DemoMesh, policy_repo: Path
) -> None:
    """--promote-commit: a branch on top of main whose only change is the route's weights, comments
    kept, compiling to exactly the bundles the data planes run now; main is not moved."""
    got: dict[str, Any] = {}

    def committed() -> bool:
        got.update(canary(mesh).get("promote_commit") or {})
        return "commit" in got or "error" in got

    mesh.wait_until(committed, HANG, "the promotion commit")
    assert "error" not in got, got
    main = git(policy_repo, "rev-parse", "main")
    assert got["branch"] == BRANCH and got["base"] == main
    assert git(policy_repo, "rev-parse", BRANCH) == got["commit"]
    assert git(policy_repo, "rev-parse", f"{BRANCH}^") == main, "one commit on top of what the canary ran"
    assert git(policy_repo, "diff", "--name-only", main, BRANCH) == "policies/traffic-route.yaml"
    diff = git(policy_repo, "diff", "-U0", main, BRANCH)
    changed = [x for x in diff.splitlines() if x[:1] in "+-" and not x.startswith(("+++", "---"))]
    assert sorted(changed) == sorted(
        ["-      - weight: 90", "+      - weight: 0", "-      - weight: 10", "+      - weight: 100"]
    ), diff
    assert git(policy_repo, "status", "--porcelain") == "", "the work tree is not touched"
    # what the branch compiles to is what runs: the release with the 100% step over it
    rec_overlay = mesh.api("/api/v1/release")["canaries"][KEY]["overlays"]["100"]
    branch = compile_dir(policy_repo / "policies", ref=BRANCH)
    running = {**mesh.api("/api/v1/release")["bundles"], **rec_overlay}
    assert branch.digests == running


def test_a_failing_canary_is_rolled_back_to_git_weights(mesh: DemoMesh, policy_repo: Path) -> None:
    head = git(policy_repo, "rev-parse", "HEAD")
    app = mesh.procs.get("app-benigno-v2")
    assert app is not None, sorted(mesh.procs)
    app.stop()
    mesh.start_app("benigno-v2", "--status", "503")
    with Traffic(mesh):
        assert meshc(mesh, "retry", KEY).returncode == 0
        c = until_phase(mesh, "RolledBack")
    ev = events(c)
    started = len(ev) - 1 - ev[::-1].index("started")
    since = ev[started:]
    # rolled back at the failureLimit-th failed run, with no success at 50% in between
    assert since.count("analysis-failed") == 2 and "analysis-succeeded" not in since, since
    assert since[-1] == "rolledback"
    assert "request-success-rate" in c["reason"] and "< 95%" in c["reason"], c["reason"]
    assert not c["overridden"] and c["weight"] == 10
    mesh.wait_until(lambda: mesh.synced() == 4, HANG, "the Git bundles ACKed again")
    assert git(policy_repo, "rev-parse", "HEAD") == head, "the control plane changed nothing in Git"


def mesh_metrics(mesh: DemoMesh) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{mesh.cp_url}/metrics", timeout=10) as r:
        return str(r.read().decode())
