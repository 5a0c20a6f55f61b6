"""`python -m normlab.cli ...`: the `normlab` command (as benchmarks and scripts call it)."""

import sys

from normlab.cli import main

sys.exit(main())
