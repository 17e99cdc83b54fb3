"""`python -m chronomoe_v3.report report RUN_DIR` runs the `chronomoe-v3` command line."""

import sys

from .cli import main

sys.exit(main())
