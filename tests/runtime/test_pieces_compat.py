"""Mixed-version meshes (``runtime.pieces`` formats, issue 11): rolling upgrades in either order.

A data plane declares the mesh manifest formats it runs (``Registration.pieces_formats``); one
from before the declaration runs format 1 only. The control plane serves each the newest format
both speak, the format 1 view made from the same pieces and only when some data plane needs it.

Pure checks of the view and the choice first; then real processes built from this repo's own
history: a sidecar of the last commit before format 2 (``OLD_SIDECAR``, ``git archive`` into a
temp dir, run with this venv) beside a current one, against the current control plane, on
each HTTP data plane; and a current sidecar against the control plane of the last commit before
``pieces_formats`` (``OLD_CONTROL_PLANE``). Skipped with the reason when the clone lacks that
history (a shallow clone).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import REPO, Plane, Upstream, metric_value, wait_until
from secure_mesh import ControlPlaneProc
from test_pieces import SERVICES, DeltaMesh, _beta_timeout, _policies, _synced, compiled, outbound_name

from compiler.ca import TokenIssuer
from compiler.controlplane.pieces import PieceStore
from runtime.bundle import bundle_digest
from runtime.pieces import (
    FORMATS,
    MeshManifest,
    MeshPieces,
    assemble,
    choose_format,
    split_mesh,
)
from runtime.protocol import Registration

__all__ = ["compiled"]  # the fixture, shared with test_pieces

DATAPLANE_CHOSEN_BY_TEST = True
DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
pytestmark = pytest.mark.timeout(600)

OLD_SIDECAR = "151c3769b4c19a0f54ed33066d3dfef5f66578fa"
"""The last commit before manifest format 2: its sidecars run format 1 only and declare nothing."""
OLD_CONTROL_PLANE = "1fc29307775a0ed910dbb39e9480a50c2094d6d5"
"""The last commit before ``pieces_formats``: its control plane refuses the field (extra_forbidden)."""


# --- pure: the format 1 view and the choice ----------------------------------------------------


def _chunks(mp: MeshPieces) -> list[str]:
    return [d for d in mp.catalog if d not in mp.children]


def test_the_format_1_view_is_the_trees_chunks_under_a_flat_manifest(compiled: tuple[bytes, bytes]) -> None:
    before, _ = compiled
    mp = split_mesh(before)
    assert mp.children, "704 services make an index level"
    view = mp.as_format(1)
    assert view is mp.as_format(1) and mp.as_format(2) is mp  # made once
    manifest = MeshManifest.model_validate_json(view.manifest)
    assert manifest.format == 1 and list(manifest.catalog) == _chunks(mp) == list(view.catalog)
    assert view.digest == bundle_digest(view.manifest) != mp.digest
    # The same pieces (not a copy): nothing is split again for format 1.
    assert view.pieces is mp.pieces and view.destinations is mp.destinations
    # Its manifest differs from format 2's in the catalog and the format only.
    one, two = json.loads(view.manifest), json.loads(mp.manifest)
    assert {k: v for k, v in one.items() if k not in ("catalog", "format")} == {
        k: v for k, v in two.items() if k not in ("catalog", "format")
    }
    assert one["format"] == 1 and two["format"] == 2
    # Both assemble to the same mesh bundle.
    full1 = assemble(view.manifest, [view.pieces[d] for d in view.wanted(None)], {}, None)
    full2 = assemble(mp.manifest, [mp.pieces[d] for d in mp.wanted(None)], {}, None)
    assert full1.bundle() == full2.bundle()
    assert mp.views() == [mp, view]
    with pytest.raises(ValueError, match="no format 3"):
        mp.as_format(3)


def test_a_format_1_data_plane_gets_the_chunks_that_changed(compiled: tuple[bytes, bytes]) -> None:
    before, after = compiled
    store = PieceStore()
    old, new = store.mesh("b", before), store.mesh("a", after)
    v_old, v_new = old.as_format(1), new.as_format(1)
    assert store.by_manifest(v_old.digest) is v_old and store.by_manifest(old.digest) is old
    # One destination changed: one chunk is new (its index pieces are not in format 1).
    assert v_new.catalog_since(v_old) == tuple(
        sorted(set(_chunks(new)) - set(_chunks(old)), key=_chunks(new).index)
    )
    assert len(v_new.catalog_since(v_old)) == 1
    # A data plane moving between formats keeps what it holds: from format 1 to 2 it lacks the
    # index pieces and the changed chunk only; from 2 to 1 the changed chunk only.
    assert set(new.catalog_since(v_old)) == set(new.children) | set(v_new.catalog_since(v_old))
    assert v_new.catalog_since(old) == v_new.catalog_since(v_old)


def test_an_incremental_assemble_across_formats_is_the_full_one(compiled: tuple[bytes, bytes]) -> None:
    before, after = compiled
    old, new = split_mesh(before), split_mesh(after)
    for a, b in ((old, new.as_format(1)), (old.as_format(1), new), (old.as_format(1), new.as_format(1))):
        prev = assemble(a.manifest, [a.pieces[d] for d in a.wanted(None)], {}, None)
        carried = [b.pieces[d] for d in b.catalog_since(a)] + [b.pieces[b.destinations["beta"]]]
        inc = assemble(b.manifest, carried, prev.pieces, set(prev.held), prev)
        full = assemble(b.manifest, [b.pieces[d] for d in b.wanted(None)], {}, None)
        assert inc.bundle() == full.bundle() and inc.manifest.format == b.format
        assert inc.chunks == full.chunks and set(inc.nodes) == set(full.nodes)


def test_the_newest_common_format_is_served() -> None:
    assert FORMATS == (1, 2)
    assert choose_format(None) == 1  # declared nothing: from before format 2
    assert choose_format([1, 2]) == 2
    assert choose_format([2, 1, 9]) == 2
    assert choose_format([1]) == 1
    assert choose_format([7]) is None and choose_format([]) is None
    assert choose_format([1, 3], produced=(1, 2, 3)) == 3


def test_the_registration_leaves_out_pieces_formats_when_unset() -> None:
    plain = Registration(service="caller", admin_address="127.0.0.1:7001", pieces=True)
    assert "pieces_formats" not in plain.model_dump_json()
    assert "pieces_formats" not in plain.model_dump()
    declared = plain.model_copy(update={"pieces_formats": [1, 2]})
    assert json.loads(declared.model_dump_json())["pieces_formats"] == [1, 2]
    assert Registration.model_validate_json(declared.model_dump_json()) == declared


# --- real processes: older sidecars and control planes from git history ------------------------


def _tree_at(commit: str, dest: Path, *paths: str) -> Path:
    """This repo's ``paths`` at ``commit``, extracted into ``dest`` (skip without that history)."""
    probe = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(
            f"commit {commit[:12]} is not in this clone's history (a shallow clone?): "
            "no older version to run against"
        )
    out = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _rows(mesh: DeltaMesh) -> dict[str, dict[str, Any]]:
    return {r["instance"]: r for r in mesh.cp.api("/api/v1/status")["dataplanes"]}


