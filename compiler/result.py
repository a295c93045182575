"""What a compile gives back: diagnostics, bundles and the release.

Its own module so that the consumers of a result (``output``, ``plan``, ``report``, the control
plane) need not import the orchestrator that makes one (``pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compiler.diagnostics import Diagnostic

__all__ = ["CompileResult"]


@dataclass
class CompileResult:
    diagnostics: list[Diagnostic]
    files: int
    documents: int
    bundles: dict[str, bytes] = field(default_factory=dict)
    """Bundle key (``<mesh>`` or ``<mesh>/<service>``) -> canonical JSON bytes."""
    release: dict[str, Any] = field(default_factory=dict)
    release_id: str = ""
    commit: str | None = None
    step_bundles: dict[str, bytes] = field(default_factory=dict)
    """Digest -> bytes of the Canary steps' bundles (``compiler.canary``), written beside the others."""

    @property
    def canaries(self) -> dict[str, Any]:
        """``<mesh>/<name>`` -> the Canary records of the release (empty without Canary policies)."""
        return dict(self.release.get("canaries", {}))

    @property
    def errors(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity == "warning")

    @property
    def digests(self) -> dict[str, str]:
        return dict(self.release.get("bundles", {}))
