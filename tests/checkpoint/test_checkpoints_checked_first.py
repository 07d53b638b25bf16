"""MXFP4 pairs and expert tensors are checked before the first forward, by prune, skip and eval
(issue 25): a bad pair in the last layer is named with its file and layer before any search, and
a checkpoint whose experts would not load (so transformers would initialise them randomly) is
refused instead of scored."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_fast
import moe_fast.pruning.pipeline as pipeline
from moe_fast.cli import main
from helpers.checkpoints import save_checkpoint
from helpers.mxfp4_checkpoint import mxfp4_state_dict, tiny_gpt_oss, write_mxfp4_checkpoint
from helpers.tiny_models import VOCAB, tiny_mixtral, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAST = "model.layers.1.mlp.experts"  # the tiny gpt-oss has two layers: the last one is found last


def _drop_scales(state):
    state.pop(f"{LAST}.down_proj_scales")


def _short_scales(state):
    key = f"{LAST}.gate_up_proj_scales"
    state[key] = state[key][:, :-1].contiguous()


def _int8_blocks(state):
    key = f"{LAST}.down_proj_blocks"
    state[key] = state[key].to(torch.int8)


CORRUPTIONS = {
    "missing scales": (_drop_scales, "down_proj_scales is missing"),
    "short scales": (_short_scales, "gate_up_proj_scales has shape"),
    "int8 blocks": (_int8_blocks, "down_proj_blocks is I8, expected U8"),
}


def _corrupt(tmp_path, name: str) -> tuple[str, str]:
    edit, phrase = CORRUPTIONS[name]
    state = mxfp4_state_dict(tiny_gpt_oss())
    edit(state)
    path = write_mxfp4_checkpoint(tmp_path / "bad", state=state)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path, phrase


def _ids_file(tmp_path) -> str:
    torch.save(torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7)), tmp_path / "ids.pt")
    return str(tmp_path / "ids.pt")


def _one_line(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_prune_names_file_and_layer_before_the_first_forward(tmp_path, monkeypatch, name) -> None:
    path, phrase = _corrupt(tmp_path, name)

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the checkpoint was checked")

    monkeypatch.setattr(pipeline, "HiddenStates", no_forward)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        moe_fast.prune(path, _ids_file(tmp_path), 5, out=out, batch_size=4, progress=False, return_model=False)
    message = str(caught.value)
    assert phrase in message and "model-00001.safetensors" in message and "layer 1" in message
    assert not [e for e in os.listdir(tmp_path) if "out" in e]  # no partial folder: refused before the lock


@pytest.mark.parametrize("command", ["prune", "skip", "eval"])
def test_commands_refuse_a_bad_pair_in_one_line(tmp_path, capsys, command) -> None:
    path, phrase = _corrupt(tmp_path, "short scales")
    ids, out = _ids_file(tmp_path), str(tmp_path / "out")
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 90}" for i in range(400)))
    argv = {"prune": ["prune", path, "--keep", "5", "--calib", ids, "--out", out, "--no-progress"],
            "skip": ["skip", path, "--calib", ids, "--out", out, "--no-progress"],
            "eval": ["eval", path, "--data", str(tmp_path / "text.txt"), "--prompts", "0", "--seq-len", "16", "--json", out]}[command]
    line = _one_line(main(argv), capsys.readouterr().err)
    assert phrase in line and "model-00001.safetensors" in line and "layer 1" in line
    assert not os.path.exists(out)


def test_eval_refuses_mxfp4_experts_without_their_quantization_config(tmp_path, capsys) -> None:
    path = write_mxfp4_checkpoint(tmp_path / "src")
    tiny_tokenizer(VOCAB).save_pretrained(path)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 90}" for i in range(400)))
    rc = main(["eval", path, "--data", str(tmp_path / "text.txt"), "--prompts", "0", "--seq-len", "16"])
    line = _one_line(rc, capsys.readouterr().err)
    assert "MXFP4-packed" in line and "mlp.experts.down_proj_blocks" in line and "quantization_config" in line


def test_eval_refuses_a_checkpoint_whose_expert_tensor_is_missing(tmp_path, capsys) -> None:
    # Not MXFP4: a plain checkpoint that lost one expert tensor loads in transformers with random experts.
    path = save_checkpoint(tiny_mixtral(3, layers=2), tmp_path / "src", tokenizer=tiny_tokenizer(), shard=None)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    lost = [k for k in state if "layers.1." in k and ".experts." in k and ("down_proj" in k or ".w2." in k)]
    assert lost  # transformers may save the fused tensor or Mixtral's per-expert w2s
    for key in lost:
        del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 120}" for i in range(400)))
    capsys.readouterr()  # the save's progress bar
    rc = main(["eval", path, "--data", str(tmp_path / "text.txt"), "--prompts", "0", "--seq-len", "16"])
    line = _one_line(rc, capsys.readouterr().err)
    assert "model.layers.1.mlp.experts" in line and "randomly" in line
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts"):
        moe_fast.from_pretrained(path)
