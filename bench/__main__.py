"""`python -m bench`: run the benchmark."""

import sys

from .cli import main

sys.exit(main())
