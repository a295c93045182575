"""``python -m runtime.gateway ARGS``: the same as ``meshc gateway ARGS``."""

import sys

from runtime.cli import gateway_main

if __name__ == "__main__":
    sys.exit(gateway_main(sys.argv[1:]))
