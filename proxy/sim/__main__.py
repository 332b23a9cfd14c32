"""`python -m proxy.sim`: the simulated upstream's command line."""

import sys

from .cli import main

sys.exit(main())
