"""`python -m minichat.cli`: the same as the `minichat` command (how the bench and tests start workers)."""

import sys

from minichat.cli import main

sys.exit(main())
