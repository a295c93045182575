"""Compiler tests share strategies across modules (``test_convert`` reuses ``test_properties``'
generated legacy repos): their directory is importable, as in the other test directories."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
