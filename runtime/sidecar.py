"""``python -m runtime.sidecar ARGS``: the same as ``meshc sidecar ARGS``."""

import sys

from runtime.cli import sidecar_main

if __name__ == "__main__":
    sys.exit(sidecar_main(sys.argv[1:]))
