"""Delta pushes and scoped config (``runtime.pieces``, DESIGN §4-§5), as real processes.

A control plane on a temp policy dir (no mTLS) with 704 services (a catalog tree with an index
level); ``caller``'s policies name ``alpha`` only, so it is pushed the catalog and alpha's
destination piece and nothing else;
``beta`` (an instance with its app) comes on demand. One mesh per HTTP data plane, the tests in
file order: on demand, one changed piece on the wire, a forged or mismatched piece, a restart
from a partial piece cache. Pure checks of the split and the state dir come first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import Plane, ProxyClient, Upstream, metric_value, wait_until
from secure_mesh import ControlPlaneProc

from compiler.ca import PushSigner, TokenIssuer
from runtime.bundle import (
    BundleError,
    CatalogService,
    Destination,
    MeshBundle,
    TracingBackend,
    bundle_bytes,
    bundle_digest,
    canonical_json,
    load_bundle,
)
from runtime.pieces import (
    IndexPiece,
    MeshPieces,
    MissingPieces,
    TreeShape,
    assemble,
    split_lines,
    split_mesh,
)
from runtime.protocol import (
    HDR_BUNDLE_ROLE,
    HDR_DIGEST,
    HDR_GENERATION,
    HDR_PIECES,
    HDR_SIGNATURE,
    PushTarget,
)
from runtime.state import Slot, StateDir, StoredState

DATAPLANE_CHOSEN_BY_TEST = True
DATAPLANES = tuple(os.environ.get("MESHC_DATAPLANES", "fast,aiohttp").split(","))
pytestmark = pytest.mark.timeout(600)

FILLERS = 700
SERVICES = ["caller", "alpha", "beta", "gamma", *(f"svc-{i:03d}" for i in range(FILLERS))]
"""704 services: ~44 catalog chunks under two index pieces (a real tree, with the default shape)."""


def _policies(d: Path, beta_timeout_s: int = 7) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "mesh.yaml").write_text("apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n")
    docs = [
        "apiVersion: meshc/v1alpha1\nkind: Service\nmesh: default\n"
        f"metadata: {{name: {name}}}\nspec: {{port: {5000 + i}, protocol: http}}\n"
        for i, name in enumerate(SERVICES)
    ]
    (d / "services.yaml").write_text("---\n".join(docs))
    (d / "route.yaml").write_text(
        """\
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata: {name: caller-to-alpha}
spec:
  sources: [{match: {kuma.io/service: caller}}]
  destinations: [{match: {kuma.io/service: alpha}}]
  conf: {split: [{weight: 100, destination: {kuma.io/service: alpha}}]}
"""
    )
    _beta_timeout(d, beta_timeout_s)


def _beta_timeout(d: Path, seconds: int) -> None:
    (d / "beta-timeout.yaml").write_text(
        f"""\
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {{name: beta-timeout}}
spec:
  sources: [{{match: {{kuma.io/service: "*"}}}}]
  destinations: [{{match: {{kuma.io/service: beta}}}}]
  conf: {{connectTimeout: 2s, http: {{requestTimeout: {seconds}s}}}}
"""
    )


# --- the split and the state dir, pure ----------------------------------------------------------


def _mesh_of(policies: Path, out: Path) -> bytes:
    """The mesh bundle ``meshc compile`` writes for ``policies``."""
    from secure_mesh import meshc

    done = meshc("compile", str(policies), "--out", str(out))
    assert done.returncode == 0, done.stderr
    release = json.loads(next((out / "releases").glob("*.json")).read_text())
    return (out / "bundles" / f"{release['bundles']['default']}.json").read_bytes()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The mesh bundle before and after a change to beta's Timeout."""
    d = tmp_path_factory.mktemp("pieces-policies")
    _policies(d)
    before = _mesh_of(d, d.parent / "out-before")
    _beta_timeout(d, 9)
    after = _mesh_of(d, d.parent / "out-after")
    return before, after


