"""``python -m perft_qlora <command> [options]``: the ``perft-qlora`` console script (``commands.py``)."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
