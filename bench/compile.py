"""Compile benchmark (issue 2 item 11, issue 3 item 6): not a test, a measurement.

Generates synthetic policy repos (one Mesh; per service a Service catalog entry with subsets, a
TrafficRoute, a TrafficPermission, a Retry and a Timeout, in one file per service) and measures,
each phase in a fresh subprocess so that peak RSS is the phase's own:

* ``parse``: the baseline, every file read and loaded with PyYAML's ``CSafeLoader`` (plain data);
* ``compile``: the cold compile in-process (``compile_dir``), then writing the release;
* ``incremental`` (largest repo only): an ``IncrementalCompiler`` warmed by a cold compile, then
  one route edited and recompiled, timed inside the running process; the bundles it rewrote are
  compared with the bundles whose digest a cold compile of the edited repo changes;
* ``release`` (largest repo only): the control plane's whole compile side for a route edit and a
  Timeout edit (re-read, compile, mesh pieces, rollout diff; target ``release_s``), each checked
  byte for byte against a cold compile.

Prints docs/s, wall time, peak RSS and the ratio compile / parse-only, and writes JSON to
``bench/results/compile.json``. ``--quick`` runs one small repo (for a smoke test).

    .venv/bin/python bench/compile.py            # 1,000 and 10,000 services
    .venv/bin/python bench/compile.py --quick    # 200 services
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "compile.json"

TARGETS = {"cold_s": 10.0, "ratio": 2.5, "rss_mib": 1024.0, "incremental_s": 0.3, "release_s": 0.3}

MESH = """\
apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  mtls:
    enabledBackend: ca-1
    backends:
      - name: ca-1
        type: builtin
        mode: PERMISSIVE
  networking:
    outbound:
      passthrough: true
"""

SERVICE = """\
# {name}: catalog entry and its policies
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata:
  name: {name}
spec:
  port: {port}
  protocol: http
  subsets:
    - version: v1
    - version: v2
---
apiVersion: kuma.io/v1alpha1
kind: TrafficRoute
mesh: default
metadata:
  name: {name}-to-{next}
spec:
  sources:
    - match:
        kuma.io/service: {name}
  destinations:
    - match:
        kuma.io/service: {next}
  conf:
    split:
      - weight: {w1}
        destination:
          kuma.io/service: {next}
          version: v1
      - weight: {w2}
        destination:
          kuma.io/service: {next}
          version: v2
---
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata:
  name: {prev}-to-{name}
spec:
  sources:
    - match:
        kuma.io/service: {prev}
  destinations:
    - match:
        kuma.io/service: {name}
---
apiVersion: kuma.io/v1alpha1
kind: Retry
mesh: default
metadata:
  name: {name}-retry
spec:
  sources:
    - match:
        kuma.io/service: {name}
  destinations:
    - match:
        kuma.io/service: {next}
  conf:
    http:
      numRetries: {retries}
      perTryTimeout: {per_try}ms
      backOff:
        baseInterval: 25ms
        maxInterval: 250ms
      retryOn:
        - gateway_error
        - connect_failure
---
apiVersion: kuma.io/v1alpha1
kind: Timeout
mesh: default
metadata:
  name: {name}-timeout
spec:
  sources:
    - match:
        kuma.io/service: "*"
  destinations:
    - match:
        kuma.io/service: {name}
  conf:
    connectTimeout: {connect}s
    http:
      requestTimeout: {request}s
