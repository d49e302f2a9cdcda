"""``python -m preftune.report``: the same as ``preftune report``."""

import sys

from .cli import main

sys.exit(main())
