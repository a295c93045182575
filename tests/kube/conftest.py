"""Kubernetes tests: the helpers beside them are importable (as in tests/controlplane)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
