"""The seed scenario end to end, as real processes: control plane (GitOps mode, following main of
a temp repo), stand-in apps, sidecars and the gateway, all on 127.0.0.1.

The tests of this module share one mesh and run in file order, as the story does: the 90/10
split, the dashboard, a commit to 50/50, a broken commit, a killed sidecar, a killed control plane
and its restart. Every wait polls with a generous deadline; nothing asserts on timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cp_harness import Tally, chromium_api, commit_file, drive, git, launch_chromium, within_binomial

from compiler.demo import DemoMesh

pytestmark = pytest.mark.timeout(600)

ROUTE = "policies/traffic-route.yaml"


def _rows(mesh: DemoMesh) -> dict[str, dict[str, Any]]:
    return {r["instance"]: r for r in mesh.status()["dataplanes"]}


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return int(r.status), r.read()


def _admin_config(admin_port: int) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}/config", timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


def _running_matches_release(mesh: DemoMesh) -> bool:
    """Every data plane runs exactly the release's mesh bundle (as pieces: its manifest) and its
    own service bundle."""
    status = mesh.status()
    digests, manifests = status["digests"], status["manifests"]
    admins = [(i.spec.service, i.admin) for i in mesh.instances.values()]
    admins.append(("edge-gateway", mesh.gateway_admin))
    for service, port in admins:
        cfg = _admin_config(port)["bundles"]
        if cfg.get("mesh", {}).get("digest") != manifests["default"]:
            return False
        if cfg.get("service", {}).get("digest") != digests[f"default/{service}"]:
            return False
    return True


def _all_synced(mesh: DemoMesh, release: str | None = None) -> bool:
    st = mesh.status()
    if release is not None and st["release"] != release:
        return False
    rows = st["dataplanes"]
    return len(rows) == 4 and all(r["state"] == "Online" and r["status"] == "SYNCED" for r in rows)


def test_gateway_serves_the_seed_texts(mesh: DemoMesh) -> None:
    t = drive(f"{mesh.gateway_url}/route1/hw2", 50)
    assert t.failed == 0 and t.other == 0 and t.n == 50


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (scripts/ensure-system-deps.sh)"
)
def test_curl_http2_prior_knowledge_through_the_demo_gateway(mesh: DemoMesh) -> None:
    """HTTP/2 from curl to the gateway, h2 over mTLS to magnanimo's sidecar, HTTP/1.1 to its app."""
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}",
         f"{mesh.gateway_url}/route1/hw2"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text, _, outcome = out.stdout.rpartition("\n")
    assert outcome == "2 200" and text.startswith("Hello World, Benigno"), out.stdout


def test_split_is_90_10_over_2000_requests(mesh: DemoMesh) -> None:
    t = drive(f"{mesh.gateway_url}/route1/hw2", 2000)
    assert t.failed == 0 and t.other == 0, t
    assert within_binomial(t, 0.10), f"canary share {t.canary_share:.4f} over {t.n} requests"


def test_status_shows_every_proxy_synced(mesh: DemoMesh) -> None:
    rows = _rows(mesh)
    assert sorted(r["service"] for r in rows.values()) == ["benigno", "benigno", "edge-gateway", "magnanimo"]
    assert all(r["status"] == "SYNCED" and r["state"] == "Online" for r in rows.values()), rows
    assert _running_matches_release(mesh)


def test_api_index_openapi_and_every_view_matches_it(mesh: DemoMesh) -> None:
    """``/api/v1/`` lists the endpoints, ``/api/v1/openapi.json`` is a valid OpenAPI 3.1 document,
    and every JSON view answers what that document says."""
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    index = mesh.api("/api/v1/")
    doc = mesh.api("/api/v1/openapi.json")
    validate(doc)  # raises on an invalid OpenAPI document
    assert {(e["method"], e["path"]) for e in index["endpoints"]} == {
        (m.upper(), p) for p, ops in doc["paths"].items() for m in ops
    }
    components = {"components": doc["components"]}
    checked = 0
    for path, ops in doc["paths"].items():
        get = ops.get("get")
        if not get or "application/json" not in get["responses"].get("200", {}).get("content", {}):
            continue
        schema = {**get["responses"]["200"]["content"]["application/json"]["schema"], **components}
        Draft202012Validator(schema).validate(mesh.api(path))
        checked += 1
    assert checked >= 12
    # every policy points at its document's first line, not the file's modeline
    policies = mesh.api("/api/v1/policies")["policies"]
    assert policies and all(p["line"] > 1 for p in policies), policies
    code, body = _get(f"{mesh.cp_url}/favicon.ico")
    assert code == 200 and body.startswith(b"<svg")


