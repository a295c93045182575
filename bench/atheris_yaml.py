"""Coverage-guided fuzzing of the policy compiler with atheris: bytes in place of one policy
file of the seed (``policies/``, the first byte picks which), compiled with the others. The
compiler must answer with diagnostics (each with a line and a column), never an exception.
See ``bench/_atheris.py``.

    .venv/bin/python bench/atheris_yaml.py -runs=5000
"""

from __future__ import annotations

import _atheris
import atheris

with atheris.instrument_imports(include=["compiler"]):
    from compiler.pipeline import compile_sources
    from compiler.source import SourceFile, SourceSet, git_blob_id

SEED = {p.name: p.read_bytes() for p in sorted((_atheris.REPO / "policies").glob("*.yaml"))}
NAMES = sorted(SEED)


def one_input(data: bytes) -> None:
    if not data:
        return
    name = NAMES[data[0] % len(NAMES)]
    files = {**SEED, name: data[1:]}
    src = SourceSet(tuple(SourceFile(f"policies/{n}", d, git_blob_id(d)) for n, d in sorted(files.items())))
    result = compile_sources(src)
    for d in result.diagnostics:
        assert d.message and (d.span is None or (d.span.line >= 1 and d.span.column >= 1)), d


if __name__ == "__main__":
    _atheris.run(one_input, [bytes((i,)) + SEED[n] for i, n in enumerate(NAMES)])
