"""The incremental compiler: equal to a cold compile after every edit, and doing less work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.incremental import IncrementalCompiler, ParseCache
from compiler.pipeline import compile_sources
from compiler.result import CompileResult
from compiler.source import SourceFile, SourceSet, git_blob_id, read_policy_dir
from runtime import bundle as b

ROOT = Path(__file__).resolve().parents[2]

MESH = b"""\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls:
    enabledBackend: ca-1
    backends: [{name: ca-1, type: builtin}]
  logging:
    backends: [{name: file, type: file, conf: {path: /tmp/access.log}}]
"""

EXTRA = b"""\
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata: {name: all-timeouts}
spec:
  sources: [{match: {kuma.io/service: "*"}}]
  destinations: [{match: {kuma.io/service: "*"}}]
  conf: {connectTimeout: 3s}
---
apiVersion: kuma.io/v1alpha1
kind: TrafficLog
mesh: default
metadata: {name: logs}
spec:
  sources: [{match: {kuma.io/service: "*"}}]
  destinations: [{match: {kuma.io/service: "*"}}]
  conf: {backend: file}
---
apiVersion: kuma.io/v1alpha1
kind: RateLimit
mesh: default
metadata: {name: limit-s1}
spec:
  sources: [{match: {kuma.io/service: "*"}}]
  destinations: [{match: {kuma.io/service: s1}}]
  conf: {http: {requests: 5, interval: 10s}}
"""


def service(i: int, n: int, w: int = 90, retries: int = 2, version_src: bool = False) -> bytes:
    name, nxt, prev = f"s{i}", f"s{(i + 1) % n}", f"s{(i - 1) % n}"
    src_extra = "\n        version: v1" if version_src else ""
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
  sources:
    - match:
        kuma.io/service: {name}{src_extra}
  destinations: [{{match: {{kuma.io/service: {nxt}}}}}]
  conf:
    split:
      - {{weight: {w}, destination: {{kuma.io/service: {nxt}, version: v1}}}}
      - {{weight: {100 - w}, destination: {{kuma.io/service: {nxt}, version: v2}}}}
---
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {{name: {prev}-to-{name}}}
spec:
  sources: [{{match: {{kuma.io/service: {prev}}}}}]
  destinations: [{{match: {{kuma.io/service: {name}}}}}]
---
apiVersion: kuma.io/v1alpha1
kind: Retry
mesh: default
metadata: {{name: {name}-retry}}
spec:
  sources: [{{match: {{kuma.io/service: "*"}}}}]
  destinations: [{{match: {{kuma.io/service: {name}}}}}]
  conf: {{http: {{numRetries: {retries}}}}}
""".encode()


def source_set(files: dict[str, bytes]) -> SourceSet:
    return SourceSet(tuple(SourceFile(p, d, git_blob_id(d)) for p, d in sorted(files.items())))


def repo(n: int) -> dict[str, bytes]:
    files = {"mesh.yaml": MESH, "extra.yaml": EXTRA}
    files.update({f"svc/s{i}.yaml": service(i, n) for i in range(n)})
    return files


def assert_same(inc: CompileResult, cold: CompileResult) -> None:
    assert inc.diagnostics == cold.diagnostics
    assert inc.errors == cold.errors
    assert inc.bundles == cold.bundles
    assert inc.release == cold.release
    assert inc.release_id == cold.release_id
    assert b.canonical_json(inc.release) == b.canonical_json(cold.release)


# An edit: (what, service index, value).
edits = st.tuples(
    st.sampled_from(["weight", "retries", "tagged", "add", "remove", "break", "fix", "noop", "shift"]),
    st.integers(0, 7),
    st.integers(0, 100),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(edits, min_size=1, max_size=8))
def test_incremental_equals_cold_after_every_edit(steps: list[tuple[str, int, int]]) -> None:
    n = 5
    files = repo(n)
    inc = IncrementalCompiler()
    assert_same(inc.update(source_set(files)).result, compile_sources(source_set(files)))
    for what, i, v in steps:
        path = f"svc/s{i}.yaml"
        if what == "weight" and path in files:
            files[path] = service(i, n, w=v)
        elif what == "retries" and path in files:
            files[path] = service(i, n, retries=1 + v % 5)
        elif what == "tagged" and path in files:
            files[path] = service(i, n, version_src=True)
        elif what == "add":
            files[path] = service(i, max(n, i + 1))
        elif what == "remove":
            files.pop(path, None)
        elif what == "break" and path in files:
            files[path] = files[path].replace(b"kind: Retry", b"kind: Retryy", 1)
        elif what == "fix" and path in files:
            files[path] = service(i, n)
        elif what == "shift" and path in files:
            files[path] = b"# a comment moves every line\n" + files[path]
        src = source_set(files)
        upd = inc.update(src)
        cold = compile_sources(src)
        assert_same(upd.result, cold)
        if not cold.errors:
            assert set(upd.changed) <= set(cold.bundles)
            assert upd.release_bytes == b.canonical_json(cold.release) + b"\n"


def test_policies_incremental_equals_cold() -> None:
    src = read_policy_dir(ROOT / "policies")
    assert_same(IncrementalCompiler().update(src).result, compile_sources(src))


