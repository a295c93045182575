"""The policy kinds meshc knows: an explicit registry, one module per kind (no discovery magic).

Every stage asks the registry, never a table of its own: ``parse`` validates with ``spec`` and
``check``, ``resolve`` indexes the ``compiled`` kinds by ``direction`` and converts with
``to_conf``, ``build`` writes each one's rule list under ``bundle_field`` (closed by ``default``),
``docgen``/``schemagen`` document ``doc`` and ``spec``.

To add a kind: write ``compiler/kinds/<kind>.py`` with a ``KIND = KindDef(...)`` (see
``compiler.kinds.base.KindDef``: only ``kind, api_version, spec, check, direction, doc`` are
required; a kind with no ``bundle_field`` is validated and documented but compiles to nothing),
import it here and add it to ``REGISTRY`` (the order is the order of ``docs/policies.md``).
A legacy ``sources``/``destinations`` policy uses ``base.SelectorSpec`` and ``base.selector_kind``.
A compiled kind gets a golden case in ``tests/compiler/kinds/cases/<Kind>.yaml``.
"""

from __future__ import annotations

from compiler.kinds import (
    canary,
    circuit_breaker,
    fault_injection,
    health_check,
    mesh,
    mesh_gateway,
    mesh_gateway_route,
    rate_limit,
    retry,
    service,
    timeout,
    traffic_log,
    traffic_permission,
    traffic_route,
)
from compiler.kinds.base import ConfContext, KindDef
from compiler.kinds.targetref import KINDS as TARGETREF_KINDS

__all__ = ["REGISTRY", "ConfContext", "KindDef"]

REGISTRY: dict[str, KindDef] = {
    k.kind: k
    for k in (
        mesh.KIND,
        service.KIND,
        traffic_route.KIND,
        traffic_permission.KIND,
        health_check.KIND,
        circuit_breaker.KIND,
        retry.KIND,
        timeout.KIND,
        fault_injection.KIND,
        rate_limit.KIND,
        traffic_log.KIND,
        mesh_gateway.KIND,
        mesh_gateway_route.KIND,
        canary.KIND,
        *TARGETREF_KINDS,
    )
}