def test_pieces_reassemble_to_the_mesh_bundle(compiled: tuple[bytes, bytes]) -> None:
    data = compiled[0]
    mp = split_mesh(data)
    assert len(mp.catalog) > 30  # 704 services, ~16 a chunk
    top = json.loads(mp.manifest)["catalog"]
    assert 1 <= len(top) <= 32 and set(top) == set(mp.children)  # one level of index pieces
    assert all(bundle_digest(p) == d for d, p in mp.pieces.items())
    # Cut from the bundle's own bytes, every piece is canonical JSON, as if encoded anew.
    assert all(canonical_json(json.loads(p)) == p for p in [mp.manifest, *mp.pieces.values()])
    spaced = json.dumps(json.loads(data), indent=1).encode()
    assert split_mesh(spaced).pieces == mp.pieces  # not compact: made canonical first
    lines = split_lines(mp.body(mp.wanted(None)))
    ms = assemble(lines[0], lines[1:], {}, ())
    assert ms.bundle() == load_bundle(data)
    assert not ms.pending
    scoped = assemble(lines[0], [mp.pieces[d] for d in mp.wanted({"alpha"})], {}, ())
    # Every catalog chunk is needed; of the destinations only what was sent is held.
    assert set(scoped.held) == {"alpha"} and "beta" in scoped.pending
    assert scoped.bundle().services == load_bundle(data).services  # type: ignore[union-attr]


def test_every_mesh_setting_travels_in_the_manifest(compiled: tuple[bytes, bytes]) -> None:
    """Settings the mesh bundle gains (tracing did) reach a data plane on delta pushes too."""
    bundle = load_bundle(compiled[0])
    assert isinstance(bundle, MeshBundle)
    zipkin = TracingBackend(name="zipkin", sampling=25.0, url="http://127.0.0.1:9411/api/v2/spans")
    traced = bundle.model_copy(update={"tracing": zipkin, "passthrough": False})
    data = bundle_bytes(traced)
    mp = split_mesh(data)
    lines = split_lines(mp.body(mp.wanted(None)))
    assert assemble(lines[0], lines[1:], {}, ()).bundle() == load_bundle(data)


def test_one_destination_change_changes_one_piece_its_chunk_and_the_manifest(
    compiled: tuple[bytes, bytes],
) -> None:
    before, after = split_mesh(compiled[0]), split_mesh(compiled[1])
    changed = set(after.pieces) - set(before.pieces)
    chunk = _chunk_of(after, "beta")
    assert changed == {after.destinations["beta"], chunk, *_path_to(after, chunk)}
    assert len(_path_to(after, chunk)) == 1
    assert before.digest != after.digest
    assert {n for n in after.destinations if after.destinations[n] != before.destinations[n]} == {"beta"}


def _chunk_of(mp: MeshPieces, name: str) -> str:
    return next(d for d in mp.catalog if f'"{name}":'.encode() in mp.pieces[d])


DEEP = TreeShape(chunk=2, max_chunk=4, fanout=2, max_fanout=3, top=2)
"""A tiny tree shape: many levels of index pieces."""


def test_a_deep_tree_reassembles_and_one_change_rewrites_one_path(compiled: tuple[bytes, bytes]) -> None:
    before, after = split_mesh(compiled[0], DEEP), split_mesh(compiled[1], DEEP)
    assert len(json.loads(after.manifest)["catalog"]) <= 2 and len(after.children) > 4
    lines = split_lines(after.body(after.wanted(None)))
    assert assemble(lines[0], lines[1:], {}, ()).bundle() == load_bundle(compiled[1])
    # One destination changed: its piece, its chunk and one index piece per level above it.
    changed = set(after.pieces) - set(before.pieces)
    depth = _depth(after)
    chunk = _chunk_of(after, "beta")
    assert after.destinations["beta"] in changed and chunk in changed
    assert len(changed) <= 2 + depth, (len(changed), depth)
    assert set(after.catalog_since(before)) == changed - {after.destinations["beta"]}
    # The same cuts, whatever else the mesh holds: the unchanged chunks are the same pieces.
    assert len(set(before.catalog) & set(after.catalog)) >= len(after.catalog) - 1 - depth


