"""Benchmark helpers, run as subprocesses by ``bench/sidecar.py`` (not a test, not imported by meshc).

``python bench/_load.py upstream NAME``  a raw uvloop HTTP/1.1 app answering a 1 KiB body with its
                                         name; prints ``{"port": N}`` once listening.
``python bench/_load.py rate ...``       a constant-rate client: request i is *scheduled* at
                                         t0 + i/rate and its latency is measured from that time, so
                                         a stalled server is charged for the queue it causes
                                         (no coordinated omission). Prints JSON percentiles.
``python bench/_load.py closed ...``     closed-loop saturation client (fallback when wrk is absent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

BODY_SIZE = 1024


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


# --- upstream app --------------------------------------------------------------------------------


class _App(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15 :].split(b"\r\n", 1)[0])
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            out.append(self.response)
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def _upstream(name: str, port: int) -> None:
    body = (name.encode() + b" " + b"x" * BODY_SIZE)[:BODY_SIZE]
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _App(response), "127.0.0.1", port, backlog=1024)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


# --- clients -------------------------------------------------------------------------------------


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    length = int(lower[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
    if length:
        await reader.readexactly(length)
    return status


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values.sort()
    n = len(values)

    def q(p: float) -> float:
        return values[min(n - 1, int(p * n))] * 1000.0

    return {"p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": values[-1] * 1000.0}


async def _rate(
    host: str, port: int, target: str, hosthdr: str, rate: float, duration: float, conns: int
) -> dict[str, Any]:
    request = f"GET {target} HTTP/1.1\r\nHost: {hosthdr}\r\nUser-Agent: meshc-bench\r\n\r\n".encode()
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}

    async def worker() -> None:
        nonlocal errors
        conn = await _open(host, port)
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                conn[1].close()
                return
            try:
                status = await asyncio.wait_for(_one(conn[0], conn[1], request), 30.0)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200:
                    errors += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                errors += 1
                conn[1].close()
                conn = await _open(host, port)
            latencies.append(time.perf_counter() - scheduled)

    workers = [asyncio.ensure_future(worker()) for _ in range(conns)]
    total = int(rate * duration)
    # perf_counter, not loop.time(): uvloop's clock only has millisecond resolution.
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(at)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), 120.0)
    return {"requests": total, "errors": errors, "statuses": statuses, **_percentiles(latencies)}


async def _closed(
    host: str, port: int, target: str, hosthdr: str, duration: float, conns: int
) -> dict[str, Any]:
    request = f"GET {target} HTTP/1.1\r\nHost: {hosthdr}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    done = 0

    async def worker() -> None:
        nonlocal done
        reader, writer = await _open(host, port)
        while loop.time() < end:
            await _one(reader, writer, request)
            done += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return {"requests": done, "rps": done / duration}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("name")
    up.add_argument("--port", type=int, default=0)
    up.add_argument("--cpu", type=int)
    for name in ("rate", "closed"):
        c = sub.add_parser(name)
        c.add_argument("--connect", required=True, help="host:port to connect to")
        c.add_argument("--target", default="/", help="request target (absolute URI for a proxy)")
        c.add_argument("--host-header", default="bench")
        c.add_argument("--duration", type=float, default=10.0)
        c.add_argument("--conns", type=int, default=16)
        c.add_argument("--cpu", type=int)
        if name == "rate":
            c.add_argument("--rate", type=float, required=True)
    ns = p.parse_args(argv)
    _pin(ns.cpu)
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        if ns.cmd == "upstream":
            runner.run(_upstream(ns.name, ns.port))
            return 0
        host, _, port = ns.connect.rpartition(":")
        if ns.cmd == "rate":
            out = runner.run(
                _rate(host, int(port), ns.target, ns.host_header, ns.rate, ns.duration, ns.conns)
            )
        else:
            out = runner.run(_closed(host, int(port), ns.target, ns.host_header, ns.duration, ns.conns))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
