"""The end of a pruning benchmark: its JSON record and the check that every method chose the same experts."""

from __future__ import annotations

import argparse
import json
import sys


def finish(args: argparse.Namespace, rows: list[dict]) -> None:
    """Writes {"args", "rows"} to ``args.json`` when given; exits non-zero when a row's methods
    selected different experts (a faster method that chooses otherwise is no result)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    if not all(r["same_selection"] for r in rows):
        sys.exit("selections differ")