def _depth(mp: MeshPieces) -> int:
    top = json.loads(mp.manifest)["catalog"]
    depth = 0
    while top and top[0] in mp.children:
        top, depth = list(mp.children[top[0]]), depth + 1
    return depth


def test_a_422_naming_an_index_piece_is_answered_by_its_subtree(compiled: tuple[bytes, bytes]) -> None:
    mp = split_mesh(compiled[0], DEEP)
    top = json.loads(mp.manifest)["catalog"]
    assert top[0] in mp.children
    others = [mp.pieces[d] for d in mp.catalog if d not in mp.below([top[0]])]
    with pytest.raises(MissingPieces) as missing:
        assemble(mp.manifest, others, {}, ())
    assert missing.value.digests == (top[0],)  # what it can know it lacks: not what is below
    got = assemble(mp.manifest, [*others, *(mp.pieces[d] for d in mp.below(missing.value.digests))], {}, ())
    assert got.bundle().services == load_bundle(compiled[0]).services  # type: ignore[union-attr]
    index = IndexPiece.model_validate_json(mp.pieces[top[0]])
    assert set(index.catalog) <= set(mp.below([top[0]]))


NAMES = [f"s{i:03d}" for i in range(90)]
_EDIT = st.dictionaries(
    st.sampled_from(NAMES),
    st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(0, 2))),
    max_size=25,
)
"""Per name: removed (None) or (port, destination variant; 0: a gateway, no destination)."""


def _mesh(services: dict[str, tuple[int, int]], variants: list[Destination]) -> bytes:
    bundle = MeshBundle(
        mesh="default",
        services={
            n: CatalogService(port=5000 + port, protocol="http", gateway=v == 0)
            for n, (port, v) in services.items()
        },
        destinations={n: variants[v - 1] for n, (_, v) in services.items() if v},
    )
    return bundle_bytes(bundle)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(_EDIT, min_size=1, max_size=6),
    shape=st.sampled_from(
        [DEEP, TreeShape(chunk=4, max_chunk=6, fanout=3, max_fanout=4, top=3), TreeShape()]
    ),
    reach=st.sets(st.sampled_from(NAMES), max_size=12),
)
def test_incremental_assemble_is_the_full_assemble(
    compiled: tuple[bytes, bytes],
    edits: list[dict[str, tuple[int, int] | None]],
    shape: TreeShape,
    reach: set[str],
) -> None:
    """A run of releases (services come, go and change; destinations change), each assembled from
    the set before it with only what is new since (as a push carries it), gives exactly the set a
    full assemble of the same pushes gives, and the mesh bundle restricted to what it holds."""
    mesh = load_bundle(compiled[0])
    assert isinstance(mesh, MeshBundle)
    variants = [mesh.destinations["alpha"], mesh.destinations["beta"]]
    services: dict[str, tuple[int, int]] = {}
    prev_mp: MeshPieces | None = None
    prev: Any = None
    for edit in edits:
        for name, value in edit.items():
            if value is None:
                services.pop(name, None)
            else:
                services[name] = value
        data = _mesh(services, variants)
        mp = split_mesh(data, shape)
        held = set(prev.held) if prev is not None else set()
        scope = {n for n in reach if n in mp.destinations}
        dests = [mp.destinations[n] for n in sorted(held | scope) if n in mp.destinations]
        send = [*mp.catalog_since(prev_mp), *(d for d in dests if prev is None or d not in prev.pieces)]
        lines = split_lines(mp.body(send))
        cache = prev.pieces if prev is not None else {}
        keep = tuple(sorted(held))
        incremental = assemble(lines[0], lines[1:], cache, keep, prev)
        full = assemble(lines[0], lines[1:], cache, keep)
        assert incremental == full
        assert incremental.bundle() == full.bundle()
        want = load_bundle(data)
        assert isinstance(want, MeshBundle)
        names = (held & set(mp.destinations)) | scope
        assert incremental.bundle() == want.model_copy(
            update={"destinations": {n: d for n, d in want.destinations.items() if n in names}}
        )
        assert set(incremental.pieces) == {*mp.catalog, *(mp.destinations[n] for n in names)}
        assert incremental.pending == set(mp.destinations) - names
        prev, prev_mp = incremental, mp


