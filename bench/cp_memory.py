"""Where the control plane's memory goes (issue 11 item 4): not a test, a measurement.

Runs a real control plane (``meshc controlplane``) on a generated repo (``bench/compile.py``'s
generator), with a report hook: on SIGUSR2 the process writes a memory report (its
``/proc/self/status`` and ``smaps_rollup``, glibc's ``mallinfo2``, the retained size of each of
the control plane's big structures, the largest object types, and with ``--tracemalloc`` the
largest allocation sites), then the same figures after ``gc.collect()`` and ``malloc_trim``.
Reports are taken after the cold compile, with the stub data planes (``bench/propagation.py``'s
``--stubs``) all SYNCED, and after a route change and a mesh-wide change.

Retained sizes are ``sys.getsizeof`` summed over what each root reaches and an earlier root did
not (the roots in the order listed; modules, classes and functions are not followed), so a
structure shared by two holders counts for the first.

    .venv/bin/python bench/cp_memory.py --services 10000 --dataplanes 1000
    .venv/bin/python bench/cp_memory.py --services 10000 --dataplanes 1000 --tracemalloc

Writes ``bench/results/cp_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "cp_memory.json"
sys.path.insert(0, str(ROOT))

# --- in the control plane process -----------------------------------------------------------------

_SKIP = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.FrameType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks"),
            *("uordblks", "fordblks", "keepcost"),
        )
    ]


def _libc() -> Any:
    return ctypes.CDLL("libc.so.6")


def _status() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData", "Threads"):
            out[k] = round(int(v.split()[0]) / 1024, 1) if k != "Threads" else int(v.split()[0])
    return out


def _rollup() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        if v.strip().endswith("kB"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


def _mallinfo() -> dict[str, float]:
    libc = _libc()
    libc.mallinfo2.restype = _MallInfo2
    mi = libc.mallinfo2()
    return {
        "arena_mib": round(mi.arena / 2**20, 1),
        "mmap_mib": round(mi.hblkhd / 2**20, 1),
        "in_use_mib": round(mi.uordblks / 2**20, 1),
        "free_mib": round(mi.fordblks / 2**20, 1),
    }


def _pymalloc() -> dict[str, float]:
    """pymalloc's own figures (``sys._debugmallocstats``): its arenas hold every object of up to
    512 bytes; what is free in them is not given back while one block of an arena lives."""
    import tempfile as _t

    with _t.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    out: dict[str, float] = {}
    for key, name in (
        ("arenas allocated current", "arenas"),
        ("bytes in allocated blocks", "allocated_mib"),
        ("bytes in available blocks", "available_mib"),
        ("arenas highwater mark", "arenas_highwater"),
    ):
        m = re.search(rf"# {key}\s*=\s*([0-9,]+)", text)
        if m:
            v = int(m.group(1).replace(",", ""))
            out[name] = v if "arenas" in name else round(v / 2**20, 1)
    return out


def _arenas() -> dict[str, float]:
    """Anonymous mappings by size class: the main heap, glibc thread arenas (64 MiB reservations)
    and pymalloc / large mmaps, from ``/proc/self/smaps``."""
    out = {"heap": 0.0, "anon_64m_reservations": 0.0, "anon_other": 0.0}
    cur: tuple[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
            name = m.group(3).strip()
            cur = ("heap" if name == "[heap]" else ("" if name else "anon"), size)
            continue
        if line.startswith("Rss:") and cur is not None and cur[0]:
            rss = int(line.split()[1]) / 1024
            if cur[0] == "heap":
                out["heap"] += rss
            elif cur[1] >= 32 * 2**20 and cur[1] <= 64 * 2**20:
                out["anon_64m_reservations"] += rss
            else:
                out["anon_other"] += rss
    return {k: round(v, 1) for k, v in out.items()}


def _retained(roots: list[tuple[str, Any]], limit_types: int = 6) -> list[dict[str, Any]]:
    seen: set[int] = set()
    for _, r in roots:  # never walk into another root from one
        seen.add(id(r))
    rows = []
    for name, root in roots:
        total = 0
        n = 0
        by_type: dict[str, list[int]] = {}
        stack = [root]
        first = True
        while stack:
            o = stack.pop()
            if not first:
                if id(o) in seen or isinstance(o, _SKIP):
                    continue
                seen.add(id(o))
            first = False
            try:
                sz = sys.getsizeof(o)
            except TypeError:
                sz = 0
            total += sz
            n += 1
            t = type(o).__name__
            bt = by_type.setdefault(t, [0, 0])
            bt[0] += sz
            bt[1] += 1
            stack.extend(gc.get_referents(o))
        top = sorted(by_type.items(), key=lambda kv: -kv[1][0])[:limit_types]
        rows.append(
            {
                "root": name,
                "mib": round(total / 2**20, 2),
                "objects": n,
                "types": {t: {"mib": round(s / 2**20, 2), "n": c} for t, (s, c) in top},
            }
        )
    return rows


def _roots(cp: Any) -> list[tuple[str, Any]]:
    inc = cp.compiler._inc
    out: list[tuple[str, Any]] = []
    files = getattr(inc, "_files", {})
    out.append(("parsed: source bytes (SourceFile)", [getattr(p, "file", None) for p in files.values()]))
    docs = [d for p in files.values() for d in getattr(p, "docs", ())]
    out.append(("parsed: Doc specs", [getattr(d, "spec", None) for d in docs]))
    out.append(("parsed: Doc objects", docs))
    out.append(("parsed: positions", [getattr(p, "positions", None) for p in files.values()]))
    for name, m in getattr(inc, "_meshes", {}).items():
        for attr in ("idx", "builder", "parts"):
            sub = getattr(m, attr, None)
            for a in sorted(vars(sub)) if sub is not None and hasattr(sub, "__dict__") else ():
                out.append((f"_meshes[{name}].{attr}.{a}", getattr(sub, a)))
        for attr in sorted(vars(m)):
            if attr not in ("idx", "builder", "parts"):
                out.append((f"_meshes[{name}].{attr}", getattr(m, attr)))
    for attr in sorted(vars(inc)):
        out.append((f"compiler._inc.{attr}", getattr(inc, attr)))
    out.append(("compiler._stat", cp.compiler._stat))
    out.append(("releases", cp.releases))
    pieces = cp.pusher.pieces
    for attr in sorted(vars(pieces)):
        out.append((f"pusher.pieces.{attr}", getattr(pieces, attr)))
    for attr in sorted(vars(cp.pusher)):
        if attr not in ("pieces", "registry", "releases", "metrics"):
            out.append((f"pusher.{attr}", getattr(cp.pusher, attr)))
    out.append(("registry", cp.registry))
    for attr in sorted(vars(cp)):
        if attr not in ("compiler", "releases", "pusher", "registry"):
            out.append((f"cp.{attr}", getattr(cp, attr)))
    out.append(("sys.modules (code, libraries)", sys.modules))
    return out


def _types_all(limit: int = 25) -> list[dict[str, Any]]:
    """Every object the collector tracks and what they reference directly (str, bytes, ints the
    containers hold), by type."""
    seen: set[int] = set()
    by: dict[str, list[int]] = {}
    objs = gc.get_objects()
    for o in objs:
        for x in (o, *gc.get_referents(o)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            try:
                sz = sys.getsizeof(x)
            except TypeError:
                continue
            t = by.setdefault(type(x).__name__, [0, 0])
            t[0] += sz
            t[1] += 1
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"type": t, "mib": round(s / 2**20, 2), "n": c} for t, (s, c) in top]


def _tracemalloc(limit: int = 40) -> dict[str, Any] | None:
    import tracemalloc

    if not tracemalloc.is_tracing():
        return None
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    )
    total = sum(s.size for s in snap.statistics("filename"))

    def rows(key: str) -> list[dict[str, Any]]:
        out = []
        for s in snap.statistics(key)[:limit]:
            fr = s.traceback[0]
            where = fr.filename.replace(str(ROOT) + "/", "")
            where = re.sub(r".*/site-packages/", "", where)
            out.append(
                {
                    "where": f"{where}:{fr.lineno}" if key == "lineno" else where,
                    "mib": round(s.size / 2**20, 2),
                    "n": s.count,
                }
            )
        return out

    return {"traced_mib": round(total / 2**20, 1), "by_file": rows("filename"), "by_line": rows("lineno")}


def _report(label: str, path: Path) -> None:
    cp = next((o for o in gc.get_objects() if type(o).__name__ == "ControlPlane"), None)
    rep: dict[str, Any] = {"label": label, "status": _status(), "smaps_rollup": _rollup()}
    rep["mappings"] = _arenas()
    rep["mallinfo2"] = _mallinfo()
    rep["pymalloc"] = _pymalloc()
    # before the walks below, which allocate (a set of every object's id) and so raise both
    gc.collect()
    rep["after_gc"] = _status()
    _libc().malloc_trim(0)
    rep["after_gc_trim"] = _status()
    rep["after_gc_trim_mallinfo2"] = _mallinfo()
    rep["after_gc_trim_pymalloc"] = _pymalloc()
    rep["python_allocated_blocks"] = sys.getallocatedblocks()
    rep["tracemalloc"] = _tracemalloc()
    if cp is not None:
        rep["retained"] = _retained(_roots(cp))
    rep["types"] = _types_all()
    with path.open("a") as f:
        f.write(json.dumps(rep) + "\n")


def _serve(argv: list[str]) -> int:
    """The control plane, with the report hook (SIGUSR2; the label is read from a file)."""
    out = Path(os.environ["MESHC_MEMREPORT"])

    def on_signal(_sig: int, _frame: object) -> None:
        label = out.with_suffix(".label").read_text().strip()
        _report(label, out)
        out.with_suffix(".done").write_text(label)

    signal.signal(signal.SIGUSR2, on_signal)
    from compiler.cli import main

    return int(main(argv) or 0)


# --- the driver ---------------------------------------------------------------------------------


def _prop() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_prop_bench", HERE / "propagation.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ask(pid: int, report: Path, label: str, timeout: float = 600.0) -> dict[str, Any]:
    done = report.with_suffix(".done")
    done.unlink(missing_ok=True)
    report.with_suffix(".label").write_text(label)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not (done.exists() and done.read_text() == label):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no memory report {label!r}")
        time.sleep(0.2)
    rep: dict[str, Any] = json.loads(report.read_text().splitlines()[-1])
    print(
        f"  {label}: {rep['status']} after gc+trim {rep['after_gc_trim']} mallinfo {rep['mallinfo2']}",
        flush=True,
    )
    for r in rep.get("retained", [])[:]:
        if r["mib"] >= 1.0:
            print(f"    {r['mib']:8.2f} MiB  {r['root']}  {list(r['types'])[:4]}", flush=True)
    return rep


def run(n_services: int, n_dp: int, trace: bool, work: Path, heartbeat: float) -> dict[str, Any]:
    prop = _prop()
    gen = prop._gen()
    repo = work / "repo"
    gen.generate(repo, n_services)
    port = prop.free_port()
    cp = f"http://127.0.0.1:{port}"
    report = work / "report.jsonl"
    prop._token(work, "-")
    env = {**prop._env(), "MESHC_MEMREPORT": str(report)}
    cmd = [sys.executable, *(["-X", "tracemalloc=1"] if trace else []), str(Path(__file__).resolve())]
    cmd += ["--serve", "controlplane", str(repo), "--out", str(work / "out")]
    cmd += ["--listen", f"127.0.0.1:{port}", "--heartbeat-interval", str(heartbeat)]
    cmd += ["--state-dir", str(work / "cp-state")]
    cpp = prop.Proc("controlplane", cmd, work / "controlplane.log", env)
    cpp.start()
    procs = [cpp]
    reports: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        prop._wait(lambda: prop._get(f"{cp}/healthz")["release"] is not None, 1800, "compile", procs, 0.5)
        first = time.monotonic() - t0
        reports["after_compile"] = _ask(cpp.pid or 0, report, "after_compile")
        n_svc = max(1, n_dp // 10)
        stubs = prop.Proc(
            "stubs",
            [
                sys.executable,
                str(HERE / "propagation.py"),
                "--stubs",
                str(n_dp),
                "--cp",
                cp,
                "--stub-services",
                ",".join(gen.service_name(i) for i in range(n_svc)),
                "--stub-work",
                str(work),
                "--stub-pieces",
            ],
            work / "stubs.log",
            prop._env(),
        )
        stubs.start()
        procs.append(stubs)
        prop._wait(lambda: prop._synced(cp, n_dp), 1800, f"{n_dp} SYNCED", procs, poll=0.5)
        reports["with_dataplanes"] = _ask(cpp.pid or 0, report, "with_dataplanes")
        for c, kind in enumerate(("route", "mesh")):
            path = gen.service_path(repo, 0)
            text = path.read_text()
            if kind == "route":
                text = re.sub(r"weight: (\d+)", lambda m: f"weight: {int(m.group(1)) + 1}", text, count=1)
            else:
                text = re.sub(r"requestTimeout: \d+s", f"requestTimeout: {40 + c}s", text)
            before = prop._get(f"{cp}/api/v1/status")["release"]
            path.write_text(text)

            def done(before: str = before) -> bool:
                ros = prop._get(f"{cp}/api/v1/rollouts")["rollouts"]
                return bool(ros) and ros[0]["release"] != before and ros[0]["completed_at"] is not None

            prop._wait(done, 600, f"{kind} change ACKed", procs, poll=0.05)
        reports["after_changes"] = _ask(cpp.pid or 0, report, "after_changes")
    finally:
        prop._stop(procs[1:])
        prop._stop(procs[:1])
    return {
        "services": n_services,
        "dataplanes": n_dp,
        "tracemalloc": trace,
        "first_compile_s": round(first, 2),
        "reports": reports,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return _serve(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--dataplanes", type=int, default=1000)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--tracemalloc", action="store_true", help="trace allocations (slower, more RSS)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshc-bench-cpmem-") as tmp:
        res = run(args.services, args.dataplanes, args.tracemalloc, Path(tmp), args.heartbeat_interval)
    res["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
