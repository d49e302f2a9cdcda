"""``python -m preftune ...`` runs the command line, so launchers that take a module work:
``torchrun --nproc_per_node 8 -m preftune train cfg.yaml``."""

import sys

from preftune.cli import main

if __name__ == "__main__":
    sys.exit(main())
