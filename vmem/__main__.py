"""`python -m vmem` is the `vmem` command."""

import sys

from vmem.cli import main

sys.exit(main())
