"""``moe-fast`` command line: one subcommand per module in :mod:`moe_fast.commands`.

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func(args) -> int`` as the parser default. Expected failures (bad input, a missing or
unwritable path, a full disk, a busy output, a missing optional package) end with one line naming the path and the cause,
exit status 2; log lines are written through tqdm so that they do not break progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

import moe_fast.commands
from moe_fast.host.extras import MissingExtra
from moe_fast.models import quiet_loading
from moe_fast.checkpoint.staging import FolderBusy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-fast",
        description="Expert pruning and dynamic expert skipping for MoE LLMs.",
        epilog=f"Built-in models (every command accepts them as MODEL): {moe_fast.commands.builtin_models_text()}. "
        f"Built-in corpora (for --calib and --data): {moe_fast.commands.builtin_corpora_text()}.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(moe_fast.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"moe_fast.commands.{info.name}")
        module.register(sub)
    return parser


def error_line(err: BaseException) -> str:
    """One line for an expected failure: ``PATH: cause`` for file-system errors, else the message."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        with logging_redirect_tqdm(), quiet_loading():
            return int(args.func(args) or 0)
    except (ValueError, OSError, FolderBusy, MissingExtra) as err:
        print(f"moe-fast {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> None:
    """The process entry point (``moe-fast``, ``python -m moe_fast``, ``python -m moe_fast.cli``).

    Under torchrun the process ends with ``os._exit`` once its output is flushed: after a run that
    finished on every rank, Gloo's threads can still abort a rank during interpreter teardown
    ("terminate called without an active exception", no Python frame left), and torchrun then
    reports the whole run as failed and kills the other ranks.
    """
    rc = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
