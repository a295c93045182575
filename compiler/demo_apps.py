"""Stand-ins for the seed's apps (``python -m compiler.demo_apps NAME --port P``).

* ``benigno --version v1``: ``GET /hw2`` (and ``/``, ``/hello``) answers
  ``Hello World, Benigno: <datetime>``; ``--version v2`` is the canary and answers
  ``Hello World, Benigno, Canary Release: <datetime>``, as in the article.
* ``magnanimo``: ``GET /hw2`` calls ``http://benigno:5000/hw2`` through its sidecar (the
  ``HTTP_PROXY`` environment variable, as any client that honours it) and returns benigno's text;
  ``GET /hw1`` (and ``/``) answers ``Hello World, Magnanimo: <datetime>``.

Each has ``GET /health``; ``benigno --delay S`` answers after S seconds (a slow upstream) and
``benigno --status 503`` answers every hello with that status (a broken canary). The
datetime is Python's ``str(datetime.now())``, the article's format.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime

from aiohttp import ClientError, ClientSession, ClientTimeout, web

__all__ = ["benigno_app", "magnanimo_app", "main"]

BENIGNO_URL = "http://benigno:5000/hw2"


def benigno_app(version: str, delay_s: float = 0.0, status: int = 200) -> web.Application:
    canary = version != "v1"

    async def hello(_: web.Request) -> web.Response:
        if delay_s:
            await asyncio.sleep(delay_s)
        if status != 200:
            return web.Response(status=status, text=f"benigno {version}: failing with {status} (--status)")
        now = datetime.now()
        text = f"Hello World, Benigno, Canary Release: {now}" if canary else f"Hello World, Benigno: {now}"
        return web.Response(text=text)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text=f"ok benigno {version}")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/hello", hello)
    app.router.add_get("/hw2", hello)
    app.router.add_get("/health", health)
    return app


def magnanimo_app(upstream: str = BENIGNO_URL) -> web.Application:
    async def start(app: web.Application) -> None:
        # trust_env: the HTTP_PROXY environment variable routes the call through the sidecar.
        app["session"] = ClientSession(trust_env=True, timeout=ClientTimeout(total=10))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def hw1(_: web.Request) -> web.Response:
        return web.Response(text=f"Hello World, Magnanimo: {datetime.now()}")

    async def hw2(request: web.Request) -> web.Response:
        session: ClientSession = request.app["session"]
        try:
            async with session.get(upstream) as resp:
                body = await resp.read()
                return web.Response(
                    body=body, status=resp.status, content_type=resp.content_type or "text/plain"
                )
        except (ClientError, TimeoutError) as e:
            return web.Response(status=502, text=f"magnanimo: calling {upstream} failed: {e}")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok magnanimo")

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/", hw1)
    app.router.add_get("/hw1", hw1)
    app.router.add_get("/hw2", hw2)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.demo_apps", description=__doc__)
    p.add_argument("app", choices=("magnanimo", "benigno"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--version", default="v1", help="benigno's version tag (v1, or v2 for the canary)")
    p.add_argument(
        "--delay", type=float, default=0.0, help="benigno: answer after S seconds (bench/chaos.py)"
    )
    p.add_argument(
        "--status", type=int, default=200, help="benigno: answer every hello with this status (a bad canary)"
    )
    args = p.parse_args(argv)
    app = benigno_app(args.version, args.delay, args.status) if args.app == "benigno" else magnanimo_app()
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
