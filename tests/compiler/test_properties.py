"""Hypothesis properties of the compiler: determinism, robustness and one YAML semantics.

* Random valid policy sets compile with no error, to the same bytes twice, and to the same
  bundles whatever the files are called or the order of their documents.
* Random mutations of valid YAML (byte flips, deletions, insertions, indentation changes, key
  swaps, duplicated lines) make the real CLI exit 0 or 1 with diagnostics: never a traceback,
  never exit 2.
* Whenever the fast loader (libyaml) returns data, the position-keeping loader returns equal
  data and no finding (DESIGN §3: the fast path never accepts what the slow one rejects).

Every test is derandomized and database-less, so a run is deterministic; example counts are
kept small enough for CI (the whole module runs in well under a minute).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from compiler.cli import main
from compiler.pipeline import compile_sources
from compiler.result import CompileResult
from compiler.source import SourceFile, SourceSet, git_blob_id
from compiler.yamlload import load_fast, load_positions

REPO = Path(__file__).resolve().parents[2]
SEED_FILES = {p.name: p.read_bytes() for p in sorted((REPO / "policies").glob("*.yaml"))}


def _settings(examples: int) -> settings:
    """A fixed-seed short run; ``MESHC_FUZZ_EXAMPLES`` (bench/fuzz.py) asks for a long random one."""
    long_run = int(os.environ.get("MESHC_FUZZ_EXAMPLES", "0"))
    return settings(
        max_examples=long_run or examples,
        derandomize=not long_run,
        database=None,
        deadline=None,
        # No "explain" phase: its tracing slows a failing run down by orders of magnitude.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- random valid policy sets -------------------------------------------------------------------

SERVICE_NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]
VERSIONS = ["v1", "v2", "v3"]


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A mesh, its services and policies that are valid together (no conflict, no bad reference)."""
    names = draw(st.lists(st.sampled_from(SERVICE_NAMES), min_size=1, max_size=5, unique=True))
    subsets = {n: draw(st.lists(st.sampled_from(VERSIONS), max_size=3, unique=True)) for n in names}
    mtls = draw(st.booleans())
    mesh_spec: dict[str, Any] = {}
    if mtls:
        mesh_spec["mtls"] = {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}
    if draw(st.booleans()):
        mesh_spec["networking"] = {"outbound": {"passthrough": draw(st.booleans())}}
    docs: list[dict[str, Any]] = [{"kind": "Mesh", "name": "default", "spec": mesh_spec}]
    for i, n in enumerate(names):
        spec: dict[str, Any] = {"port": 4000 + i, "protocol": "http"}
        if subsets[n]:
            spec["subsets"] = [{"version": v} for v in subsets[n]]
        docs.append({"kind": "Service", "name": n, "spec": spec, "api": "meshc/v1alpha1"})

    pairs = [(s, d) for s in [*names, "*"] for d in names]

    def pick_pairs() -> list[tuple[str, str]]:
        return draw(st.lists(st.sampled_from(pairs), max_size=4, unique=True))

    def selectors(src: str, dst: str) -> dict[str, Any]:
        return {
            "sources": [{"match": {"kuma.io/service": src}}],
            "destinations": [{"match": {"kuma.io/service": dst}}],
        }

    for j, (src, dst) in enumerate(pick_pairs()):
        conf: dict[str, Any]
        if len(subsets[dst]) > 0 and draw(st.booleans()):
            weights = draw(
                st.lists(st.integers(0, 100), min_size=len(subsets[dst]), max_size=len(subsets[dst]))
            )
            assume(any(w > 0 for w in weights))
            conf = {
                "split": [
                    {"weight": w, "destination": {"kuma.io/service": dst, "version": v}}
                    for w, v in zip(weights, subsets[dst], strict=True)
                ]
            }
        else:
            conf = {"destination": {"kuma.io/service": dst}}
        lb = draw(st.sampled_from([None, "roundRobin", "leastRequest", "random"]))
        if lb == "leastRequest":
            conf["loadBalancer"] = {"leastRequest": {"choiceCount": draw(st.integers(2, 6))}}
        elif lb is not None:
            conf["loadBalancer"] = {lb: {}}
        if draw(st.booleans()):
            conf["http"] = [
                {
                    "match": {"path": {"prefix": f"/p{k}"}},
                    "destination": {"kuma.io/service": dst},
                }
                for k in range(draw(st.integers(1, 3)))
            ]
        docs.append(
            {"kind": "TrafficRoute", "name": f"route-{j}", "spec": {**selectors(src, dst), "conf": conf}}
        )
    for j, (src, dst) in enumerate(pick_pairs()):
        conf = {
            "http": {"numRetries": draw(st.integers(1, 5)), "perTryTimeout": f"{draw(st.integers(1, 900))}ms"}
        }
        docs.append({"kind": "Retry", "name": f"retry-{j}", "spec": {**selectors(src, dst), "conf": conf}})
    for j, (src, dst) in enumerate(pick_pairs()):
        conf = {"connectTimeout": f"{draw(st.integers(1, 30))}s", "http": {"requestTimeout": "1m30s"}}
        docs.append(
            {"kind": "Timeout", "name": f"timeout-{j}", "spec": {**selectors(src, dst), "conf": conf}}
        )
    for j, (src, dst) in enumerate(pick_pairs()):
        conf = {"interval": "10s", "timeout": "2s", "unhealthyThreshold": 3, "healthyThreshold": 1}
        docs.append({"kind": "HealthCheck", "name": f"hc-{j}", "spec": {**selectors(src, dst), "conf": conf}})
    for j, (src, dst) in enumerate(pick_pairs()):
        conf = {"detectors": {"totalErrors": {"consecutive": draw(st.integers(1, 9))}}}
        docs.append(
            {"kind": "CircuitBreaker", "name": f"cb-{j}", "spec": {**selectors(src, dst), "conf": conf}}
        )
    if mtls:  # every service reachable: no W2002; with mTLS off, no permission: no W2001
        for j, dst in enumerate(names):
            src = draw(st.sampled_from([*names, "*"]))
            docs.append({"kind": "TrafficPermission", "name": f"tp-{j}", "spec": selectors(src, dst)})
    for j, (src, dst) in enumerate(pick_pairs()):
        conf = {"http": {"requests": draw(st.integers(1, 1000)), "interval": "1s"}}
        docs.append({"kind": "RateLimit", "name": f"rl-{j}", "spec": {**selectors(src, dst), "conf": conf}})
    return docs


