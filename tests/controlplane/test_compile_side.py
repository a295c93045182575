"""The control plane's compile side on a real work tree: re-reading by stat, the mesh bundle
re-rendered per destination, and its pieces re-split from the compiler's parts, each equal to
doing it all again from scratch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compiler import source
from compiler.controlplane.pieces import PieceStore
from compiler.controlplane.release import Compiler
from compiler.pipeline import compile_sources
from compiler.source import StatCache, read_policy_dir
from runtime.pieces import MeshPieces, split_mesh

MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls:
    enabledBackend: ca-1
    backends: [{name: ca-1, type: builtin}]
"""

WILDCARD = """\
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {{name: all-timeouts}}
spec:
  sources: [{{match: {{kuma.io/service: "*"}}}}]
  destinations: [{{match: {{kuma.io/service: "*"}}}}]
  conf: {{connectTimeout: {connect}s}}
"""


def service(i: int, n: int, w: int = 90, timeout: int = 5, retries: int = 2) -> str:
    name, nxt = f"s{i}", f"s{(i + 1) % n}"
    return f"""\
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {{name: {name}}}
spec:
  port: {4000 + i}
  subsets: [{{version: v1}}, {{version: v2}}]
---
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata: {{name: {name}-route}}
spec:
  sources: [{{match: {{kuma.io/service: {name}}}}}]
  destinations: [{{match: {{kuma.io/service: {nxt}}}}}]
  conf:
    split:
      - {{weight: {w}, destination: {{kuma.io/service: {nxt}, version: v1}}}}
      - {{weight: {100 - w}, destination: {{kuma.io/service: {nxt}, version: v2}}}}
---
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {{name: {name}-timeout}}
spec:
  sources: [{{match: {{kuma.io/service: "*"}}}}]
  destinations: [{{match: {{kuma.io/service: {name}}}}}]
  conf: {{connectTimeout: 1s, http: {{requestTimeout: {timeout}s}}}}
---
apiVersion: kuma.io/v1alpha1
kind: Retry
mesh: default
metadata: {{name: {name}-retry}}
spec:
  sources: [{{match: {{kuma.io/service: {name}}}}}]
  destinations: [{{match: {{kuma.io/service: {nxt}}}}}]
  conf: {{http: {{numRetries: {retries}}}}}
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def same_pieces(a: MeshPieces, b: MeshPieces) -> bool:
    return (a.manifest, a.digest, a.catalog, dict(a.destinations), dict(a.pieces)) == (
        b.manifest,
        b.digest,
        b.catalog,
        dict(b.destinations),
        dict(b.pieces),
    )


def test_one_file_edits_compile_and_split_like_a_cold_compile(tmp_path: Path) -> None:
    n = 12
    root = tmp_path / "policies"
    write(root / "mesh.yaml", MESH)
    write(root / "all.yaml", WILDCARD.format(connect=3))
    for i in range(n):
        write(root / "svc" / f"s{i}.yaml", service(i, n))
    comp = Compiler()
    store = PieceStore()
    edits = [
        ("svc/s3.yaml", service(3, n, w=55)),  # a route: one service bundle
        ("svc/s5.yaml", service(5, n, timeout=9)),  # one destination's default: the mesh bundle
        ("svc/s5.yaml", service(5, n, timeout=9, retries=4)),
        ("all.yaml", WILDCARD.format(connect=7)),  # every destination's default
        ("svc/s7.yaml", "# a comment moves every line\n" + service(7, n, timeout=11)),
        ("svc/s12.yaml", service(12, n + 1)),  # a new service: the catalog changes
        ("svc/s12.yaml", None),  # and it goes again
        ("svc/s2.yaml", service(2, n, timeout=6)),
    ]
    for step, (path, text) in enumerate([(None, None), *edits]):
        if path is not None:
            if text is None:
                (root / path).unlink()
            else:
                write(root / path, text)
        src = comp.read(root)
        assert src == read_policy_dir(root), step
        result = comp.compile(src)
        cold = compile_sources(read_policy_dir(root))
        assert not cold.errors, cold.diagnostics[:3]
        assert result.bundles == cold.bundles, step
        assert result.release == cold.release, step
        split = comp.split_meshes(store, result.bundles, result.digests)
        digest = result.digests["default"]
        assert set(split) <= {digest}
        for d, mp in split.items():
            store.add(d, mp)
        assert store.has(digest)
        assert same_pieces(store.mesh(digest, b""), split_mesh(cold.bundles["default"])), step


def test_a_destination_edit_re_splits_one_destination_and_one_chunk(tmp_path: Path) -> None:
    n = 40
    root = tmp_path / "policies"
    write(root / "mesh.yaml", MESH)
    for i in range(n):
        write(root / "svc" / f"s{i}.yaml", service(i, n))
    comp = Compiler()
    store = PieceStore()
    first = comp.compile(comp.read(root))
    a = comp.split_meshes(store, first.bundles, first.digests)[first.digests["default"]]
    write(root / "svc" / "s9.yaml", service(9, n, timeout=13))
    second = comp.compile(comp.read(root))
    b = comp.split_meshes(store, second.bundles, second.digests)[second.digests["default"]]
    assert same_pieces(b, split_mesh(second.bundles["default"]))
    changed = {name for name, d in b.destinations.items() if a.destinations[name] != d}
    assert changed == {"s9"}
    assert len(set(b.catalog) - set(a.catalog)) == 1
    # The unchanged pieces are the very bytes of the last split, not copies made again.
    same = [d for d in a.pieces if d in b.pieces]
    assert len(same) == len(a.pieces) - 2
    assert all(a.pieces[d] is b.pieces[d] for d in same)


def test_stat_cache_reads_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "policies"
    write(root / "a.yaml", "kind: A\n")
    write(root / "sub" / "b.yaml", "kind: B\n")
    write(root / ".hidden" / "c.yaml", "kind: C\n")
    cache = StatCache()
    # Files just written are "racily clean" (their stat could repeat within one clock tick), so
    # they are read again; with no racy window they are trusted by stat.
    monkeypatch.setattr(source, "RACY_NS", 0)
    first = read_policy_dir(root, cache=cache)
    assert [f.path for f in first.files] == ["a.yaml", "sub/b.yaml"]
    again = read_policy_dir(root, cache=cache)
    assert again == first and all(x is y for x, y in zip(again.files, first.files, strict=True))
    # The same size and mtime: only the ctime (and the content) moved. Seen.
    st = (root / "a.yaml").stat()
    (root / "a.yaml").write_text("kind: Z\n")
    os.utime(root / "a.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
    third = read_policy_dir(root, cache=cache)
    assert third.files[0].data == b"kind: Z\n" and third.files[1] is first.files[1]
    monkeypatch.undo()
    # Within the racy window a file is read again every time, however its stat looks.
    for text in ("kind: Y\n", "kind: X\n", "kind: W\n"):
        st = (root / "sub" / "b.yaml").stat()
        (root / "sub" / "b.yaml").write_text(text)
        os.utime(root / "sub" / "b.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
        assert read_policy_dir(root, cache=cache).files[1].data == text.encode()
    (root / "sub" / "b.yaml").unlink()
    assert [f.path for f in read_policy_dir(root, cache=cache).files] == ["a.yaml"]
    assert read_policy_dir(root, cache=cache) == read_policy_dir(root)