def test_dashboard_in_headless_chromium(mesh: DemoMesh, tmp_path: Path) -> None:
    sync_api = chromium_api()
    drive(f"{mesh.gateway_url}/route1/hw2", 300)  # so the observed split has data
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            # a loaded machine can miss a 0.3 s heartbeat: look once every proxy is back in sync
            mesh.wait_until(lambda: _all_synced(mesh), 60, "every data plane Online and SYNCED")
            page.goto(f"{mesh.cp_url}/gui", wait_until="load", timeout=30_000)
            assert page.title() == "meshc control plane"
            proxies = page.locator("#sec-dataplanes tbody tr")
            assert proxies.count() == 4
            text = page.locator("#sec-dataplanes").inner_text()
            for name in ("magnanimo", "benigno", "edge-gateway", "version=v1", "version=v2"):
                assert name in text
            assert text.count("Online") == 4 and "Offline" not in text
            # every data plane of this version is served manifest format 2
            head = [h.strip() for h in page.locator("#sec-dataplanes thead th").all_inner_texts()]
            col = head.index("Format")
            cells = page.locator(f"#sec-dataplanes tbody tr td:nth-child({col + 1})").all_inner_texts()
            assert [c.strip() for c in cells] == ["2"] * 4, cells
            # no badge breaks inside itself at 1400 px ("NOT SENT" on two lines)
            heights = page.eval_on_selector_all(".badge", "els => els.map(e => e.offsetHeight)")
            assert heights and max(heights) <= min(heights) + 2, heights
            route = page.locator("#sec-traffic tbody tr", has_text="version=v1").first
            rtext = route.inner_text()
            assert "magnanimo" in rtext and "benigno" in rtext
            assert "version=v1 90%" in rtext and "version=v2 10%" in rtext, rtext
            # the page refreshes itself from /api/ without a reload
            page.wait_for_function("Number(document.body.dataset.refreshes) >= 1", timeout=30_000)
            assert "policies/traffic-route.yaml" in page.locator("#sec-policies").inner_text()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_commit_to_50_50_reaches_every_sidecar_and_the_split_follows(
    mesh: DemoMesh, policy_repo: Path
) -> None:
    before = mesh.status()
    old_gen = {i: r["slots"]["service"]["generation"] for i, r in _rows(mesh).items()}
    text = (
        (policy_repo / ROUTE)
        .read_text()
        .replace("weight: 90", "weight: 50")
        .replace("weight: 10", "weight: 50")
    )
    sha = commit_file(policy_repo, ROUTE, text, "benigno canary to 50/50")
    mesh.wait_until(lambda: mesh.status()["commit"] == sha, 60, "the control plane to compile the commit")
    mesh.wait_until(lambda: _all_synced(mesh, sha), 60, "every data plane SYNCED on the new release")
    after = mesh.status()
    changed = {k for k in after["digests"] if after["digests"][k] != before["digests"].get(k)}
    assert changed == {"default/magnanimo"}, changed
    assert _running_matches_release(mesh)
    # only the changed bundle was pushed: the others' service slots kept their push generation
    for inst, row in _rows(mesh).items():
        if row["service"] != "magnanimo":
            assert row["slots"]["service"]["generation"] == old_gen[inst]
    # the observed split starts with this release: two scrapes of it before the traffic
    mesh.wait_until(lambda: mesh.api("/api/v1/traffic")["since"] is not None, 60, "two scrapes of it")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 2000)
    assert t.failed == 0 and t.other == 0, t
    assert within_binomial(t, 0.5), f"canary share {t.canary_share:.4f} over {t.n} requests"
    seen: list[int] = []

    def observed_settles() -> bool:
        routes = mesh.api("/api/v1/traffic")["routes"]
        r = next(r for r in routes if r["kind"] == "route" and r["destination"] == "benigno")
        seen.append(r["observed"]["requests"])
        return len(seen) > 1 and seen[-1] == seen[-2] > 0 and r["observed"]["subsets"] is not None

    mesh.wait_until(observed_settles, 60, "the observed split to count the traffic", poll=2.5)
    routes = mesh.api("/api/v1/traffic")["routes"]
    obs = next(r for r in routes if r["kind"] == "route" and r["destination"] == "benigno")["observed"]
    # none of the 2,300 requests of the 90/10 release is counted in the 50/50 one
    assert 0 < obs["requests"] <= 2000, obs
    v2 = obs["subsets"].get("version=v2", {"requests": 0})["requests"]
    assert within_binomial(Tally(v1=obs["requests"] - v2, v2=v2), 0.5), obs
    # a default route to all instances of one service (gateway -> magnanimo) is not listed
    assert not [r for r in routes if r["kind"] == "default" and r["destination"] == "magnanimo"], routes


