"""``python -m moe_fast ...`` is the ``moe-fast`` command."""

from moe_fast.cli import run

run()
