"""The state dir: atomic last-known-good, bundles kept by digest, unreadable parts skipped."""

from __future__ import annotations

import json
from pathlib import Path

from runtime_harness import endpoint_set, mesh_bundle, service_bundle

from runtime.bundle import bundle_bytes, bundle_digest, load_bundle
from runtime.state import Slot, StateDir, StoredState


def _slot(bundle: object, generation: int) -> Slot:
    data = bundle_bytes(bundle)  # type: ignore[arg-type]
    digest = bundle_digest(data)
    return Slot(data, digest, generation, load_bundle(data, digest))


def test_round_trip_and_old_bundles_removed(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = StoredState(
        {"mesh": _slot(mesh_bundle(), 1), "service": _slot(service_bundle("magnanimo"), 2)},
        endpoint_set(3, {"benigno": [("127.0.0.1:1", {"version": "v1"})]}),
        "magnanimo-1",
    )
    state.save("magnanimo", first)
    assert state.load() == first
    newer = StoredState(
        {**first.slots, "mesh": _slot(mesh_bundle(passthrough=False), 4)}, first.endpoints, "x"
    )
    state.save("magnanimo", newer)
    assert state.load() == newer
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == sorted(
        f"{s.digest}.json" for s in newer.slots.values()
    )
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_missing_or_corrupt_parts_are_skipped(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.load() == StoredState()
    good = StoredState({"mesh": _slot(mesh_bundle(), 1), "service": _slot(service_bundle("magnanimo"), 1)})
    state.save("magnanimo", good)
    service_file = tmp_path / "bundles" / f"{good.slots['service'].digest}.json"
    service_file.write_bytes(b"{corrupt")  # digest no longer matches: that slot is dropped
    loaded = state.load()
    assert set(loaded.slots) == {"mesh"}
    (tmp_path / "state.json").write_text(json.dumps({"format": 99}))
    assert state.load() == StoredState()
    (tmp_path / "state.json").write_text("not json")
    assert state.load() == StoredState()
