"""The built-in tasks and `moe-fast eval --tasks` through lm-evaluation-harness, against a scorer written here.

lm-eval is the optional extra ``moe_fast[eval]``; scripts/install.sh installs it, so these tests
run in CI. They are skipped only where lm-eval is not installed at all.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_fast import cli
from moe_fast.models import SMALL_MIXTRAL_DIR
from moe_fast.evaluation.tasks.items import NUM_CHOICES, TASKS, task_items
from helpers.choice_scoring import accuracy, choice_loglikelihood

LIMIT = 24  # items per task in the lm-eval runs


@pytest.fixture(scope="module", autouse=True)
def task_cache(tmp_path_factory):
    """The generated task files go to a fresh folder, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE_FAST_CACHE", str(tmp_path_factory.mktemp("moe_fast_cache")))
    yield
    mp.undo()


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMALL_MIXTRAL_DIR)


def _tiny_model(seed: int = 0):
    """A tiny random Mixtral over the shipped model's tokenizer (so it reads the items' text)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        max_position_embeddings=1024, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def _independent(model, tokenizer, task: str, n: int) -> tuple[list[list[float]], float, float]:
    """(per-item choice log-likelihoods, acc, acc_norm) of the first ``n`` items."""
    return accuracy(model, tokenizer, task_items(task)[:n])


def test_builtin_tasks_come_from_the_test_modules():
    from moe_fast.data.builtin import get_corpus
    from moe_fast.evaluation.tasks import items as items_module

    code, prose = get_corpus("python-code"), get_corpus("python-prose")
    for task in TASKS:
        items = task_items(task)
        assert len(items) >= 1000
        assert len({i.id for i in items}) == len(items)
        golds = [i.gold for i in items]
        assert all(golds.count(g) > len(items) / 8 for g in range(NUM_CHOICES))  # the answer is not always first
        for item in items:
            assert len(item.choices) == NUM_CHOICES and len(set(item.choices)) == NUM_CHOICES
            true = item.choices[item.gold]
            if task == "moe_fast_next_line":  # the true line follows the context in a test module's source
                assert item.context + true in code.test
                indent = len(true) - len(true.lstrip())
                assert all(len(c) - len(c.lstrip()) == indent for c in item.choices)
            else:  # the paragraph is from a test module's docstring
                para = item.context[3:-4]
                assert para.splitlines()[0] in prose.test
    # deterministic: built again from scratch, the same items
    again = items_module.next_line_items.__wrapped__()
    assert again == task_items("moe_fast_next_line")


def test_lm_eval_accuracy_equals_an_independent_scorer():
    pytest.importorskip("lm_eval")
    from moe_fast.evaluation.tasks.harness import metric_rows, prepare, run_tasks
    from moe_fast.evaluation.tasks.scorer import accuracy as scorer_accuracy
    from moe_fast.evaluation.tasks.scorer import choice_loglikelihoods, encode

    model, tokenizer = _tiny_model(), _tokenizer()
    prepared = prepare(list(TASKS))
    results = run_tasks(model, tokenizer, prepared, limit=LIMIT, batch_size=5, log_samples=True)
    rows = {(r["task"], r["metric"]): r for r in metric_rows(results)}
    for task in TASKS:
        lls, acc, acc_norm = _independent(model, tokenizer, task, LIMIT)
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == [i.id for i in task_items(task)[:LIMIT]]
        for sample, want in zip(samples, lls):
            got = [float(r[0][0]) for r in sample["resps"]]
            assert got == pytest.approx(want, abs=2e-4)
        assert rows[(task, "acc")]["value"] == pytest.approx(acc)
        assert rows[(task, "acc_norm")]["value"] == pytest.approx(acc_norm)
        assert rows[(task, "acc")]["stderr"] == pytest.approx((acc * (1 - acc) / (LIMIT - 1)) ** 0.5)
        assert rows[(task, "acc")]["n"] == LIMIT
        # the demo's packed scorer (context once, choices side by side) gives the same log-likelihoods
        packed = choice_loglikelihoods(model, encode(tokenizer, list(task_items(task)[:LIMIT])), batch_tokens=700)
        assert packed.tolist() == [pytest.approx(x, abs=2e-4) for x in lls]
        assert scorer_accuracy(list(task_items(task)[:LIMIT]), packed)["acc"] == pytest.approx(acc)


def test_skipping_changes_what_lm_eval_sees():
    pytest.importorskip("lm_eval")
    from moe_fast.serving.patching import patch
    from moe_fast.evaluation.tasks.harness import prepare, run_tasks

    task, n = "moe_fast_next_line", 8
    model, tokenizer = _tiny_model(), _tokenizer()
    prepared = prepare([task])
    plain = run_tasks(model, tokenizer, prepared, limit=n, batch_size=4, log_samples=True)
    patch(model, betas=0.9)
    skipping = run_tasks(model, tokenizer, prepared, limit=n, batch_size=4, log_samples=True, measure_skips=True)
    assert plain["moe_fast"]["skip_rate"] is None and skipping["moe_fast"]["skip_rate"] > 0.3

    def lls(results):
        return [[float(r[0][0]) for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]

    assert max(abs(a - b) for x, y in zip(lls(plain), lls(skipping)) for a, b in zip(x, y)) > 1e-3
    want, _, _ = _independent(model, tokenizer, task, n)  # the patched model, scored here
    for got, ref in zip(lls(skipping), want):
        assert got == pytest.approx(ref, abs=2e-4)


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe-fast eval: error:"), err
    for needle in needles:
        assert needle in err, err


def test_cli_input_errors_come_before_any_model_load(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    import moe_fast.evaluation.measures

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(moe_fast.evaluation.measures, "load_model", no_load)
    model = "builtin:small-mixtral"
    _one_line_error(capsys, ["eval", model, "--tasks", "moe_fast_no_such_task"], "unknown lm-eval task", "moe_fast_no_such_task")
    for bad in ("0", "-3", "1.5", "ten"):
        _one_line_error(capsys, ["eval", model, "--tasks", "moe_fast_next_line", "--limit", bad], "--limit", bad)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(
        "task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'absent.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )
    _one_line_error(capsys, ["eval", model, "--tasks", "my_local_task", "--include-path", str(folder)],
                    "my_local_task", "not available offline")
    _one_line_error(capsys, ["eval", model, "--tasks", "moe_fast_next_line", "--include-path", str(tmp_path / "nope")],
                    "--include-path")
    _one_line_error(capsys, ["eval", model], "--data", "--tasks")


def test_cli_runs_a_local_task_and_writes_lm_evals_json(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"q": f"def f{i}(x):\n    return", "choices": [" x", " None"], "gold": 0}) + "\n"
                            for i in range(6)))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(
        f"task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "results.json"
    rc = cli.main(["eval", "builtin:small-mixtral", "--tasks", "my_local_task,moe_fast_docstring", "--limit", "6",
                   "--include-path", str(folder), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "my_local_task" in printed and "moe_fast_docstring" in printed and "acc_norm" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"my_local_task", "moe_fast_docstring"}
    assert res["n-samples"]["moe_fast_docstring"]["effective"] == 6
    model, tokenizer = _load_small()
    acc = sum(max(range(2), key=lambda j: (choice_loglikelihood(model, tokenizer, f"def f{i}(x):\n    return", [" x", " None"][j]), -j)) == 0
              for i in range(6)) / 6
    assert res["results"]["my_local_task"]["acc,none"] == pytest.approx(acc)
    assert {r["task"] for r in res["moe_fast"]["metrics"]} == {"my_local_task", "moe_fast_docstring"}


def _load_small():
    from moe_fast.evaluation.measures import load_model

    model, tokenizer, _ = load_model("builtin:small-mixtral")
    return model, tokenizer
