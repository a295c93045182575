"""What the atheris harnesses share (issue 17 #2): the repository on ``sys.path``, a corpus
directory seeded with known-good inputs, and libFuzzer's run.

Each harness (``atheris_h1.py``, ``atheris_h2.py``, ``atheris_yaml.py``) is coverage-guided:
atheris instruments ``runtime`` and ``compiler`` as they are imported, libFuzzer mutates the
seeds, and any exception other than the refusal each parser documents is a crash (libFuzzer
writes the input to ``-artifact_prefix`` and exits non-zero). Bounded runs: pass libFuzzer's
``-runs=N`` or ``-max_total_time=S``; ``bench/fuzz.py --atheris`` runs all three. atheris is the
optional extra ``fuzz`` (``pip install -e '.[fuzz]'``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(one_input: Callable[[bytes], None], seeds: Iterable[bytes], argv: list[str] | None = None) -> None:
    """libFuzzer's main loop over ``one_input``: the corpus is the directories given on the
    command line, else a fresh one with ``seeds`` in it."""
    import atheris

    args = list(sys.argv if argv is None else argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="meshc-atheris-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, one_input)
    atheris.Fuzz()
