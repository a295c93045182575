"""Registration on Kubernetes: the identity is the pod's, proven by TokenReview, never the request's.

A sidecar bootstraps with its projected service-account token (audience ``meshc``). The API
server's TokenReview says whose it is (``system:serviceaccount:<ns>:<sa>``) and which pod holds
it (``authentication.kubernetes.io/pod-name``); the pod, read from the API, gives its labels. The
registration is accepted only for a mesh service whose Kubernetes Service selects that pod, with
tags that are the pod's labels: a pod cannot claim another service or a canary's ``version``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from compiler.controlplane.security import AuthError
from compiler.kube.derive import SERVICE_LABEL, service_name
from runtime.protocol import Registration

__all__ = ["KubeAuthError", "PodIdentity", "TokenReviewer"]

POD_NAME = "authentication.kubernetes.io/pod-name"
_SA_PREFIX = "system:serviceaccount:"


KubeAuthError = AuthError
"""The registration path's own refusal (status and reason), so ``api.register`` answers it alike."""


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    service_account: str
    pod: str
    labels: dict[str, str]
    services: tuple[str, ...]
    """The mesh services (Kuma names) whose Kubernetes Services select the pod."""


class TokenReviewer:
    """``authorize(token, registration)``: the pod's identity, or ``KubeAuthError``.

    ``services`` returns the Kubernetes Services (as JSON) of a namespace, e.g. from the
    discovery's Service cache.
    """

    def __init__(
        self,
        api: client.ApiClient,
        services: Callable[[str], Iterable[dict[str, Any]]],
        audience: str = "meshc",
    ) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._core = client.CoreV1Api(api)
        self._services = services
        self.audience = audience

    async def review(self, token: str) -> PodIdentity:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            review = await self._auth.create_token_review(body)
        except ApiException as e:
            raise KubeAuthError(503, f"TokenReview failed: HTTP {e.status}") from None
        st = review.status
        if st is None or not st.authenticated or st.user is None:
            raise KubeAuthError(
                403, "the service-account token is not valid for audience " + repr(self.audience)
            )
        if self.audience not in (st.audiences or []):
            raise KubeAuthError(403, f"the token's audiences do not include {self.audience!r}")
        username = st.user.username or ""
        if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
            raise KubeAuthError(403, "the token is not a service account's")
        ns, sa = username[len(_SA_PREFIX) :].split(":")
        pods = (st.user.extra or {}).get(POD_NAME) or []
        if len(pods) != 1:
            raise KubeAuthError(403, "the token is not bound to a pod (use a projected token)")
        try:
            resp: Any = await self._core.read_namespaced_pod(pods[0], ns, _preload_content=False)
            data = await resp.json()
        except ApiException as e:
            raise KubeAuthError(
                403 if e.status == 404 else 503, f"pod {ns}/{pods[0]}: HTTP {e.status}"
            ) from None
        if (data.get("spec") or {}).get("serviceAccountName", "default") != sa:
            raise KubeAuthError(403, f"pod {ns}/{pods[0]} does not run as service account {sa!r}")
        labels = {str(k): str(v) for k, v in ((data.get("metadata") or {}).get("labels") or {}).items()}
        names = []
        for svc in self._services(ns):
            sel = (svc.get("spec") or {}).get("selector") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                for p in (svc.get("spec") or {}).get("ports") or []:
                    names.append(service_name(svc["metadata"]["name"], ns, int(p["port"])))
        return PodIdentity(ns, sa, pods[0], labels, tuple(sorted(names)))

    async def authorize(self, token: str, reg: Registration) -> PodIdentity:
        """A sidecar is the mesh service of a Service that selects its pod; a gateway is named
        by its pod's ``kuma.io/service`` label (a MeshGateway is no Kubernetes Service, and the
        gateway's own LoadBalancer Service is not a mesh service), as Kuma's gateway pods are."""
        ident = await self.review(token)
        if reg.kind == "gateway":
            if ident.labels.get(SERVICE_LABEL) != reg.service:
                raise KubeAuthError(
                    403,
                    f"pod {ident.namespace}/{ident.pod} has no label {SERVICE_LABEL}={reg.service} "
                    "(a gateway is named by that label of its pod)",
                )
        elif reg.service not in ident.services:
            known = ", ".join(ident.services) or "none"
            raise KubeAuthError(
                403,
                f"pod {ident.namespace}/{ident.pod} is not selected by service {reg.service!r} "
                f"(it is: {known})",
            )
        for k, v in reg.tags.items():
            if ident.labels.get(k) != v:
                raise KubeAuthError(403, f"tag {k}={v} is not a label of pod {ident.namespace}/{ident.pod}")
        return ident
