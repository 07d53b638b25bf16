"""One measurement in a fresh process, for the benchmarks that report peak resident memory.

Why a process each: VmHWM is per process, so a run in its own process reports its own peak and
not that of what ran before it. The child prints its result as JSON on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_json_child(script: str, *args: str) -> dict:
    """Runs ``python script args`` and returns the JSON on the last line of its output."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