def _render(doc: dict[str, Any], universal: bool) -> str:
    api = doc.get("api", "kuma.io/v1alpha1")
    if universal and api == "kuma.io/v1alpha1":
        body: dict[str, Any] = {"type": doc["kind"], "name": doc["name"]}
        if doc["kind"] != "Mesh":
            body["mesh"] = "default"
        body.update(doc["spec"])
    else:
        body = {"apiVersion": api, "kind": doc["kind"]}
        if doc["kind"] != "Mesh":
            body["mesh"] = "default"
        body["metadata"] = {"name": doc["name"]}
        body["spec"] = doc["spec"]
    return yaml.dump(body, Dumper=yaml.CSafeDumper, sort_keys=False)


def _sources(files: dict[str, str]) -> SourceSet:
    return SourceSet(
        tuple(
            SourceFile(path, data.encode(), git_blob_id(data.encode()))
            for path, data in sorted(files.items())
        )
    )


def _layout(docs: list[dict[str, Any]], groups: list[int], forms: list[bool], prefix: str) -> dict[str, str]:
    files: dict[str, list[str]] = {}
    for i, doc in enumerate(docs):
        files.setdefault(f"{prefix}{groups[i % len(groups)]}.yaml", []).append(
            _render(doc, forms[i % len(forms)])
        )
    return {name: "---\n".join(parts) for name, parts in files.items()}


