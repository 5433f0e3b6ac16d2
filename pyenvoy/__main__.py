"""``python -m pyenvoy``: the same entry point as the ``pyenvoy`` console script."""

import sys

from pyenvoy.cli import main

if __name__ == "__main__":
    sys.exit(main())
