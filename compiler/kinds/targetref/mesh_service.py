"""MeshService: a service as Kuma's targetRef policies name it (ports, and which proxies run it).

The selector picks the proxies by `dataplaneTags`, `dataplaneRef` or `dataplaneLabels` (one of
them). Kuma limits the name to 63 characters. meshc's catalog kind for services is `Service`; a
MeshService is validated and does not declare a service yet.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshService
    metadata: {name: benigno, labels: {kuma.io/mesh: default}}
    spec:
      selector: {dataplaneTags: {kuma.io/service: benigno}}
      ports: [{port: 5000, targetPort: 5000, appProtocol: http}]

Invalid (two selectors)::

    selector: {dataplaneTags: {app: benigno}, dataplaneRef: {name: dp-1}}
"""

from __future__ import annotations

from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import I32, Found, IntOrString, KStr, kind_def


class DataplaneRef(Spec):
    name: KStr = ""


class LabelSelector(Spec):
    match_labels: dict[str, KStr] | None = None


class Selector(Spec):
    dataplane_tags: dict[str, KStr] | None = None
    dataplane_ref: DataplaneRef | None = None
    dataplane_labels: LabelSelector | None = None


class Port(Spec):
    name: KStr | None = None
    port: I32 = 0
    target_port: IntOrString | None = None
    """The port (or its name) on the proxies' applications."""
    app_protocol: KStr = ""
    """``tcp`` (default), ``http``, ``http2``, ``grpc``..."""


class Identity(Spec):
    type: KStr = ""
    """``ServiceTag`` or ``SpiffeID``."""
    value: KStr = ""


class MeshServiceSpec(Spec):
    state: KStr = ""
    """``Available`` or ``Unavailable`` (set by the control plane)."""
    selector: Selector | None = None
    ports: list[Port] | None = None
    identities: list[Identity] | None = None


def check(spec: MeshServiceSpec) -> Found:
    s = spec.selector or Selector()
    if sum(x is not None for x in (s.dataplane_tags, s.dataplane_ref, s.dataplane_labels)) > 1:
        yield ("selector",), "must specify only one of: dataplaneTags, dataplaneRef, or dataplaneLabels"


KIND = kind_def("MeshService", MeshServiceSpec, check, __doc__ or "", max_name_length=63)