def _timeout_ms(plane: Plane) -> int:
    cfg = plane.config()["bundles"]["mesh"]["bundle"]
    ms: int = cfg["destinations"]["beta"]["timeout"][0]["conf"]["http_request_timeout_ms"]
    return ms


@pytest.fixture(scope="module", params=DATAPLANES)
def mixed_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeltaMesh]:
    """The current control plane; beta and caller current sidecars, ``old`` a caller sidecar of
    ``OLD_SIDECAR`` (format 1 only)."""
    work = tmp_path_factory.mktemp(f"mixed-{request.param}")
    old_tree = _tree_at(OLD_SIDECAR, work / "old-tree", "runtime")
    policies = work / "policies"
    _policies(policies)
    (work / "cp-state").mkdir()
    cp = ControlPlaneProc(policies, work)
    tokens = TokenIssuer(cp.secrets)
    mesh = DeltaMesh(work, policies, cp, tokens, request.param, Upstream("beta-app"), Upstream("outside"), {})
    try:
        cp.start()
        planes = [mesh.start("beta", "beta"), mesh.start("caller", "caller")]
        wait_until(lambda: all(_synced(mesh, p) for p in planes), "the new sidecars SYNCED")
        # No data plane needs format 1 yet: no view of it is made.
        assert list(cp.api("/api/v1/status")["manifest_formats"]["default"]) == ["2"]
        planes.append(mesh.start("old", "caller", repo=old_tree))
        wait_until(lambda: all(_synced(mesh, p) for p in planes), "the old and the new sidecars SYNCED")
        yield mesh
    finally:
        for p in mesh.planes.values():
            p.close()
        cp.stop()
        mesh.beta_app.close()
        mesh.outside.close()


