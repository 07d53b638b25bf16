"""Subcommands of ``moe-fast``; each module defines ``register(subparsers)``."""
