"""``python -m robustft ...``: see :mod:`robustft.cli`."""

import sys

from robustft.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
