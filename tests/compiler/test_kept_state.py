"""What the control plane keeps between compiles is kept compactly, with the same values.

Equal legacy confs, Service specs and selector lists are one object (``compiler.parse``); an
entry drops its bundle model once serialized (``compiler.resolve.Entry.rule_json``); a packed
``SourceFile`` is the same value (``compiler.source``); a re-read file with the same content is
the object the compiler holds (``StatCache``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from compiler.incremental import IncrementalCompiler
from compiler.parse import end_batch, parse_documents
from compiler.pipeline import compile_sources
from compiler.source import RACY_NS, SourceFile, StatCache, git_blob_id, read_policy_dir


def _retry(name: str, service: str, retries: int | bool) -> dict[str, object]:
    return {
        "type": "Retry",
        "mesh": "default",
        "name": name,
        "sources": [{"match": {"kuma.io/service": "*"}}],
        "destinations": [{"match": {"kuma.io/service": service}}],
        "conf": {"http": {"numRetries": retries, "perTryTimeout": "1s"}},
    }


def _docs(*raws: dict[str, object]) -> list[object]:
    docs, errs, _ = parse_documents("p.yaml", list(raws))
    end_batch()
    assert not [e for e in errs if e.severity == "error"], errs
    return docs  # type: ignore[return-value]


def test_equal_confs_and_selector_lists_are_one_object_and_unequal_ones_are_not() -> None:
    a, b, c, d = _docs(_retry("a", "x", 3), _retry("b", "y", 3), _retry("c", "x", 4), _retry("d", "x", 3))
    assert a.spec.conf is b.spec.conf  # same conf, other destination
    assert a.spec.conf is not c.spec.conf and a.spec.conf != c.spec.conf
    assert a.spec.sources is b.spec.sources is c.spec.sources
    assert a.spec.destinations is d.spec.destinations
    assert a.spec.destinations is not b.spec.destinations
    assert a.spec.conf.model_dump() == d.spec.conf.model_dump()
    assert c.spec.conf.http.num_retries == 4


def test_equal_service_specs_are_shared_and_values_stay_apart() -> None:
    def svc(name: str, port: int, subsets: list[dict[str, str]]) -> dict[str, object]:
        return {"type": "Service", "mesh": "default", "name": name, "port": port, "subsets": subsets}

    a, b, c, d = _docs(
        svc("a", 80, [{"version": "v1"}]),
        svc("b", 80, [{"version": "v1"}]),
        svc("c", 81, [{"version": "v1"}]),
        svc("d", 80, [{"version": "v2"}]),
    )
    assert a.spec is b.spec
    assert a.spec is not c.spec and a.spec is not d.spec
    assert (c.spec.port, d.spec.subsets) == (81, [{"version": "v2"}])


def _repo(n: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        docs = [
            {"type": "Service", "mesh": "default", "name": f"s{i}", "port": 8000 + i},
            _retry(f"r{i}", f"s{i}", 2),
        ]
        files[f"s{i}.yaml"] = "---\n".join(yaml.safe_dump(x) for x in docs).encode()
    files["mesh.yaml"] = b"type: Mesh\nname: default\n"
    return files


def test_entries_release_their_models_once_serialized_and_bundles_are_unchanged(tmp_path: Path) -> None:
    from compiler.source import SourceSet

    files = _repo(3)
    src = SourceSet(tuple(SourceFile(p, d, git_blob_id(d)) for p, d in sorted(files.items())))
    inc = IncrementalCompiler()
    got = inc.update(src).result
    cold = compile_sources(src)
    assert got.bundles == cold.bundles and got.release == cold.release
    entries = [e for m in inc._meshes.values() for _, es in m.idx.by_doc.values() for e in es]
    assert entries and all(e.conf is None and e._rule is not None for e in entries)
    assert got.bundles == inc.update(src).result.bundles  # an unchanged update: same bytes


def test_a_packed_source_file_is_the_same_frozen_value() -> None:
    data = b"type: Mesh\nname: default\n" * 50
    f, g = SourceFile("m.yaml", data, git_blob_id(data)), SourceFile("m.yaml", data, git_blob_id(data))
    f.pack()
    assert f.packed and not g.packed
    assert f.data == data and f == g and hash(f) == hash(g)
    assert pickle.loads(pickle.dumps(f)) == g
    with pytest.raises(FrozenInstanceError):
        f.path = "x.yaml"  # type: ignore[misc]


def test_a_re_read_file_with_the_same_content_is_the_object_already_held(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_bytes(b"type: Mesh\nname: default\n")
    cache = StatCache()
    first = read_policy_dir(tmp_path, cache=cache).files[0]
    # written just now: racy, so read again next time; older now, with the same bytes
    old = os.stat(p).st_mtime_ns - 2 * RACY_NS
    os.utime(p, ns=(old, old))
    again = read_policy_dir(tmp_path, cache=cache).files[0]
    assert again is first
    p.write_bytes(b"type: Mesh\nname: other\n")
    changed = read_policy_dir(tmp_path, cache=cache).files[0]
    assert changed is not first and changed.data.endswith(b"other\n")
