"""lm-evaluation-harness on a model moe_fast loaded: pruned and skipping models judged as they run.

Why not stock ``lm_eval --model hf``: it loads a checkpoint with plain transformers, so a
skipping checkpoint silently runs without skipping. Here lm-eval's own ``HFLM`` wraps the
model object moe_fast loaded (patched when it skips), and its ``simple_evaluate`` does the rest,
so the numbers are lm-eval's, comparable with published ones.

Nothing is downloaded: lm-eval runs with ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set.
:func:`prepare` resolves the task names and loads every task's data before any model is
loaded, so a missing task or data set is one clear error, not a traceback after minutes.
lm-eval is an optional dependency (``pip install moe_fast[eval]``; ``scripts/install.sh``
installs it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from moe_fast.evaluation.measures import SkipCounter
from moe_fast.host.extras import require
from moe_fast.evaluation.tasks.registry import task_folder

log = logging.getLogger(__name__)

OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def require_lm_eval() -> None:
    """One clear error when lm-eval (or the ``accelerate`` its HF backend needs) is not installed."""
    require("eval", "moe-fast eval --tasks (lm-evaluation-harness)")


def go_offline() -> None:
    """Datasets and the hub read only their local caches, also when they were imported before."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    try:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def parse_limit(text: str | None) -> int | float | None:
    """``--limit``: a count of items per task (integer >= 1) or a fraction of each task in (0, 1)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--limit {text!r}: give a number of items (>= 1) or a fraction in (0, 1)") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise ValueError(f"--limit {text!r}: give a number of items (>= 1) or a fraction in (0, 1)")


@dataclass
class Prepared:
    """Task names checked against lm-eval's index, with their data loaded (offline)."""

    tasks: list[str]
    include_paths: list[str]
    manager: Any = field(repr=False)


def prepare(tasks: list[str], include_paths: list[str] | None = None) -> Prepared:
    """Checks ``tasks`` exist and their data are local; raises ValueError naming the first problem.

    ``include_paths``: folders of the user's lm-eval task YAMLs; the built-in tasks' folder is
    always included.
    """
    require_lm_eval()
    go_offline()
    if not tasks or any(not t.strip() for t in tasks):
        raise ValueError("--tasks: give task names separated by commas, e.g. moe_fast_next_line,moe_fast_docstring")
    for path in include_paths or []:
        if not os.path.isdir(path):
            raise ValueError(f"--include-path {path!r} is not a directory of lm-eval task YAMLs")
    paths = [task_folder(), *(include_paths or [])]
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=paths, include_defaults=False)  # indexing lm-eval's own tasks takes ~30 s
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = [t for t in manager.all_tasks if name.lower() in t.lower()][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"--tasks: unknown lm-eval task {name!r} (built-in: moe_fast_next_line, "
                             f"moe_fast_docstring; or give --include-path DIR of task YAMLs){hint}")
    for name in tasks:
        try:
            manager.load([name])
        except Exception as err:  # datasets raises several types for a missing offline dataset
            cause = " ".join(str(err).split())[:200] or type(err).__name__
            raise ValueError(
                f"--tasks: the data of {name!r} are not available offline ({cause}); moe-fast never downloads: "
                f"fetch them once with network, e.g. python -c \"from lm_eval.tasks import TaskManager; "
                f"TaskManager().load(['{name}'])\", then rerun"
            ) from None
    return Prepared(list(tasks), paths, manager)


def _quiet_lm_eval() -> None:
    if not log.isEnabledFor(logging.DEBUG):
        for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_tasks(model, tokenizer, prepared: Prepared, *, num_fewshot: int | None = None, limit: int | float | None = None,
              batch_size: int = 8, measure_skips: bool = False, log_samples: bool = False, seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` on the loaded ``model``; its results dict, plus ``moe_fast`` facts.

    With ``measure_skips`` the skipped routing slots are counted while lm-eval runs (the
    ``skip_rate`` in ``results["moe_fast"]``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    counter = SkipCounter(model) if measure_skips else None
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=prepared.tasks, num_fewshot=num_fewshot, limit=limit, task_manager=prepared.manager,
            log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=0 if limit is not None and limit < 2 else 100000,
        )
    finally:
        if counter is not None:
            counter.remove()
    results["moe_fast"] = {"skip_rate": counter.rate if counter is not None else None,
                           "include_paths": prepared.include_paths}
    return results


def metric_rows(results: dict) -> list[dict]:
    """[{task, metric, value, stderr, n}] from lm-eval's results (its ``"acc,none"`` keys split)."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"task": task, "metric": name if filt in ("", "none") else f"{name} ({filt})",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                         "n": n})
    return rows


def metric_table(rows: list[dict], skip_rate: float | None = None) -> str:
    """The rows as aligned text: task, metric, value, stderr."""
    lines = [("task", "metric", "value", "stderr", "items")]
    lines += [(r["task"], r["metric"], f"{r['value']:.4f}", "-" if r["stderr"] is None else f"{r['stderr']:.4f}",
               "-" if r["n"] is None else str(r["n"])) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    if skip_rate is not None:
        out.append(f"skip rate (2nd+ slots) while scoring: {skip_rate:.1%}")
    return "\n".join(out)


def serializable(results: dict) -> dict:
    """lm-eval's results made JSON-safe with its own converter (numpy values, functions in configs)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))
