"""``python -m medsight.demo OUT_DIR [--size tiny] [--seed 0]``."""

import sys

from .build import main

sys.exit(main())
