"""``python -m robustft ...``: see :mod:`robustft.cli`."""

from robustft.cli import main

if __name__ == "__main__":
    main()
