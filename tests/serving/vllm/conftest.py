"""tests/serving/vllm: moe_fast's checkpoints served by vLLM (run by scripts/check_vllm.sh in its own environment).

Without an importable ``vllm`` (the project's main environment) every test here is reported as
skipped; with ``MOE_FAST_REQUIRE_VLLM=1`` (set by check_vllm.sh) that is an error instead, so that a
broken vLLM install cannot pass the check by skipping. Test modules here must not import vllm at
module level: vLLM runs in child processes (tests/serving/vllm/engine.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import engine` from the tests here


def _vllm_problem() -> str | None:
    """None when vllm imports, else why not (one line)."""
    # This folder is on sys.path as a namespace package named "vllm": only a real one counts.
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return "vllm is not installed (scripts/check_vllm.sh runs these tests in an environment with it)"
    try:
        importlib.import_module("vllm")  # the engine itself is imported by the child processes
    except Exception as err:  # a broken install (e.g. torchvision built for CUDA torch)
        return f"vllm does not import: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


VLLM_PROBLEM = _vllm_problem()
if VLLM_PROBLEM is not None and os.environ.get("MOE_FAST_REQUIRE_VLLM") == "1":
    raise pytest.UsageError(f"tests/serving/vllm: MOE_FAST_REQUIRE_VLLM=1 but {VLLM_PROBLEM}")


def pytest_collection_modifyitems(config, items) -> None:
    if VLLM_PROBLEM is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    mark = pytest.mark.skip(reason=VLLM_PROBLEM)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(mark)


def pytest_terminal_summary(terminalreporter) -> None:
    from gaps import GAPS, SKIP_GAPS, skip_table, table

    if GAPS:
        terminalreporter.section("vLLM vs transformers: max |log-prob difference| (nats)")
        for line in table():
            terminalreporter.write_line(line)
    if SKIP_GAPS:
        terminalreporter.section("skipping exports: |log-prob difference| (nats), max/q90 over positions")
        for line in skip_table():
            terminalreporter.write_line(line)