def _path_to(mp: MeshPieces, node: str) -> set[str]:
    """The index pieces above ``node``."""
    return {d for d in mp.children if d != node and node in mp.below([d])}


def test_assemble_refuses_forged_and_missing_pieces(compiled: tuple[bytes, bytes]) -> None:
    mp = split_mesh(compiled[0])
    beta = mp.pieces[mp.destinations["beta"]]
    forged = beta.replace(b'"http_request_timeout_ms":7000', b'"http_request_timeout_ms":1')
    assert forged != beta
    chunks = [mp.pieces[d] for d in mp.catalog]
    with pytest.raises(BundleError, match="not named by the manifest"):
        assemble(mp.manifest, [*chunks, forged], {}, ())
    with pytest.raises(MissingPieces) as missing:
        assemble(mp.manifest, chunks[1:], {}, ())
    assert missing.value.digests == (mp.catalog[0],)
    # A destination held now must be held under the new manifest too: named as missing.
    with pytest.raises(MissingPieces) as lacking:
        assemble(mp.manifest, chunks, {}, ("beta",))
    assert lacking.value.digests == (mp.destinations["beta"],)
    # A piece named as a catalog chunk must be one.
    fake = canonical_json({**json.loads(mp.manifest), "catalog": [mp.destinations["beta"]]})
    with pytest.raises(BundleError, match="is a destination piece"):
        assemble(fake, [beta], {}, ())


def test_state_dir_keeps_what_is_intact_of_a_partial_piece_cache(
    compiled: tuple[bytes, bytes], tmp_path: Path
) -> None:
    mp = split_mesh(compiled[0])
    lines = split_lines(mp.body(mp.wanted({"alpha", "beta"})))
    ms = assemble(lines[0], lines[1:], {}, ())
    state = StateDir(tmp_path)
    state.save("caller", StoredState({"mesh": Slot(lines[0], mp.digest, 5, ms.bundle(), ms)}))
    pieces = tmp_path / "pieces"
    assert {p.stem for p in pieces.glob("*.json")} == set(ms.pieces)
    (pieces / f"{mp.destinations['beta']}.json").unlink()
    alpha = pieces / f"{mp.destinations['alpha']}.json"
    alpha.write_bytes(alpha.read_bytes()[:-5])  # half written: its hash is no longer its name
    loaded = state.load().slots["mesh"]
    assert loaded.pieces is not None and loaded.digest == mp.digest and loaded.generation == 5
    assert not loaded.pieces.held and {"alpha", "beta"} <= loaded.pieces.pending
    assert not alpha.exists()  # removed, so that the next save writes it whole
    (pieces / f"{mp.catalog[0]}.json").unlink()  # a catalog chunk gone: the slot cannot run
    assert "mesh" not in state.load().slots


