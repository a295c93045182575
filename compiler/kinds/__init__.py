"""The policy kinds meshc knows: an explicit registry, one module per kind (no discovery magic)."""

from __future__ import annotations

from compiler.kinds import (
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
from compiler.kinds._base import KindDef
from compiler.kinds.targetref import KINDS as TARGETREF_KINDS

__all__ = ["REGISTRY", "KindDef"]

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
        *TARGETREF_KINDS,
    )
}
