"""Accuracy: the built-in multiple-choice tasks and running lm-evaluation-harness on a loaded model.

:mod:`.items` builds the tasks' questions from the standard library's test modules,
:mod:`.registry` writes them as lm-eval task files, :mod:`.harness` runs lm-eval on a model
moe_fast loaded (pruned, skipping), :mod:`.scorer` is the demo's fast scorer of the same items.
"""
