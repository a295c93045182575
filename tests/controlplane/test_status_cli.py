"""``meshc status`` as a terminal user meets it: 100 columns, ``-o wide``, ``| head -1``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from compiler.controlplane.status_table import WIDTH, render_table


def _row(i: int) -> dict[str, Any]:
    return {
        "instance": f"benigno-canary-release-instance-{i:04d}-7f9c2d",
        "service": "benigno_kong-mesh-app_svc_5000",
        "mesh": "default",
        "kind": "sidecar",
        "tags": {"version": "v2", "zone": "eu-west-1a", "team": "payments"},
        "state": "Online",
        "status": "STALE",
        "slots": {s: {"status": "SYNCED"} for s in ("endpoints", "mesh", "service")},
        "digest": {"mesh": "a" * 64, "service": "b" * 64},
        "admin_address": f"127.0.0.1:{20000 + i}",
        "inbound_address": f"127.0.0.1:{30000 + i}",
        "last_seen_ago_s": 0.4,
        "last_ack_at": 1.0e9,
        "last_nack": "403 bad signature: the push was not signed by this control plane",
    }


ROWS = [_row(i) for i in range(300)]


def test_the_default_table_fits_100_columns_and_wide_has_the_rest() -> None:
    text = render_table(ROWS, now=1.0e9 + 5)
    assert all(len(line) <= WIDTH for line in text.splitlines()), max(map(len, text.splitlines()))
    assert text.splitlines()[0].split() == ["NAME", "SERVICE", "TAGS", "STATE", "STATUS", "DIGEST", "SEEN"]
    assert "STALE" in text and "…" in text
    wide = render_table(ROWS, now=1.0e9 + 5, wide=True)
    first = wide.splitlines()[1]
    assert "127.0.0.1:20000" in first and "127.0.0.1:30000" in first and "403 bad signature" in first
    assert ROWS[0]["instance"] in first  # nothing shortened in wide
    assert wide.splitlines()[0].split()[9:11] == ["MESH", "FMT"] and first.split()[10] == "-"


def test_wide_shows_the_manifest_format_each_data_plane_is_served() -> None:
    rows = [
        {**_row(0), "pieces": True, "pieces_format": 2},
        {**_row(1), "pieces": True, "pieces_format": 1},
        {**_row(2), "pieces": False, "pieces_format": None},
        {**_row(3), "pieces": True, "pieces_format": None},
    ]
    lines = render_table(rows, now=1.0e9 + 5, wide=True).splitlines()
    assert [line.split()[10] for line in lines[1:]] == ["2", "1", "bundle", "none"]


def test_wide_shows_the_digest_a_stale_slot_runs() -> None:
    slots = {
        "endpoints": {"status": "STALE", "desired": "d" * 64, "running": "e" * 64},
        "mesh": {"status": "SYNCED", "desired": "a" * 64, "running": "a" * 64},
        "service": {"status": "STALE", "desired": "b" * 64, "running": None},
    }
    wide = render_table([{**_row(1), "slots": slots}], now=1.0e9 + 5, wide=True)
    cells = wide.splitlines()[1].split()
    assert "STALE(eeeeeeee)" in cells and "SYNCED" in cells and "STALE" in cells


def test_short_rows_are_not_shortened() -> None:
    row = {**_row(1), "instance": "benigno-1", "service": "benigno", "tags": {"version": "v1"}}
    text = render_table([row], now=1.0e9)
    assert "…" not in text and "benigno-1" in text and "version=v1" in text


@pytest.fixture
def fake_cp() -> Iterator[str]:
    # 2,000 rows: more than a pipe holds (64 KiB), so the writer is still writing when the
    # reader goes and the broken pipe is certain, not a race
    rows = [_row(i) for i in range(2000)]
    body = json.dumps({"release": "c" * 64, "commit": None, "digests": {}, "dataplanes": rows}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_status_piped_into_head_ends_quietly(fake_cp: str) -> None:
    status = subprocess.Popen(
        [sys.executable, "-m", "compiler.cli", "status", "--control-plane", fake_cp],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert status.stdout is not None and status.stderr is not None
    first = status.stdout.readline()
    status.stdout.close()  # what `head -1` does after its line
    err = status.stderr.read().decode()
    code = status.wait(60)
    assert first.startswith(b"release cccccccccccc")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 141


def test_status_wide_over_http(fake_cp: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "status", "--control-plane", fake_cp, "-o", "wide"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "ADMIN" in out.splitlines()[1] and "127.0.0.1:21999" in out


def test_status_loads_no_compiler_stage(fake_cp: str) -> None:
    """Building the parser and printing the table load the CLI modules only (it used to load
    the whole compiler, 1.4 s of imports, for a table)."""
    code = (
        "import sys; from compiler.cli import main; "
        f"main(['status', '--control-plane', {fake_cp!r}]); "
        "print(sorted(m for m in sys.modules if m.startswith('compiler')), file=sys.stderr)"
    )
    argv = [sys.executable, "-c", code]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    loaded = set(ast.literal_eval(proc.stderr.strip().splitlines()[-1]))
    assert "compiler.controlplane.status_table" in loaded  # the module that prints the table
    heavy = {"compiler.pipeline", "compiler.plan", "compiler.parse", "compiler.controlplane.pusher"}
    assert not loaded & heavy, sorted(loaded & heavy)
