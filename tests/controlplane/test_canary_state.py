"""The Canary controller's pointer, without processes: real compiles of real repos, a real
state dir. Steps move the overlay the pusher sends; a promotion merged into Git ends the canary
without starting it again; a new controller on the same state dir resumes where it was."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from compiler.controlplane.canary import CanaryController
from compiler.controlplane.registry import Registry
from compiler.controlplane.release import ReleaseState
from compiler.controlplane.store.local import LocalStore
from compiler.pipeline import compile_dir

REPO = Path(__file__).resolve().parents[2]
CANARY = """\
apiVersion: meshc/v1alpha1
kind: Canary
mesh: default
metadata: {name: benigno-v2}
spec:
  targetRef: {kind: TrafficRoute, name: route-1}
  canary: {version: v2}
  steps: [{setWeight: 25}, {pause: {}}, {setWeight: 100}]
"""
KEY = "default/benigno-v2"


def _repo(tmp: Path) -> Path:
    d = tmp / "policies"
    shutil.copytree(REPO / "policies", d)
    (d / "canary.yaml").write_text(CANARY)
    return d


def _controller(state: Path) -> tuple[CanaryController, ReleaseState, list[set[str]]]:
    releases = ReleaseState()
    pushed: list[set[str]] = []
    store = LocalStore(state, replica="r", replica_url="http://127.0.0.1:1")
    c = CanaryController(releases, Registry(), store, on_change=pushed.append, log=lambda _: None)
    return c, releases, pushed


def _apply(c: CanaryController, releases: ReleaseState, policy_dir: Path) -> set[str]:
    changed = releases.apply(compile_dir(policy_dir), seen_at=0.0, trigger="test", duration_s=0.0)
    assert changed is not None
    c.reconcile(releases.compiled)
    return changed | releases.refresh()


def test_steps_move_the_overlay_and_a_merged_promotion_ends_the_canary(tmp_path: Path) -> None:
    d = _repo(tmp_path)
    c, releases, pushed = _controller(tmp_path / "state")
    _apply(c, releases, d)
    assert releases.current is not None and releases.compiled is not None
    git_digest = releases.compiled.digests["default/magnanimo"]
    asyncio.run(c.tick())
    st = c.states[KEY]
    assert (st["phase"], st["step"], st["weight"]) == ("Paused", 1, 25)
    rec = releases.compiled.canaries[KEY]
    assert releases.current.digests["default/magnanimo"] == rec["overlays"]["25"]["default/magnanimo"]
    assert pushed[-1] == {"default/magnanimo"}, "only the bundle the step changes is pushed"
    assert c.act(KEY, "promote") == (200, f"canary {KEY}: promote done; now Succeeded")
    assert releases.current.digests["default/magnanimo"] == rec["overlays"]["100"]["default/magnanimo"]
    # a new controller on the same state dir resumes there (the control plane restarted)
    c2, releases2, _ = _controller(tmp_path / "state")
    asyncio.run(c2.load())
    _apply(c2, releases2, d)
    assert releases2.current is not None
    assert c2.states[KEY]["phase"] == "Succeeded"
    assert releases2.current.digests == releases.current.digests
    # the promotion merges (the route at 0/100 in Git): the canary stays ended, nothing overlays
    route = d / "traffic-route.yaml"
    text = re.sub(r"weight: 90\b", "weight: 0", route.read_text())
    route.write_text(re.sub(r"weight: 10\b", "weight: 100", text))
    _apply(c2, releases2, d)
    st = c2.states[KEY]
    assert (st["phase"], st["weight"]) == ("Succeeded", None), st
    assert "in Git" in st["reason"]
    assert releases2.current.digests == releases2.compiled.digests  # Git alone, no overlay
    assert releases2.current.digests["default/magnanimo"] == rec["overlays"]["100"]["default/magnanimo"]
    assert releases2.current.digests["default/magnanimo"] != git_digest


def test_an_edit_to_the_canary_starts_it_again_and_removing_it_forgets_it(tmp_path: Path) -> None:
    d = _repo(tmp_path)
    c, releases, _ = _controller(tmp_path / "state")
    _apply(c, releases, d)
    asyncio.run(c.tick())
    assert c.states[KEY]["weight"] == 25
    (d / "canary.yaml").write_text(CANARY.replace("setWeight: 25", "setWeight: 40"))
    _apply(c, releases, d)
    assert c.states[KEY]["phase"] == "Progressing" and c.states[KEY]["weight"] is None
    assert "changed in Git" in c.states[KEY]["reason"]
    assert releases.current is not None and releases.compiled is not None
    assert releases.current.digests == releases.compiled.digests, "no step of the old spec is sent"
    (d / "canary.yaml").unlink()
    _apply(c, releases, d)
    assert KEY not in c.states
    assert KEY not in asyncio.run(LocalStore(tmp_path / "state", replica="r", replica_url="").load_canaries())
