"""``python -m moe_fast.data``: print the built-in corpora sizes for this Python."""

from moe_fast.data.builtin import main

main()
