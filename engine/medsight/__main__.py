"""`python -m medsight`: the `medsight` command (for a Python whose scripts folder is not on PATH, e.g. Slicer's)."""

import sys

from medsight.cli import main

if __name__ == "__main__":
    sys.exit(main())
