"""What serving format 1 beside format 2 costs (issue 11, mixed-version meshes): a measurement.

A synthetic mesh bundle of N services (each with a destination, 4 distinct variants) is split
as the control plane splits it (``split_mesh``: the baseline, timed in the same run), then its
format 1 view is made (``MeshPieces.as_format(1)``, what the control plane adds once per release
when some data plane runs format 1). Then one destination changes: the bytes of the push to a
data plane that held the release before and holds that destination, in format 2 and format 1,
and the time a data plane of this version takes to assemble each incrementally.

    .venv/bin/python bench/pieces_formats.py            # 10,000 services
    .venv/bin/python bench/pieces_formats.py --quick    # 1,000 services

Writes ``bench/results/pieces_formats.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from runtime.bundle import (  # noqa: E402
    CatalogService,
    Destination,
    MeshBundle,
    RouteConf,
    Rule,
    Split,
    TimeoutConf,
    bundle_bytes,
)
from runtime.pieces import MeshPieces, assemble, split_mesh  # noqa: E402

RESULTS = HERE / "results" / "pieces_formats.json"
T = TypeVar("T")


def _mesh(n: int, changed_timeout_ms: int) -> bytes:
    names = [f"svc-{i:05d}" for i in range(n)]

    def dest(name: str, i: int) -> Destination:
        ms = changed_timeout_ms if name == names[n // 2] else 1000 * (1 + i % 4)
        return Destination(
            route=(Rule[RouteConf](conf=RouteConf(split=(Split(weight=1, service=name),))),),
            timeout=(Rule[TimeoutConf](conf=TimeoutConf(http_request_timeout_ms=ms)),),
        )

    return bundle_bytes(
        MeshBundle(
            mesh="default",
            services={
                nm: CatalogService(port=5000 + i % 1000, protocol="http") for i, nm in enumerate(names)
            },
            destinations={nm: dest(nm, i) for i, nm in enumerate(names)},
        )
    )


def _best(fn: Callable[[], T], runs: int = 5) -> tuple[float, T]:
    best, out = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        got = fn()
        best = min(best, time.perf_counter() - t0)
        out = got
    assert out is not None
    return best, out


def _change(before: MeshPieces, after: MeshPieces, name: str) -> tuple[int, float]:
    """(bytes of the push, seconds to assemble it incrementally) for a data plane holding
    ``before`` whole and the destination ``name``."""
    prev = assemble(before.manifest, [before.pieces[d] for d in before.wanted([name])], {}, {name})
    send = [*after.catalog_since(before), after.destinations[name]]
    body = after.body(send)
    carried = [after.pieces[d] for d in send]
    t, got = _best(lambda: assemble(after.manifest, carried, prev.pieces, set(prev.held), prev))
    assert got.manifest.format == after.format and name in got.held
    return len(body), t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    n = 1000 if args.quick else 10_000
    old, new = _mesh(n, 7000), _mesh(n, 9000)
    split_s, mp_old = _best(lambda: split_mesh(old), runs=3)
    mp_new = split_mesh(new)

    def view() -> MeshPieces:
        mp_old._views.clear()  # made once per release: timed as the first time, each run
        return mp_old.as_format(1)

    view_s, _ = _best(view)
    name = f"svc-{n // 2:05d}"
    b2, t2 = _change(mp_old, mp_new, name)
    b1, t1 = _change(mp_old.as_format(1), mp_new.as_format(1), name)
    whole = len(mp_new.body(mp_new.wanted([name])))
    out: dict[str, Any] = {
        "services": n,
        "machine": {
            "cpus": os.cpu_count(),
            "load_1m": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "split_s": round(split_s, 4),
        "format1_view_s": round(view_s, 5),
        "view_over_split": round(view_s / split_s, 4),
        "manifest_bytes": {"2": len(mp_new.manifest), "1": len(mp_new.as_format(1).manifest)},
        "change_push_bytes": {"2": b2, "1": b1},
        "change_bytes_1_over_2": round(b1 / b2, 2),
        "change_assemble_s": {"2": round(t2, 5), "1": round(t1, 5)},
        "change_assemble_1_over_2": round(t1 / t2, 2),
        "whole_scope_push_bytes": whole,
    }
    print(
        f"{n} services: split {split_s * 1000:.0f} ms, format 1 view {out['format1_view_s'] * 1000:.1f} ms "
        f"({out['view_over_split']:.3f}x the split); one-destination change: format 2 {b2} B, "
        f"format 1 {b1} B ({out['change_bytes_1_over_2']}x), whole scope {whole} B; assemble "
        f"{t2 * 1000:.2f} ms vs {t1 * 1000:.2f} ms ({out['change_assemble_1_over_2']}x); "
        f"load {out['machine']['load_1m']:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
