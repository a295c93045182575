"""An API client for the cluster meshc runs in (in-cluster config) or for a given URL (tests)."""

from __future__ import annotations

from kubernetes_asyncio import client, config

__all__ = ["api_client"]


async def api_client(host: str | None = None, token: str | None = None) -> client.ApiClient:
    """In-cluster when ``host`` is None (service-account token and CA from the pod)."""
    conf = client.Configuration()
    if host is None:
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call, unused-ignore]
    else:
        conf.host = host
        if token:
            conf.api_key = {"authorization": token}
            conf.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(conf)
