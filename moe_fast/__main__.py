"""``python -m moe_fast ...`` is the ``moe-fast`` command."""

import sys

from moe_fast.cli import main

sys.exit(main())