def test_only_affected_bundles_are_rebuilt_and_written(tmp_path: Path) -> None:
    n = 30
    files = repo(n)
    out = tmp_path / "out"
    inc = IncrementalCompiler(out=out)
    first = inc.update(source_set(files))
    assert first.full and len(first.rebuilt) == n + 1 and first.written == n + 1
    assert len(list((out / "bundles").iterdir())) == n + 1

    # One route's weights: only its source's bundle.
    files["svc/s7.yaml"] = service(7, n, w=55)
    upd = inc.update(source_set(files))
    assert not upd.full and upd.parsed == 1
    assert upd.rebuilt == ["default/s7"] and upd.changed == ["default/s7"] and upd.written == 1
    assert len(list((out / "bundles").iterdir())) == n + 2
    assert (out / "releases" / f"{upd.result.release_id}.json").exists()

    # A wildcard-source Retry for s3: the mesh bundle and s2 (which names s3) are rebuilt.
    files["svc/s3.yaml"] = service(3, n, retries=4)
    upd = inc.update(source_set(files))
    assert upd.rebuilt == ["default", "default/s2"]
    assert upd.changed == ["default", "default/s2"]

    # An inbound rule: only its destination.
    files["extra.yaml"] = EXTRA.replace(b"requests: 5", b"requests: 6")
    upd = inc.update(source_set(files))
    assert upd.rebuilt == ["default/s1"] and upd.changed == ["default/s1"]

    # A comment: nothing to rebuild, nothing changes.
    files["svc/s9.yaml"] = files["svc/s9.yaml"] + b"# trailing comment\n"
    upd = inc.update(source_set(files))
    assert upd.rebuilt == [] and upd.changed == [] and upd.written == 0

    # No change at all.
    upd = inc.update(source_set(files))
    assert upd.parsed == 0 and upd.rebuilt == [] and upd.changed == []
    assert_same(upd.result, compile_sources(source_set(files)))


def test_errors_publish_nothing_and_the_fix_publishes_what_changed() -> None:
    files = repo(4)
    inc = IncrementalCompiler()
    inc.update(source_set(files))
    files["svc/s1.yaml"] = service(1, 4, w=20).replace(b"kind: Service", b"kind: Servic", 1)
    broken = inc.update(source_set(files))
    assert broken.result.errors and not broken.changed and not broken.result.bundles
    files["svc/s1.yaml"] = service(1, 4, w=20)
    fixed = inc.update(source_set(files))
    assert fixed.changed == ["default/s1"]
    assert_same(fixed.result, compile_sources(source_set(files)))


def test_parse_cache_round_trip_and_reuse(tmp_path: Path) -> None:
    files = repo(3)
    path = tmp_path / "cache.json"
    cache = ParseCache(path)
    IncrementalCompiler(cache=cache).update(source_set(files))
    cache.save()
    assert path.exists()
    again = ParseCache(path)
    upd = IncrementalCompiler(cache=again).update(source_set(files))
    assert_same(upd.result, compile_sources(source_set(files)))
    assert again._used == {git_blob_id(d) for d in files.values()}


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-10],  # truncated
        lambda raw: raw.replace(b"v1", b"v9"),  # body edited: the checksum no longer matches
        lambda raw: b'{"format": "someone-elses-cache"}\n{}',  # foreign
        lambda raw: b"\x00\xffnot json at all",
    ],
)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: object
) -> None:
    files = repo(3)
    path = tmp_path / "cache.json"
    cache = ParseCache(path)
    IncrementalCompiler(cache=cache).update(source_set(files))
    cache.save()
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    capsys.readouterr()
    bad = ParseCache(path)
    assert "ignoring the parse cache" in capsys.readouterr().err
    assert bad._data == {}
    upd = IncrementalCompiler(cache=bad).update(source_set(files))
    assert_same(upd.result, compile_sources(source_set(files)))
    bad.save()
    assert ParseCache(path)._data  # rewritten good
    assert "ignoring" not in capsys.readouterr().err


def test_a_forged_entry_with_a_wrong_checksum_is_not_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = repo(2)
    path = tmp_path / "cache.json"
    cache = ParseCache(path)
    IncrementalCompiler(cache=cache).update(source_set(files))
    cache.save()
    head, _, body = path.read_bytes().partition(b"\n")
    data = json.loads(body)
    blob = git_blob_id(files["svc/s0.yaml"])
    data[blob][1]["spec"]["conf"]["split"][0]["weight"] = 1
    path.write_bytes(head + b"\n" + json.dumps(data).encode())
    forged = ParseCache(path)
    assert "checksum" in capsys.readouterr().err
    assert forged.get(blob) is None


def test_bundles_round_trip_through_the_contract_models() -> None:
    """The fast serializer writes exactly what the pydantic models would (format, defaults, keys)."""
    files = repo(4)
    result = compile_sources(source_set(files))
    policies = compile_sources(read_policy_dir(ROOT / "policies"))
    for data in [*result.bundles.values(), *policies.bundles.values()]:
        assert b.bundle_bytes(b.load_bundle(data)) == data


def test_denied_health_checks_follow_edits_of_either_side() -> None:
    """W2003 needs the HealthCheck and the permissions: an edit to either one updates it."""
    files = {f.path: f.data for f in read_policy_dir(ROOT / "policies").files}
    hc = "policies/benigno-health-check.yaml"
    inc = IncrementalCompiler()
    assert not [d for d in inc.update(source_set(files)).result.diagnostics if d.code == "W2003"]
    files[hc] = files[hc].replace(b"kuma.io/service: magnanimo", b'kuma.io/service: "*"')
    found = [d for d in inc.update(source_set(files)).result.diagnostics if d.code == "W2003"]
    assert [(d.file, d.span.line if d.span else 0) for d in found] == [(hc, 11)]
    assert "'benigno', 'edge-gateway'" in found[0].message and "magnanimo-to-benigno" in found[0].message
    files["policies/allow-checks.yaml"] = b"""\
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {name: checks-to-benigno}
spec:
  sources: [{match: {kuma.io/service: "*"}}]
  destinations: [{match: {kuma.io/service: benigno}}]
"""
    upd = inc.update(source_set(files)).result
    assert not [d for d in upd.diagnostics if d.code == "W2003"]
    assert_same(upd, compile_sources(source_set(files)))
