"""The built-in tasks as lm-eval task files: one jsonl of items and one YAML per task.

Why files: lm-evaluation-harness registers tasks from YAML configs found on an include path,
and its ``json`` dataset builder reads local jsonl files offline. The files are written once per
Python installation (the items depend on its standard library) into a cache folder, each moved
in whole, and reused while they match; :func:`task_folder` is the include path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from moe_fast.data.builtin import stdlib_dir
from moe_fast.evaluation.tasks.items import _SALT, TASKS, task_items

CACHE_ENV = "MOE_FAST_CACHE"


def _yaml(task: str, data_file: str) -> str:
    """The lm-eval config: a 4-way multiple choice over the jsonl's ``context`` / ``choices`` / ``gold``.

    ``target_delimiter`` is empty: a choice continues the context exactly (a next line follows
    the context's newline; lm-eval moves that trailing whitespace into the continuation).
    """
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(data_file)}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _cache_root() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "moe_fast")
    return os.path.join(base, "lm_eval_tasks")


def _write_whole(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def task_folder() -> str:
    """The folder of the built-in tasks' YAML and jsonl files (written when missing or stale)."""
    key = hashlib.sha256(f"{_SALT}:{sys.version}:{stdlib_dir()}".encode()).hexdigest()[:16]
    folder = os.path.join(_cache_root(), key)
    os.makedirs(folder, exist_ok=True)
    for task in TASKS:
        data = os.path.join(folder, f"{task}.jsonl")
        config = os.path.join(folder, f"{task}.yaml")
        if not os.path.exists(data):
            _write_whole(data, "".join(json.dumps(item.to_json()) + "\n" for item in task_items(task)))
        want = _yaml(task, data)
        if not os.path.exists(config) or open(config, encoding="utf-8").read() != want:
            _write_whole(config, want)
    return folder