def _no_errors(result: CompileResult) -> None:
    errors = [f"{d.file}:{d.span}: {d.code} {d.message}" for d in result.diagnostics if d.severity == "error"]
    assert not errors, errors


@_settings(40)
@given(
    docs=policy_sets(),
    groups=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    forms=st.lists(st.booleans(), min_size=1, max_size=4),
    rng=st.randoms(use_true_random=False),
)
def test_valid_sets_compile_deterministically(
    docs: list[dict[str, Any]], groups: list[int], forms: list[bool], rng: Any
) -> None:
    files = _layout(docs, groups, forms, "p")
    first = compile_sources(_sources(files))
    _no_errors(first)
    second = compile_sources(_sources(files))
    assert first.bundles == second.bundles
    assert first.release == second.release and first.release_id == second.release_id
    assert first.digests and all(len(h) == 64 for h in first.digests.values())

    # Other file names, another document order and grouping: the same behaviour, the same bundles.
    shuffled = list(docs)
    rng.shuffle(shuffled)
    other = compile_sources(_sources(_layout(shuffled, [0, 1], [not f for f in forms], "renamed/q")))
    _no_errors(other)
    assert other.bundles == first.bundles


# --- mutations through the real CLI -------------------------------------------------------------

_KEY = re.compile(rb"^(\s*-?\s*)([A-Za-z_./-]+):", re.M)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEED_FILES)))
    data = bytearray(SEED_FILES[name])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "indent", "dedent", "swap_keys", "dup_line"]))
        lines = bytes(data).split(b"\n")
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 12))]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(
                st.sampled_from([b":", b"- ", b"&a ", b"*a", b"{", b"]", b"'", b"~", b"\t", b"\n", b"0"])
            )
        elif op in ("indent", "dedent", "dup_line"):
            i = draw(st.integers(0, len(lines) - 1))
            if op == "indent":
                lines[i] = b"  " + lines[i]
            elif op == "dedent":
                lines[i] = lines[i][2:] if lines[i].startswith(b"  ") else lines[i]
            else:
                lines.insert(i, lines[i])
            data = bytearray(b"\n".join(lines))
        elif op == "swap_keys":
            keys = list(_KEY.finditer(bytes(data)))
            if len(keys) >= 2:
                a, b = sorted(
                    draw(
                        st.lists(st.sampled_from(keys), min_size=2, max_size=2, unique_by=lambda m: m.start())
                    ),
                    key=lambda m: m.start(),
                )
                ka, kb = a.group(2), b.group(2)
                data = bytearray(
                    bytes(data[: a.start(2)])
                    + kb
                    + bytes(data[a.end(2) : b.start(2)])
                    + ka
                    + bytes(data[b.end(2) :])
                )
    return name, bytes(data)


def _cli_json(policy_dir: Path) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(policy_dir), "--format", "json"])
    return code, json.loads(out.getvalue()), err.getvalue()


@_settings(150)
@given(mutation=mutations())
def test_mutated_yaml_gives_diagnostics_not_tracebacks(mutation: tuple[str, bytes]) -> None:
    name, data = mutation
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = Path(tmp)
        for fname, content in SEED_FILES.items():
            (policy_dir / fname).write_bytes(data if fname == name else content)
        code, report, err = _cli_json(policy_dir)
    assert code in (0, 1), err
    assert err == ""
    errors = [d for d in report["diagnostics"] if d["severity"] == "error"]
    assert (code == 1) == bool(errors)
    for d in report["diagnostics"]:
        assert d["line"] >= 1 and d["column"] >= 1 and d["message"]


# --- fast and slow loaders agree ----------------------------------------------------------------

