"""Access logs: JSON lines to the file a TrafficLog backend names (both forwarding layers).

Files are opened on first use and kept open, line-buffered; a file that cannot be opened is
skipped (logging never fails a request). tcp backends are not written yet.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from runtime.bundle import TrafficLogConf

__all__ = ["AccessLog", "app_entry"]


class AccessLog:
    def __init__(self) -> None:
        self._files: dict[str, IO[str]] = {}

    def write(self, conf: TrafficLogConf, entry: dict[str, Any]) -> None:
        backend = conf.backend
        if backend.type != "file" or not backend.path:
            return
        f = self._files.get(backend.path)
        if f is None:
            try:
                f = self._files[backend.path] = open(backend.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            except OSError:
                return
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def app_entry(
    source: str,
    service: str,
    app: str,
    method: str,
    path: str,
    status: int,
    elapsed: float,
    trace_id: str,
) -> dict[str, Any]:
    """The line of an inbound request to the local app (Kuma's inbound MeshAccessLog), with the
    fields an outbound line has: the caller as source, this service as destination, the app's
    address as upstream."""
    return {
        "time": time.time(),
        "direction": "inbound",
        "source_service": source,
        "destination_service": service,
        "destination_subset": "",
        "upstream": app,
        "method": method,
        "path": path,
        "response_code": status,
        "duration_ms": round(elapsed * 1000.0, 3),
        "trace_id": trace_id,
    }
