"""`python -m glm <subcommand>`: the same entry point as the `glm` script."""

import sys

from glm.cli import main

sys.exit(main())