def test_catalog_node_bytes_leave_memory_once_stored_and_stay_on_disk(
    compiled: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """A sidecar keeps the parsed catalog, not its bytes (``MeshSet.stored``): the next delta
    still assembles from the parsed nodes, the state dir keeps every node the running set names,
    and a restart from it is the same set."""
    before, after = split_mesh(compiled[0]), split_mesh(compiled[1])
    lines = split_lines(before.body(before.wanted({"alpha", "beta"})))
    first = assemble(lines[0], lines[1:], {}, ())
    state = StateDir(tmp_path)
    state.save("caller", StoredState({"mesh": Slot(lines[0], before.digest, 1, first.bundle(), first)}))
    first.stored()
    assert first.nodes and not set(first.nodes) & set(first.pieces)
    assert set(first.held) == {"alpha", "beta"}  # destination pieces keep their bytes
    # A delta: what changed and nothing else, against the set whose node bytes are gone.
    came = [d for d in after.wanted({"alpha", "beta"}) if d not in before.pieces]
    delta = split_lines(after.body(came))
    second = assemble(delta[0], delta[1:], first.pieces, tuple(first.held), first)
    cold = split_lines(after.body(after.wanted({"alpha", "beta"})))
    assert second.bundle() == assemble(cold[0], cold[1:], {}, ()).bundle()
    state.save("caller", StoredState({"mesh": Slot(delta[0], after.digest, 2, second.bundle(), second)}))
    second.stored()
    on_disk = {p.stem for p in (tmp_path / "pieces").glob("*.json")}
    assert set(second.nodes) <= on_disk and set(second.pieces) <= on_disk
    assert not set(first.nodes) - set(second.nodes) & on_disk  # nodes that left are removed
    loaded = state.load().slots["mesh"]
    assert loaded.pieces is not None and loaded.bundle == second.bundle()


def test_parsed_pieces_are_shared_while_held_and_not_kept_after(compiled: tuple[bytes, bytes]) -> None:
    """Two data planes in one process parse a piece once; a piece no running set holds is
    dropped from the parse cache, so a long-running sidecar does not keep every chunk it ran."""
    import gc

    from runtime import pieces as pieces_mod

    before, after = split_mesh(compiled[0]), split_mesh(compiled[1])
    lines = split_lines(before.body(before.wanted({"alpha", "beta"})))
    one, two = assemble(lines[0], lines[1:], {}, ()), assemble(lines[0], lines[1:], {}, ())
    assert all(one.nodes[d] is two.nodes[d] for d in one.nodes)
    came = [d for d in after.wanted({"alpha", "beta"}) if d not in before.pieces]
    delta = split_lines(after.body(came))
    gone = set(one.nodes) - set(after.pieces)
    assert gone  # the change rewrote at least one catalog node
    newer = assemble(delta[0], delta[1:], one.pieces, tuple(one.held), one)
    del one, two
    gc.collect()
    assert not gone & set(pieces_mod._PARSED.keys())
    assert set(newer.nodes) <= set(pieces_mod._PARSED.keys())


# --- real processes ----------------------------------------------------------------------------


@dataclass
class DeltaMesh:
    work: Path
    policies: Path
    cp: ControlPlaneProc
    tokens: TokenIssuer
    dataplane: str
    beta_app: Upstream
    outside: Upstream
    planes: dict[str, Plane]

    def start(self, name: str, service: str, *extra: str, repo: Path | None = None) -> Plane:
        """A sidecar of ``service``; ``repo``: another source tree's (an older version's)."""
        args = [
            "--service",
            service,
            "--app",
            self.beta_app.address if service == "beta" else "127.0.0.1:9",
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            str(self.work / f"state-{name}"),
            "--control-plane",
            self.cp.url,
            "--token",
            self.tokens.mint("default", service),
            "--drain-seconds",
            "0.5",
            "--dataplane",
            self.dataplane,
            *extra,
        ]
        plane = self.planes[name] = Plane(
            args, self.work, dataplane=self.dataplane, **({"repo": repo} if repo is not None else {})
        )
        return plane

    def release_mesh(self) -> MeshPieces:
        digest = self.cp.api("/api/v1/release")["bundles"]["default"]
        return split_mesh((self.work / "out" / "bundles" / f"{digest}.json").read_bytes())

    def row(self, instance: str) -> dict[str, Any]:
        rows = {r["instance"]: r for r in self.cp.api("/api/v1/status")["dataplanes"]}
        return rows.get(instance, {})


def _synced(mesh: DeltaMesh, plane: Plane) -> bool:
    cfg = plane.config()
    row = mesh.row(cfg["instance"] or "")
    return bool(cfg["ready"] and row.get("status") == "SYNCED" and row.get("state") == "Online")


@pytest.fixture(scope="module", params=DATAPLANES)
def delta_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeltaMesh]:
    work = tmp_path_factory.mktemp(f"delta-{request.param}")
    policies = work / "policies"
    _policies(policies)
    (work / "cp-state").mkdir()
    cp = ControlPlaneProc(policies, work)
    tokens = TokenIssuer(cp.secrets)
    mesh = DeltaMesh(work, policies, cp, tokens, request.param, Upstream("beta-app"), Upstream("outside"), {})
    try:
        cp.start()
        beta = mesh.start("beta", "beta")
        caller = mesh.start("caller", "caller")
        wait_until(lambda: _synced(mesh, beta) and _synced(mesh, caller), "beta and caller SYNCED")
        wait_until(  # its scope's endpoints (runtime.endpoints): alpha's, not beta's
            lambda: (caller.config().get("endpoints") or {}).get("scoped"), "caller's endpoint set"
        )
        yield mesh
    finally:
        for p in mesh.planes.values():
            p.close()
        cp.stop()
        mesh.beta_app.close()
        mesh.outside.close()