"""

DOCS_PER_SERVICE = 5


def service_name(i: int) -> str:
    return f"svc-{i:05d}"


def service_yaml(i: int, n: int, w1: int | None = None) -> str:
    w = 90 - (i % 5) * 10 if w1 is None else w1
    return SERVICE.format(
        name=service_name(i),
        next=service_name((i + 1) % n),
        prev=service_name((i - 1) % n),
        port=4000 + i % 1000,
        w1=w,
        w2=100 - w,
        retries=1 + i % 4,
        per_try=100 * (1 + i % 7),
        connect=1 + i % 3,
        request=5 + i % 10,
    )


def service_path(root: Path, i: int) -> Path:
    return root / "services" / f"{service_name(i)}.yaml"


def generate(root: Path, n: int) -> int:
    """Write a repo of ``n`` services under ``root``; returns the number of documents."""
    (root / "services").mkdir(parents=True, exist_ok=True)
    (root / "mesh.yaml").write_text(MESH)
    for i in range(n):
        service_path(root, i).write_text(service_yaml(i, n))
    return 1 + n * DOCS_PER_SERVICE


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- phases (each runs in its own subprocess) -----------------------------------------------------


def phase_parse(root: Path) -> dict[str, Any]:
    import yaml

    paths = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))
    t0, c0 = time.perf_counter(), time.process_time()
    docs = 0
    for p in paths:
        docs += sum(1 for _ in yaml.load_all(p.read_bytes(), Loader=yaml.CSafeLoader))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "documents": docs, "files": len(paths)}


def phase_compile(root: Path) -> dict[str, Any]:
    from compiler.output import write_release
    from compiler.pipeline import compile_dir

    t0, c0 = time.perf_counter(), time.process_time()
    result = compile_dir(root)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.errors:
        raise SystemExit(f"the generated repo does not compile: {result.diagnostics[:3]}")
    with tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        write_release(result, out)
        write = time.perf_counter() - t1
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "child_cpu_s": child.ru_utime + child.ru_stime,
        "child_peak_rss_mib": round(child.ru_maxrss / 1024.0, 1),
        "write_s": write,
        "documents": result.documents,
        "files": result.files,
        "bundles": len(result.bundles),
        "release_id": result.release_id,
        "warnings": result.warnings,
    }


def phase_incremental(root: Path) -> dict[str, Any]:
    from compiler.incremental import IncrementalCompiler
    from compiler.pipeline import compile_sources
    from compiler.source import SourceFile, SourceSet, git_blob_id, read_policy_dir

    src = read_policy_dir(root)
    n = len(src.files) - 1
    with tempfile.TemporaryDirectory() as out:
        inc = IncrementalCompiler(out=out)
        t0 = time.perf_counter()
        first = inc.update(src)
        warm_cold = time.perf_counter() - t0
        assert not first.result.errors, first.result.diagnostics[:3]
        before = first.result.digests

        # Edit one route: the weights of svc-00007 -> svc-00008 (a watcher hands over the new file).
        i = 7 % n
        target = service_path(root, i).resolve()
        rel = next(f.path for f in src.files if f.path.endswith(target.name))
        data = service_yaml(i, n, w1=55).encode()
        edited = SourceSet(
            tuple(SourceFile(f.path, data, git_blob_id(data)) if f.path == rel else f for f in src.files),
            src.commit,
            src.repo_root,
        )
        t1, c1 = time.perf_counter(), time.process_time()
        step = inc.update(edited)
        incr, incr_cpu = time.perf_counter() - t1, time.process_time() - c1
        assert not step.result.errors

        # A re-read of the directory (what the CLI does) is timed on its own.
        target.write_bytes(data)
        t2 = time.perf_counter()
        reread = read_policy_dir(root)
        read_s = time.perf_counter() - t2
        assert reread.files == edited.files

        # No edit at all: nothing to rebuild.
        t3 = time.perf_counter()
        noop = inc.update(reread)
        noop_s = time.perf_counter() - t3

        cold = compile_sources(edited)
        assert cold.bundles == step.result.bundles and cold.release == step.result.release
        behaviour_changed = sorted(k for k, v in cold.digests.items() if before.get(k) != v)
        behaviour_changed += sorted(k for k in before if k not in cold.digests)
    return {
        "cold_in_process_s": warm_cold,
        "wall_s": incr,
        "cpu_s": incr_cpu,
        "reread_dir_s": read_s,
        "noop_update_s": noop_s,
        "noop_rebuilt": len(noop.rebuilt),
        "edited_file": rel,
        "rebuilt": list(step.rebuilt),
        "written": step.written,
        "behaviour_changed": behaviour_changed,
        "rewritten_equals_changed": sorted(step.changed) == behaviour_changed
        and step.written == len(behaviour_changed),
        "byte_identical_to_cold": True,
    }


def _later(m: Any) -> str:
    return f"requestTimeout: {int(m.group(1)) % 50 + 7}s"


def phase_release(root: Path) -> dict[str, Any]:
    """The control plane's compile side for one-file edits, as ``compile_once`` runs it: re-read
    the directory (by stat), compile incrementally (writing bundles and the release), cut the
    mesh bundle's pieces, adopt the release (the rollout diff). A route weight edit and a Timeout
    edit (one destination's default: the mesh bundle). Each checked against a cold compile."""
    import re

    from compiler.controlplane.pieces import PieceStore
    from compiler.controlplane.release import Compiler, ReleaseState
    from compiler.pipeline import compile_sources
    from compiler.source import read_policy_dir
    from runtime.pieces import split_mesh

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        comp, rel, store = Compiler(Path(tmp)), ReleaseState(), PieceStore()

        def release(label: str) -> dict[str, Any]:
            t0, c0 = time.perf_counter(), time.process_time()
            src = comp.read(root)
            t1 = time.perf_counter()
            result = comp.compile(src)
            t2 = time.perf_counter()
            assert not result.errors, result.diagnostics[:3]
            for d, mp in comp.split_meshes(store, result.bundles, result.digests).items():
                store.add(d, mp)
            t3 = time.perf_counter()
            changed = rel.apply(result, seen_at=time.time(), trigger=label, duration_s=t2 - t0)
            t4, c4 = time.perf_counter(), time.process_time()
            return {
                "read_s": t1 - t0,
                "compile_s": t2 - t1,
                "pieces_s": t3 - t2,
                "apply_s": t4 - t3,
                "wall_s": t4 - t0,
                "cpu_s": c4 - c0,
                "changed": len(changed or ()),
                "changed_keys": sorted(changed or ())[:10],
            }

        out["cold"] = release("cold")
        for kind, i in (("route", 7), ("timeout", 8), ("route_again", 9), ("timeout_again", 10)):
            path = service_path(root, i)
            n = len(list((root / "services").iterdir()))
            text = path.read_text()
            if kind.startswith("route"):  # the weights of svc-i -> svc-(i+1)
                text = service_yaml(i, n, w1=65 if "weight: 55\n" in text else 55)
            else:
                text = re.sub(r"requestTimeout: (\d+)s", _later, text)
            path.write_text(text)
            out[kind] = release(kind)
            cold = compile_sources(read_policy_dir(root))
            cur = rel.current
            assert cur is not None and cur.bundles == cold.bundles and cur.record == cold.release, kind
            want = split_mesh(cold.bundles["default"])
            got = store.mesh(cold.digests["default"], b"")
            assert (got.manifest, dict(got.pieces)) == (want.manifest, dict(want.pieces)), kind
    out["byte_identical_to_cold"] = True
    return out


PHASES = {
    "parse": phase_parse,
    "compile": phase_compile,
    "incremental": phase_incremental,
    "release": phase_release,
}


def run_phase(phase: str, root: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--dir", str(root)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _child(phase: str, root: Path) -> None:
    out = PHASES[phase](root)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(out))


def bench(sizes: list[int], incremental: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "targets": TARGETS,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="meshc-bench-") as tmp:
        for n in sizes:
            root = Path(tmp) / f"repo-{n}"
            t0 = time.perf_counter()
            docs = generate(root, n)
            gen = time.perf_counter() - t0
            parse = run_phase("parse", root)
            comp = run_phase("compile", root)
            run: dict[str, Any] = {
                "services": n,
                "documents": docs,
                "generate_s": round(gen, 3),
                "parse_only": _rounded(parse, docs),
                "compile": _rounded(comp, docs),
                "ratio": round(comp["wall_s"] / parse["wall_s"], 3),
            }
            if incremental and n == max(sizes):
                run["incremental"] = _rounded(run_phase("incremental", root), None)
                run["release"] = {
                    k: _rounded(v, None) if isinstance(v, dict) else v
                    for k, v in run_phase("release", root).items()
                }
            _print_run(run)
            report["runs"].append(run)
    return report


def _rounded(d: dict[str, Any], docs: int | None) -> dict[str, Any]:
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    if docs is not None:
        out["docs_per_s"] = round(docs / d["wall_s"])
    return out


def _print_run(run: dict[str, Any]) -> None:
    p, c = run["parse_only"], run["compile"]
    print(f"{run['services']:>6} services, {run['documents']} documents")
    print(
        f"  parse-only (CSafeLoader): {p['wall_s']:7.2f} s  {p['docs_per_s']:>7} docs/s  "
        f"peak RSS {p['peak_rss_mib']:7.1f} MiB  (cpu {p['cpu_s']:.2f} s)"
    )
    print(
        f"  cold compile:             {c['wall_s']:7.2f} s  {c['docs_per_s']:>7} docs/s  "
        f"peak RSS {c['peak_rss_mib']:7.1f} MiB  (cpu {c['cpu_s']:.2f} s + forked loader "
        f"{c['child_cpu_s']:.2f} s, {c['child_peak_rss_mib']:.0f} MiB)"
    )
    print(f"  write: {c['write_s']:.2f} s, {c['bundles']} bundles")
    print(f"  ratio compile / parse-only: {run['ratio']:.2f}")
    inc = run.get("incremental")
    if inc:
        print(
            f"  incremental, one route edited: {inc['wall_s'] * 1000:.0f} ms "
            f"(cpu {inc['cpu_s'] * 1000:.0f} ms), rebuilt {len(inc['rebuilt'])}, written {inc['written']}, "
            f"behaviour changed {len(inc['behaviour_changed'])} (equal: {inc['rewritten_equals_changed']})"
        )
        print(
            f"  no-op update {inc['noop_update_s'] * 1000:.0f} ms; "
            f"re-reading the directory {inc['reread_dir_s'] * 1000:.0f} ms"
        )
    for kind, r in run.get("release", {}).items():
        if isinstance(r, dict):
            print(
                f"  control plane, {kind:13s}: {r['wall_s'] * 1000:6.0f} ms (read {r['read_s'] * 1000:.0f}, "
                f"compile {r['compile_s'] * 1000:.0f}, pieces {r['pieces_s'] * 1000:.0f}, "
                f"apply {r['apply_s'] * 1000:.0f}; cpu {r['cpu_s'] * 1000:.0f}), changed {r['changed']}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small repo (200 services), for a smoke test")
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated service counts")
    ap.add_argument("--no-incremental", action="store_true", help="skip the incremental case")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=int, metavar="N", help="only write a repo of N services to --dir")
    args = ap.parse_args(argv)
    if args.phase:
        _child(args.phase, args.dir)
        return 0
    if args.generate:
        if args.dir is None:
            ap.error("--generate needs --dir")
        generate(args.dir, args.generate)
        return 0
    sizes = [200] if args.quick else [int(x) for x in args.sizes.split(",")]
    report = bench(sizes, not args.no_incremental)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
