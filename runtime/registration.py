"""The data plane's control-plane client: register, heartbeat, deregister (DESIGN §5).

``POST {URL}/api/v1/register`` (``Registration`` -> ``RegistrationReply``), then every
``heartbeat_interval_ms`` ``POST /api/v1/heartbeat`` (``Heartbeat``); a 404 on a heartbeat means
the control plane forgot the instance, so it registers again. ``POST /api/v1/deregister``
``{"instance": ...}`` on a clean exit, after draining. A control plane that is down or answers
errors is retried with capped, jittered exponential backoff; the data plane keeps serving its
last-known-good state meanwhile.

Several control planes (replicas sharing one store) may be given, comma-separated: the data plane
talks to one at a time, and when it cannot be reached (refused, timed out within a heartbeat
interval, or a 5xx) moves to the next at once and registers there, so a replica that dies costs
at most one heartbeat interval; it cycles through the list with backoff only when none answers.

Register, heartbeats, certificate renewal (``POST /api/v1/certificate``) and deregister are
authenticated
(DESIGN §6) by ``auth(path, body, use_token)``: the current certificate's proof, or the bootstrap
token the first time and whenever the control plane refused the certificate (401/403).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections.abc import Callable

from runtime._http import post
from runtime.pieces import split_lines
from runtime.protocol import (
    CertificateReply,
    CertificateRequest,
    Heartbeat,
    PieceRequest,
    Registration,
    RegistrationReply,
)

__all__ = ["Registrar"]

_MAX_BACKOFF_S = 30.0


class Registrar:
    def __init__(
        self,
        url: str | list[str],
        registration: Callable[[], Registration],
        heartbeat: Callable[[str], Heartbeat],
        on_registered: Callable[[RegistrationReply], None] | None = None,
        auth: Callable[[str, bytes, bool], dict[str, str]] | None = None,
    ) -> None:
        urls = [u for part in ([url] if isinstance(url, str) else url) for u in part.split(",")]
        self.urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.urls:
            raise ValueError("no control plane URL")
        self._current = 0
        self.switches = 0
        """How many times this data plane moved to another control plane."""
        self._registration = registration
        self._heartbeat = heartbeat
        self._on_registered = on_registered
        self.instance: str | None = None
        self.reply: RegistrationReply | None = None
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._auth = auth
        self._use_token = False
        self._interval_s: float | None = None

    @property
    def url(self) -> str:
        """The control plane this data plane talks to now."""
        return self.urls[self._current]

    def _next_url(self, why: str) -> bool:
        """Move to the next control plane; False when the whole list was tried since the last
        answer (back off then)."""
        if len(self.urls) == 1:
            return False
        old = self.url
        self._current = (self._current + 1) % len(self.urls)
        self.switches += 1
        self._tried += 1
        print(f"meshc: control plane {old}: {why}; trying {self.url}", file=sys.stderr, flush=True)
        return self._tried < len(self.urls)

    _tried = 0

    def _timeout(self) -> float:
        """Within a heartbeat interval once registered (a stopped replica must not hold a data
        plane for longer), at least 1 s and at most 5 s."""
        if self._interval_s is None or len(self.urls) == 1:
            return 5.0
        return min(5.0, max(1.0, self._interval_s))

    def start(self) -> None:
        self._started = True
        self._task = asyncio.ensure_future(self._run())

    async def _post(self, path: str, body: bytes, authenticate: bool = False) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if authenticate and self._auth is not None:
            headers.update(self._auth(path, body, self._use_token))
        status, data = await post(self.url, path, body, headers, timeout=self._timeout())
        if status == 200:
            self._tried = 0
        if authenticate and status in (401, 403):
            # The certificate was refused (a new CA, an expired certificate): the token next time.
            self._use_token = not self._use_token
        elif authenticate and status == 200:
            self._use_token = False
        return status, data

    async def _register(self) -> tuple[int, bytes]:
        """One registration. A control plane from before ``pieces_formats`` refuses the field
        (400, extra_forbidden): the same registration goes again without it, as data planes
        from before sent it, and that control plane serves the format it makes (which this
        data plane runs too). Tried with the field every time: an upgraded control plane hears it."""
        reg = self._registration()
        status, body = await self._post("/api/v1/register", reg.model_dump_json().encode(), True)
        if (
            status == 400
            and reg.pieces_formats is not None
            and b"pieces_formats" in body
            and b"extra_forbidden" in body
        ):
            print(
                f"meshc: control plane {self.url} does not know pieces_formats; registering without it",
                file=sys.stderr,
                flush=True,
            )
            plain = reg.model_copy(update={"pieces_formats": None})
            status, body = await self._post("/api/v1/register", plain.model_dump_json().encode(), True)
        return status, body

    async def fetch_pieces(self, digests: list[str]) -> list[bytes]:
        """Pieces of the running manifest by digest (on demand); OSError when refused."""
        if self.instance is None or not self._started:
            raise OSError("not registered with the control plane yet")
        body = PieceRequest(instance=self.instance, digests=digests).model_dump_json().encode()
        status, data = await self._post("/api/v1/pieces", body, authenticate=True)
        if status != 200:
            raise OSError(f"pieces answered {status}: {data[:200]!r}")
        return split_lines(data)

    async def fetch_endpoints(self, services: list[str]) -> None:
        """Have these services' endpoints pushed (on demand): returns once the control plane saw
        the ACK of the push that carries them; OSError when it did not."""
        if self.instance is None or not self._started:
            raise OSError("not registered with the control plane yet")
        body = PieceRequest(instance=self.instance, digests=[], endpoints=services).model_dump_json().encode()
        status, data = await self._post("/api/v1/pieces", body, authenticate=True)
        if status != 200:
            raise OSError(f"endpoints answered {status}: {data[:200]!r}")

    async def renew(self, csr_pem: str) -> CertificateReply | None:
        """A new certificate for ``csr_pem``; None when the control plane forgot this instance
        (the registration loop then registers again, which issues one)."""
        if self.instance is None or not self._started:
            return None
        body = CertificateRequest(instance=self.instance, csr_pem=csr_pem).model_dump_json().encode()
        status, data = await self._post("/api/v1/certificate", body, authenticate=True)
        if status == 404:
            return None  # the next heartbeat gets a 404 too and registers again
        if status != 200:
            raise OSError(f"certificate renewal answered {status}: {data[:200]!r}")
        return CertificateReply.model_validate_json(data)

    async def _run(self) -> None:
        backoff = 0.25
        while True:
            try:
                if self.reply is None:
                    status, body = await self._register()
                    if status != 200:
                        raise OSError(f"register answered {status}: {body[:200]!r}")
                    self.reply = RegistrationReply.model_validate_json(body)
                    self.instance = self.reply.instance
                    self._interval_s = self.reply.heartbeat_interval_ms / 1000.0
                    if self._on_registered is not None:
                        self._on_registered(self.reply)
                    backoff = 0.25
                await asyncio.sleep(self.reply.heartbeat_interval_ms / 1000.0)
                try:
                    status, body = await self._post(
                        "/api/v1/heartbeat",
                        self._heartbeat(self.reply.instance).model_dump_json().encode(),
                        True,
                    )
                except (OSError, TimeoutError) as e:
                    if not self._next_url(f"heartbeat failed ({e or type(e).__name__})"):
                        raise
                    self.reply = None  # the next replica does not know us: register there now
                    continue
                if status in (401, 403, 404):
                    # Forgotten (or another boot on record), or our certificate was refused:
                    # register again (with the token after a refusal, see _post).
                    self.reply = None
                elif status != 200:
                    raise OSError(f"heartbeat answered {status}")
                backoff = 0.25
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ValueError) as e:
                if self._next_url(str(e) or type(e).__name__):
                    self.reply = None  # register with the next one
                    continue
                self._tried = 0
                print(f"meshc: control plane {self.url}: {e}; retrying", file=sys.stderr, flush=True)
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, self._max_backoff())

    def _max_backoff(self) -> float:
        """30 s before the first registration; after it, two heartbeat intervals (at least 1 s),
        so that a restarted control plane learns the live set within a few intervals instead of
        pushing stale endpoint sets for up to the full backoff (docs/security.md)."""
        if self._interval_s is None:
            return _MAX_BACKOFF_S
        return min(_MAX_BACKOFF_S, max(1.0, 2 * self._interval_s))

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if deregister and self.instance is not None:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                async with asyncio.timeout(2.0):
                    await self._post(
                        "/api/v1/deregister", json.dumps({"instance": self.instance}).encode(), True
                    )
        self._started = False