def _pieces_of(plane: Plane) -> dict[str, list[str]]:
    pieces: dict[str, list[str]] = plane.config()["bundles"]["mesh"]["pieces"]
    return pieces


def test_a_scoped_sidecar_gets_its_scope_and_fetches_the_rest_on_demand(delta_mesh: DeltaMesh) -> None:
    caller = delta_mesh.planes["caller"]
    held = _pieces_of(caller)
    assert held["held"] == ["alpha"]  # what its policies name; the catalog is whole
    assert "beta" in held["pending"] and len(held["pending"]) == len(SERVICES) - 1
    assert caller.config()["bundles"]["mesh"]["digest"] == delta_mesh.release_mesh().digest
    assert "beta" not in caller.config()["endpoints"]["services"]  # nor its endpoints
    assert outbound_name(caller, "beta") == "beta-app"  # the first request waits for the fetch
    assert "beta" in _pieces_of(caller)["held"]
    assert metric_value(caller.metrics(), "meshc_mesh_pieces_total", how="fetched", result="ok") == 1
    # A host outside the mesh still passes through (the catalog says what is a mesh service).
    assert outbound_name(caller, delta_mesh.outside.address) == "outside"
    # The gateway-less beta sidecar, whose policies name nothing, holds no destination at all.
    assert _pieces_of(delta_mesh.planes["beta"])["held"] == []


def outbound_name(plane: Plane, host: str) -> str:
    assert plane.outbound is not None
    client = ProxyClient(plane.outbound)
    try:
        return client.name(f"http://{host}/hello")
    finally:
        client.close()


def test_a_destination_change_sends_one_piece_and_its_chunk(delta_mesh: DeltaMesh) -> None:
    caller = delta_mesh.planes["caller"]
    before = delta_mesh.release_mesh()
    received = metric_value(caller.metrics(), "meshc_push_received_bytes_total", slot="mesh")
    acks = metric_value(caller.metrics(), "meshc_reloads_total", kind="mesh", result="ack")
    _beta_timeout(delta_mesh.policies, 11)
    wait_until(
        lambda: delta_mesh.release_mesh().digest != before.digest and _synced(delta_mesh, caller),
        "the new manifest SYNCED on caller",
    )
    after = delta_mesh.release_mesh()
    assert caller.config()["bundles"]["mesh"]["digest"] == after.digest
    new = sorted(set(after.pieces) - set(before.pieces))
    chunk = _chunk_of(after, "beta")
    path = _path_to(after, chunk)
    assert new == sorted([after.destinations["beta"], chunk, *path]) and len(path) == 1
    # On the wire to caller: one push, the manifest and exactly those pieces (it held beta).
    expected = len(after.body(new))
    got = metric_value(caller.metrics(), "meshc_push_received_bytes_total", slot="mesh") - received
    assert metric_value(caller.metrics(), "meshc_reloads_total", kind="mesh", result="ack") == acks + 1
    assert got == expected, (got, expected)
    # Bounded by what changed: the manifest, one index piece a level (64 digests at most), one
    # chunk (64 services at most) and the destination; the whole tree is 5 times that.
    beta = len(after.pieces[after.destinations["beta"]])
    bound = len(after.manifest) + len(path) * 64 * 67 + 64 * 220 + beta
    assert got <= bound < sum(len(after.pieces[d]) for d in after.catalog) / 5, (got, bound)
    ro = delta_mesh.cp.api("/api/v1/rollouts")["rollouts"][0]
    assert ro["bytes"] > 0 and ro["completed_at"] is not None
    # Status: synced, so no lag now, and the change-to-ACK time of its last ACK.
    row = delta_mesh.row(caller.config()["instance"])
    assert row["lag_s"] is None and row["last_lag_s"] is not None and row["last_lag_s"] >= 0
    slowest = delta_mesh.cp.api("/api/v1/status")["slowest"]
    assert slowest and all(s["lag_s"] is None and s["last_lag_s"] is not None for s in slowest)
    # The piece it now runs is the new one (timeout 11 s).
    cfg = caller.config()["bundles"]["mesh"]["bundle"]
    assert cfg["destinations"]["beta"]["timeout"][0]["conf"]["http_request_timeout_ms"] == 11000


