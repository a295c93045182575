"""List + watch of one resource, as client-go's Reflector does it.

List, remember the list's ``resourceVersion``, watch from it; each event moves the version on.
When a watch ends (the server's timeout), watch again from the last version seen. When the
server says that version is gone (410 ``Expired``: etcd compacted it), list again: the cache is
replaced by what the list returns, and ``on_change`` runs once for the whole list.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

__all__ = ["Gone", "ListWatch"]

log = logging.getLogger("meshc.kube")
Key = tuple[str, str]


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


class ListWatch:
    """A cache of one resource kind kept current from the API server.

    ``list_fn`` is a ``kubernetes_asyncio`` list method (e.g. ``DiscoveryV1Api.list_endpoint_slice_
    for_all_namespaces``); objects are kept as the JSON the server sent, keyed by namespace/name.
    """

    def __init__(
        self,
        list_fn: Callable[..., Awaitable[Any]],
        on_change: Callable[[], None] = lambda: None,
        *,
        watch_timeout_s: int = 300,
        retry_s: float = 1.0,
    ) -> None:
        self._list_fn = list_fn
        self._on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self.items: dict[Key, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """Forever (until cancelled): list, then watch and rewatch, relisting on 410."""
        while True:
            try:
                await self.list()
                while True:
                    await self.watch_once()
            except Gone:
                log.info("watch resourceVersion %s expired; relisting", self.resource_version)
            except (TimeoutError, ApiException, OSError, ValueError) as e:
                log.warning("list/watch failed (%s); retrying in %.1fs", e, self.retry_s)
                await asyncio.sleep(self.retry_s)

    async def list(self) -> None:
        resp = await self._list_fn(_preload_content=False)
        try:
            body = json.loads(await resp.read())
        finally:
            resp.release()
        items = {}
        for obj in body.get("items") or []:
            items[_key(obj)] = obj
        self.items = items
        self.resource_version = body["metadata"]["resourceVersion"]
        self.lists += 1
        self.synced.set()
        self._on_change()

    async def watch_once(self) -> None:
        """One watch request, from the current resourceVersion, until the server ends it."""
        self.watches += 1
        resp = await self._list_fn(
            watch=True,
            resource_version=self.resource_version,
            timeout_seconds=self.watch_timeout_s,
            allow_watch_bookmarks=True,
            _preload_content=False,
        )
        try:
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if line.strip():
                    self._event(json.loads(line))
        finally:
            resp.release()

    def _event(self, ev: dict[str, Any]) -> None:
        typ, obj = ev.get("type"), ev.get("object") or {}
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "gone"))
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if typ in ("ADDED", "MODIFIED"):
            self.items[_key(obj)] = obj
        elif typ == "DELETED":
            self.items.pop(_key(obj), None)
        elif typ != "BOOKMARK":
            return
        if rv:
            self.resource_version = rv
        if typ != "BOOKMARK":
            self._on_change()


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))