def test_an_old_and_a_new_sidecar_both_sync_and_route(mixed_mesh: DeltaMesh) -> None:
    old, new = mixed_mesh.planes["old"], mixed_mesh.planes["caller"]
    st = mixed_mesh.cp.api("/api/v1/status")
    rows = {r["instance"]: r for r in st["dataplanes"]}
    old_row, new_row = rows[old.config()["instance"]], rows[new.config()["instance"]]
    # The old one declared nothing (nor per-service endpoints: it is the old code that runs).
    assert old_row["pieces"] and old_row["pieces_formats"] is None and not old_row["endpoint_deltas"]
    assert old_row["pieces_format"] == 1
    assert new_row["pieces_formats"] == list(FORMATS) and new_row["pieces_format"] == 2
    formats = st["manifest_formats"]["default"]
    assert formats["2"] == st["manifests"]["default"] and formats["1"] != formats["2"]
    assert old.config()["bundles"]["mesh"]["digest"] == formats["1"] == old_row["slots"]["mesh"]["acked"]
    assert new.config()["bundles"]["mesh"]["digest"] == formats["2"] == new_row["slots"]["mesh"]["acked"]
    # Both hold the whole catalog and their scope; beta comes on demand to each.
    for plane in (old, new):
        pieces = plane.config()["bundles"]["mesh"]["pieces"]
        assert pieces["held"] == ["alpha"] and len(pieces["pending"]) == len(SERVICES) - 1
        assert outbound_name(plane, "beta") == "beta-app"
        assert "beta" in plane.config()["bundles"]["mesh"]["pieces"]["held"]
        assert outbound_name(plane, mixed_mesh.outside.address) == "outside"  # passthrough


def test_a_mesh_wide_change_reaches_both_formats(mixed_mesh: DeltaMesh) -> None:
    old, new = mixed_mesh.planes["old"], mixed_mesh.planes["caller"]
    before = mixed_mesh.cp.api("/api/v1/status")["manifest_formats"]["default"]
    received = metric_value(old.metrics(), "meshc_push_received_bytes_total", slot="mesh")
    assert _timeout_ms(old) == _timeout_ms(new) == 7000
    _beta_timeout(mixed_mesh.policies, 13)

    def moved() -> bool:
        now = mixed_mesh.cp.api("/api/v1/status")["manifest_formats"]["default"]
        return (
            now.get("1") not in (None, before["1"])
            and now.get("2") not in (None, before["2"])
            and all(_synced(mixed_mesh, p) for p in mixed_mesh.planes.values())
        )

    wait_until(moved, "both manifests of the new release SYNCED")
    after = mixed_mesh.cp.api("/api/v1/status")["manifest_formats"]["default"]
    assert old.config()["bundles"]["mesh"]["digest"] == after["1"]
    assert new.config()["bundles"]["mesh"]["digest"] == after["2"]
    assert _timeout_ms(old) == _timeout_ms(new) == 13000
    for plane in (old, new):
        assert outbound_name(plane, "beta") == "beta-app"
    # To the old sidecar: the format 1 manifest, the one chunk that changed and beta's piece
    # (it held beta), not the whole catalog.
    mp = split_mesh(
        (
            mixed_mesh.work
            / "out"
            / "bundles"
            / f"{mixed_mesh.cp.api('/api/v1/release')['bundles']['default']}.json"
        ).read_bytes()
    ).as_format(1)
    assert mp.digest == after["1"]
    got = metric_value(old.metrics(), "meshc_push_received_bytes_total", slot="mesh") - received
    whole = len(mp.body(mp.wanted(None)))
    assert len(mp.manifest) < got < len(mp.manifest) + 64 * 220 + 2 * len(mp.pieces[mp.destinations["beta"]])
    assert got * 5 < whole, (got, whole)


def test_a_current_sidecar_that_declares_format_1_only_is_served_format_1(mixed_mesh: DeltaMesh) -> None:
    """What a rollback pins (``--pieces-formats 1``): the declared list is what is served."""
    one = mixed_mesh.start("one", "caller", "--pieces-formats", "1")
    try:
        wait_until(lambda: _synced(mixed_mesh, one), "the format 1 sidecar SYNCED")
        row = mixed_mesh.row(one.config()["instance"])
        assert row["pieces_formats"] == [1] and row["pieces_format"] == 1
        formats = mixed_mesh.cp.api("/api/v1/status")["manifest_formats"]["default"]
        assert one.config()["bundles"]["mesh"]["digest"] == formats["1"]
        assert outbound_name(one, "beta") == "beta-app"
    finally:
        one.close()
        del mixed_mesh.planes["one"]