def _signed(plane: Plane, signer: PushSigner, digest: str, generation: int) -> dict[str, str]:
    cfg = plane.config()
    target = PushTarget(cfg["mesh"], cfg["service"], cfg["instance"], cfg["boot_id"])
    return {
        HDR_DIGEST: digest,
        HDR_GENERATION: str(generation),
        HDR_BUNDLE_ROLE: "mesh",
        HDR_PIECES: "1",
        HDR_SIGNATURE: signer.sign(target, "mesh", digest, generation),
    }


def test_a_forged_or_mismatched_piece_is_nacked_and_nothing_changes(delta_mesh: DeltaMesh) -> None:
    caller = delta_mesh.planes["caller"]
    mp = delta_mesh.release_mesh()
    before = caller.config()["bundles"]["mesh"]
    key = PushSigner(delta_mesh.cp.secrets)  # the control plane's own key: the signature is good
    gen = int(before["generation"]) + 1_000_000
    beta = mp.pieces[mp.destinations["beta"]]
    forged = beta.replace(b'"http_request_timeout_ms":11000', b'"http_request_timeout_ms":1')
    assert forged != beta
    nacks = metric_value(caller.metrics(), "meshc_reloads_total", kind="mesh", result="nack")

    def put(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status, raw = caller.admin_request("PUT", "/bundle", body, headers)
        return status, json.loads(raw)

    # A piece whose sha256 the manifest does not name (altered on the way): 400.
    status, reply = put(mp.manifest + b"\n" + forged + b"\n", _signed(caller, key, mp.digest, gen))
    assert status == 400 and "not named by the manifest" in reply["nack"]
    # A manifest that is not the one signed (the header's digest): 400.
    other = canonical_json({**json.loads(mp.manifest), "passthrough": False})
    status, reply = put(other + b"\n", _signed(caller, key, mp.digest, gen))
    assert status == 400 and "digest mismatch" in reply["nack"]
    # Signed by another key: 403.
    thief = PushSigner(delta_mesh.work / "thief")
    status, _ = put(other + b"\n", _signed(caller, thief, bundle_digest(other), gen))
    assert status == 403
    # A manifest naming a chunk it lacks and was not sent: 422 naming it.
    chunk = canonical_json({"destinations": {}, "services": {}, "type": "catalog"})
    lacking = canonical_json({**json.loads(mp.manifest), "catalog": [*mp.catalog, bundle_digest(chunk)]})
    status, reply = put(lacking + b"\n", _signed(caller, key, bundle_digest(lacking), gen))
    assert status == 422 and reply["missing"] == [bundle_digest(chunk)]
    after = caller.config()["bundles"]["mesh"]
    assert (after["digest"], after["generation"], after["pieces"]) == (
        before["digest"],
        before["generation"],
        before["pieces"],
    )
    assert metric_value(caller.metrics(), "meshc_reloads_total", kind="mesh", result="nack") == nacks + 4
    assert outbound_name(caller, "beta") == "beta-app"


def test_after_a_control_plane_restart_what_it_fetched_on_demand_stays_in_its_scope(
    delta_mesh: DeltaMesh,
) -> None:
    """A restarted control plane knows caller's running manifest (so it does not re-send the
    catalog) and, from what caller declares it fetched on demand (registration and heartbeats),
    that it holds beta: the next change to beta reaches it in one push with beta's new piece,
    no 422 (a control plane that forgot sent the tree, was NACKed naming the piece, then sent
    both)."""
    caller = delta_mesh.planes["caller"]
    assert "beta" in _pieces_of(caller)["held"]
    assert "beta" in caller.config()["endpoints_on_demand"]
    delta_mesh.cp.stop()
    delta_mesh.cp.start()
    wait_until(lambda: _synced(delta_mesh, caller), "caller SYNCED with the restarted control plane")
    m = caller.metrics()
    nacks = metric_value(m, "meshc_reloads_total", kind="mesh", result="nack")
    acks = metric_value(m, "meshc_reloads_total", kind="mesh", result="ack")
    received = metric_value(m, "meshc_push_received_bytes_total", slot="mesh")
    before = delta_mesh.release_mesh()
    _beta_timeout(delta_mesh.policies, 13)
    wait_until(
        lambda: delta_mesh.release_mesh().digest != before.digest and _synced(delta_mesh, caller),
        "the new manifest SYNCED on caller",
    )
    after = delta_mesh.release_mesh()
    m = caller.metrics()
    assert metric_value(m, "meshc_reloads_total", kind="mesh", result="nack") == nacks
    assert metric_value(m, "meshc_reloads_total", kind="mesh", result="ack") == acks + 1
    cfg = caller.config()["bundles"]["mesh"]
    assert cfg["digest"] == after.digest and "beta" in cfg["pieces"]["held"]
    assert cfg["bundle"]["destinations"]["beta"]["timeout"][0]["conf"]["http_request_timeout_ms"] == 13000
    # One push, without the whole catalog: the changed path of the tree (the chunk and the
    # index piece above it) and beta's piece.
    got = metric_value(m, "meshc_push_received_bytes_total", slot="mesh") - received
    tree = after.catalog_since(before)
    assert set(tree) == {_chunk_of(after, "beta"), *_path_to(after, _chunk_of(after, "beta"))}
    assert got == len(after.body([*tree, after.destinations["beta"]])), got


def test_a_reachable_list_is_pushed_ahead(delta_mesh: DeltaMesh) -> None:
    """Kuma's reachableServices on the registration: those destinations come with the push."""
    plane = delta_mesh.start("reach", "gamma", "--reachable-services", "beta,svc-003")
    try:
        wait_until(lambda: _synced(delta_mesh, plane), "gamma SYNCED")
        assert _pieces_of(plane)["held"] == ["beta", "svc-003"]
        assert outbound_name(plane, "beta") == "beta-app"
        assert metric_value(plane.metrics(), "meshc_mesh_pieces_total", how="fetched") == 0
    finally:
        plane.terminate()
        plane.close()
        del delta_mesh.planes["reach"]


def test_a_restart_from_a_partial_piece_cache_converges(delta_mesh: DeltaMesh) -> None:
    old = delta_mesh.planes["caller"]
    mp = delta_mesh.release_mesh()
    assert old.terminate() == 0
    pieces = delta_mesh.work / "state-caller" / "pieces"
    on_disk = {p.stem for p in pieces.glob("*.json")}
    assert {mp.destinations["alpha"], mp.destinations["beta"], *mp.catalog} <= on_disk
    (pieces / f"{mp.destinations['beta']}.json").unlink()
    (pieces / f"{mp.catalog[0]}.json").unlink()
    alpha = pieces / f"{mp.destinations['alpha']}.json"
    alpha.write_bytes(b"{" + alpha.read_bytes())  # damaged: skipped on load
    caller = delta_mesh.start("caller", "caller")
    wait_until(lambda: _synced(delta_mesh, caller), "the restarted caller SYNCED")
    assert caller.config()["bundles"]["mesh"]["digest"] == mp.digest
    assert "alpha" in _pieces_of(caller)["held"]  # pushed again: its scope
    assert outbound_name(caller, "beta") == "beta-app"  # on demand again
    restored = {p.stem for p in pieces.glob("*.json")}
    assert {mp.destinations["alpha"], mp.destinations["beta"], *mp.catalog} <= restored
    for p in pieces.glob("*.json"):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.stem
