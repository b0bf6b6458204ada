"""`python -m agnostos` runs the `agnostos` command."""

import sys

from agnostos.cli import main

sys.exit(main())
