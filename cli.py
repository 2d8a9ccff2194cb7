"""utune_fx command line; see ``python cli.py --help`` and utune_fx/cli.py."""

import sys

from utune_fx.cli import main

if __name__ == "__main__":
    sys.exit(main())