def test_broken_commit_changes_nothing_and_reports_diagnostics(mesh: DemoMesh, policy_repo: Path) -> None:
    before = mesh.status()
    good = (policy_repo / ROUTE).read_text()
    broken = good.replace("weight: 50\n", "weight: 50\n        wieght: 3\n", 1)
    sha = commit_file(policy_repo, ROUTE, broken, "a typo")

    def failed_on_it() -> bool:
        last = mesh.api("/api/v1/diagnostics")["last"]
        return bool(last and last["commit"] == sha and not last["ok"])

    mesh.wait_until(failed_on_it, 60, "the control plane to report the broken commit")
    diags = mesh.api("/api/v1/diagnostics")["last"]["diagnostics"]
    assert any(d["file"] == ROUTE and d["severity"] == "error" and d["line"] > 1 for d in diags), diags
    after = mesh.status()
    assert after["release"] == before["release"] and after["digests"] == before["digests"]
    assert _all_synced(mesh, before["release"])
    gui = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{mesh.cp_url}/gui", timeout=10)
    assert ROUTE in gui.read().decode()
    t = drive(f"{mesh.gateway_url}/route1/hw2", 200)
    assert t.failed == 0
    # repair it, so the rest of the story runs on a good head
    sha = commit_file(policy_repo, ROUTE, good, "fix the typo")
    mesh.wait_until(lambda: mesh.api("/api/v1/diagnostics")["last"]["commit"] == sha, 60, "the fix")
    assert mesh.api("/api/v1/diagnostics")["last"]["ok"]


def test_killed_sidecar_goes_offline(mesh: DemoMesh) -> None:
    victim = mesh.instances["benigno-v2"]
    name = f"benigno-{victim.admin}"
    assert _rows(mesh)[name]["state"] == "Online"
    mesh.kill("sidecar-benigno-v2")
    mesh.forget("sidecar-benigno-v2")
    mesh.wait_until(lambda: _rows(mesh)[name]["state"] == "Offline", 60, f"{name} to go Offline")

    # its endpoint leaves the set the others run
    def v2_gone() -> bool:
        eps = _admin_config(mesh.instances["magnanimo"].admin)["endpoints"]["services"]["benigno"]
        return all(e["address"] != f"127.0.0.1:{victim.inbound}" for e in eps)

    mesh.wait_until(v2_gone, 60, "magnanimo's sidecar to drop the dead endpoint")
    # bring it back for the rest of the story
    mesh.start_sidecar("benigno-v2")
    mesh.wait_until(lambda: _all_synced(mesh), 60, "the restarted sidecar to be SYNCED")


def test_killed_control_plane_leaves_traffic_serving(mesh: DemoMesh) -> None:
    mesh.kill("controlplane")
    mesh.forget("controlplane")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 1000)
    assert t.failed == 0 and t.other == 0 and t.n == 1000, t
    assert within_binomial(t, 0.5)


def test_restarted_control_plane_converges(mesh: DemoMesh, policy_repo: Path) -> None:
    head = git(policy_repo, "rev-parse", "HEAD")
    mesh.start_controlplane()
    mesh.wait_until(lambda: mesh.synced() >= 0 and _cp_up(mesh), 60, "the control plane to answer")

    def converged() -> bool:
        st = mesh.status()
        rows = st["dataplanes"]
        return (
            st["commit"] == head
            and len(rows) == 4
            and all(r["state"] == "Online" and r["status"] == "SYNCED" for r in rows)
            and all(r["endpoints_generation"] for r in rows)  # each heartbeated this control plane
        )

    mesh.wait_until(converged, 90, "every data plane Online and SYNCED after the restart")
    assert _running_matches_release(mesh)
    t = drive(f"{mesh.gateway_url}/route1/hw2", 500)
    assert t.failed == 0 and t.n == 500


def _cp_up(mesh: DemoMesh) -> bool:
    try:
        mesh.status()
    except OSError:
        return False
    return True


def test_restart_without_saved_state_sidecars_re_register(mesh: DemoMesh, policy_repo: Path) -> None:
    """The registry is lost: data planes re-register (their heartbeat gets 404), nothing is
    dropped meanwhile, and the endpoint set is only replaced once it is complete again."""
    head = git(policy_repo, "rev-parse", "HEAD")
    mesh.kill("controlplane")
    mesh.forget("controlplane")
    shutil.rmtree(mesh.work_dir / "controlplane-state")
    restarted = time.time()
    mesh.start_controlplane()
    mesh.wait_until(lambda: _cp_up(mesh), 60, "the control plane to answer")
    t = drive(f"{mesh.gateway_url}/route1/hw2", 500)
    assert t.failed == 0 and t.n == 500, t

    def re_registered() -> bool:
        rows = mesh.status()["dataplanes"]
        return len(rows) == 4 and all(
            r["registered_at"] >= restarted and r["state"] == "Online" for r in rows
        )

    mesh.wait_until(re_registered, 90, "every data plane to register again")
    mesh.wait_until(lambda: _all_synced(mesh) and mesh.status()["commit"] == head, 120, "all SYNCED again")
    assert _running_matches_release(mesh)
    eps = _admin_config(mesh.instances["magnanimo"].admin)["endpoints"]["services"]
    assert len(eps["benigno"]) == 2  # its scope (runtime.endpoints): the route's destination
    t = drive(f"{mesh.gateway_url}/route1/hw2", 500)
    assert t.failed == 0 and t.n == 500, t