def test_a_sidecar_without_a_common_format_is_told_and_keeps_running(mixed_mesh: DeltaMesh) -> None:
    odd = mixed_mesh.start("odd", "caller", "--pieces-formats", "7")

    def told() -> dict[str, Any] | None:
        row = _rows(mixed_mesh).get(odd.config()["instance"] or "")
        return row if row and "no mesh manifest format in common" in (row.get("last_nack") or "") else None

    row = wait_until(told, "the status to say there is no common format")
    assert row["pieces_formats"] == [7] and row["pieces_format"] is None
    assert row["status"] == "NOT SENT" and row["state"] == "Online"
    assert "formats [7]" in row["last_nack"] and "[1, 2]" in row["last_nack"]
    assert row["slots"]["mesh"]["acked"] is None and row["slots"]["service"]["acked"] is None
    # It keeps running (heartbeats, not a crash loop), serving nothing it was not given.
    beats = row["last_seen_ago_s"]
    wait_until(
        lambda: (
            _rows(mixed_mesh)[row["instance"]]["last_seen_ago_s"] < max(beats, 0.5)
            and odd.proc.poll() is None
        ),
        "another heartbeat",
    )
    cfg = odd.config()
    assert not cfg["ready"] and "mesh" not in cfg["bundles"]
    # The others are unaffected (SYNCED again after the endpoint push its registration made).
    wait_until(
        lambda: all(_synced(mixed_mesh, mixed_mesh.planes[n]) for n in ("beta", "caller", "old")),
        "the others SYNCED",
    )
    odd.close()
    del mixed_mesh.planes["odd"]


def test_each_keeps_its_format_across_control_plane_restarts(mixed_mesh: DeltaMesh) -> None:
    """Restored from the control plane's registry file, then (that file gone) re-registered:
    the old sidecar is served format 1 and the new one format 2 both times."""
    old, new = mixed_mesh.planes["old"], mixed_mesh.planes["caller"]
    instances = {old.config()["instance"]: 1, new.config()["instance"]: 2}
    registry = mixed_mesh.cp.secrets / "registry.json"
    for forget in (False, True):
        mixed_mesh.cp.stop()
        if forget:
            registry.unlink()
        mixed_mesh.cp.start()

        def served() -> bool:
            # with the registry gone, a row is there only once that data plane registered again
            rows = _rows(mixed_mesh)
            return all(i in rows and rows[i]["pieces_format"] == f for i, f in instances.items()) and all(
                _synced(mixed_mesh, p) for p in (old, new)
            )

        wait_until(served, f"both SYNCED in their formats (registry {'gone' if forget else 'kept'})")
        rows = _rows(mixed_mesh)
        formats = mixed_mesh.cp.api("/api/v1/status")["manifest_formats"]["default"]
        assert old.config()["bundles"]["mesh"]["digest"] == formats["1"]
        assert new.config()["bundles"]["mesh"]["digest"] == formats["2"]
        assert rows[new.config()["instance"]]["pieces_formats"] == list(FORMATS)
        assert rows[old.config()["instance"]]["pieces_formats"] is None
        for plane in (old, new):
            assert outbound_name(plane, "beta") == "beta-app"


@pytest.fixture(scope="module", params=DATAPLANES)
def old_cp_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeltaMesh]:
    """The control plane of ``OLD_CONTROL_PLANE`` (format 2 to every pieces data plane, and no
    ``pieces_formats`` in its registration); beta and caller current sidecars."""
    work = tmp_path_factory.mktemp(f"old-cp-{request.param}")
    old_tree = _tree_at(OLD_CONTROL_PLANE, work / "old-tree", "compiler", "runtime")
    policies = work / "policies"
    _policies(policies)
    (work / "cp-state").mkdir()
    cp = ControlPlaneProc(policies, work, repo=old_tree)
    tokens = TokenIssuer(cp.secrets)
    mesh = DeltaMesh(work, policies, cp, tokens, request.param, Upstream("beta-app"), Upstream("outside"), {})
    try:
        cp.start()
        planes = [mesh.start("beta", "beta"), mesh.start("caller", "caller")]
        wait_until(
            lambda: all(_synced(mesh, p) for p in planes), "new sidecars SYNCED with the old control plane"
        )
        yield mesh
    finally:
        for p in mesh.planes.values():
            p.close()
        cp.stop()
        mesh.beta_app.close()
        mesh.outside.close()


def test_a_new_sidecar_runs_with_an_older_control_plane(old_cp_mesh: DeltaMesh) -> None:
    caller = old_cp_mesh.planes["caller"]
    row = old_cp_mesh.row(caller.config()["instance"])
    assert "pieces_format" not in row and "pieces_formats" not in row  # the old control plane
    assert "does not know pieces_formats; registering without it" in caller.stderr()
    manifest = old_cp_mesh.cp.api("/api/v1/status")["manifests"]["default"]
    assert caller.config()["bundles"]["mesh"]["digest"] == manifest
    assert outbound_name(caller, "beta") == "beta-app"
    before = _timeout_ms(caller)
    _beta_timeout(old_cp_mesh.policies, 17)
    wait_until(
        lambda: (
            old_cp_mesh.cp.api("/api/v1/status")["manifests"]["default"] != manifest
            and _synced(old_cp_mesh, caller)
        ),
        "the change SYNCED from the old control plane",
    )
    assert before == 7000 and _timeout_ms(caller) == 17000
    assert outbound_name(caller, "beta") == "beta-app"
