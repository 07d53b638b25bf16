"""Optional dependencies, one named extra per job, checked before the job starts.

The core install (``pip install moe_fast``) prunes, skips, patches and evaluates perplexity. A few
jobs need more: the demo draws a plot, `eval --tasks` runs lm-evaluation-harness, hub calibration
streams a Hugging Face dataset. Each such
package is declared in pyproject.toml under the extra named here, and the command that needs it
calls :func:`require` first, so that a missing package ends the run with one line saying what to
install instead of a traceback after minutes of work.
"""

from __future__ import annotations

import importlib

# extra name -> the modules it provides (import names, not distribution names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("matplotlib",),
    "eval": ("lm_eval", "accelerate"),
    "hub": ("datasets",),
}


class MissingExtra(ImportError):
    """A job needs an optional package that is not installed."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(sorted(EXTRAS))}")
    missing = []
    for name in EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require(extra: str, job: str) -> None:
    """Raise :class:`MissingExtra` naming the install command when ``extra`` is incomplete."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(
            f"{job} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'moe_fast[{extra}]'"
        )