_SCALARS = st.sampled_from(
    [
        "1", "-1", "+1", "010", "0o17", "0x1F", "0b1", "1_000", "1.5", "1e3", ".5", "1.", ".inf", "-.Inf",
        ".nan", "NaN", "inf", "true", "False", "TRUE", "yes", "no", "on", "off", "y", "~", "null", "Null",
        "", "''", '""', "'1'", '"true"', "!!str 1", "!!int 1", "! 1", "!custom x", "2001-12-14",
        "12:30:45", "1:20", "abc", "a b", "'a: b'", '"\\t"', "|\n  text\n", ">-\n  folded\n", "*", "'*'",
        "&x 5", "[1, 2]", "{a: 1}", "[]", "{}", "'it''s'", '"\\u00e9"', "é", "0.0", "-0", "00",
        "1e", "0x", "0o", "+.inf", "<<",
    ]
)  # fmt: skip


@st.composite
def yaml_texts(draw: st.DrawFn) -> bytes:
    """Small YAML documents built from tricky scalars, in block and flow style, with anchors."""
    lines = []
    used_keys: list[str] = []
    for i in range(draw(st.integers(1, 6))):
        key = draw(st.sampled_from(["a", "b", "c", "1", "true", "~", "'a'", "<<", f"k{i}"]))
        used_keys.append(key)
        style = draw(st.sampled_from(["scalar", "list", "map", "alias"]))
        if style == "scalar":
            value = draw(_SCALARS)
            if "\n" in value:
                value = value.replace("\n  ", "\n    ")
            lines.append(f"{key}: {value}")
        elif style == "list":
            items = draw(st.lists(_SCALARS.filter(lambda s: "\n" not in s), max_size=3))
            lines.append(f"{key}:" + "".join(f"\n  - {v}" for v in items))
        elif style == "map":
            items = draw(st.lists(_SCALARS.filter(lambda s: "\n" not in s), max_size=3))
            lines.append(f"{key}: &m{i}" + "".join(f"\n  x{j}: {v}" for j, v in enumerate(items)))
        else:
            lines.append(f"{key}: *m{draw(st.integers(0, i))}")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        text = "---\n" + text + "---\n" + text
    return text.encode()


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and keeps 1 / 1.0 / True apart."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        bk = list(b.items())
        return all(_same(ka, kb) and _same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), bk, strict=True))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _agree(data: bytes) -> bool:
    """Whether the fast loader took ``data``; when it did, the careful loader reads the same."""
    fast = load_fast(data)
    if fast is None:
        return False
    _, slow, findings = load_positions("f.yaml", data)
    assert not findings, (data, fast, findings)
    assert _same(fast, slow), (data, fast, slow)
    return True


def _agreement(strategy: st.SearchStrategy[bytes], examples: int) -> int:
    """Run the agreement property over ``examples`` inputs; returns how many the fast loader took.

    The property holds trivially for an input the fast loader refuses, so each test also asks for
    a share of inputs taken (the examples are derandomized: the count is the same on every run).
    """
    taken: list[bytes] = []

    @_settings(examples)
    @given(data=strategy)
    def agree(data: bytes) -> None:
        if _agree(data):
            taken.append(data)

    agree()
    return len(taken)


def test_loaders_agree_on_tricky_yaml() -> None:
    # 141 of 400 taken when written; a fast loader that refuses everything fails here.
    assert _agreement(yaml_texts(), 400) >= 40


def test_loaders_agree_on_mutated_policies() -> None:
    # 109 of 200 taken when written.
    assert _agreement(mutations().map(lambda m: m[1]), 200) >= 40


def test_loaders_agree_on_noise() -> None:
    # 41 of 200 taken when written.
    noise = st.binary(max_size=60) | st.text(alphabet=":-[]{}&*!|>'\"#%@`, \n\tab01.~?", max_size=60).map(
        str.encode
    )
    assert _agreement(noise, 200) >= 10


@pytest.mark.parametrize("name", sorted(SEED_FILES))
def test_fast_loader_takes_every_seed_policy(name: str) -> None:
    assert _agree(SEED_FILES[name]), f"the fast loader refused policies/{name}"
