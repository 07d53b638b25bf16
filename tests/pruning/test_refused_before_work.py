"""Bad inputs are refused before the first forward and before the lock folder exists (issue 25):
one line on stderr, exit status 2, nothing left beside --out."""

from __future__ import annotations

import os

import pytest
import torch

import moe_fast
import moe_fast.pruning.pipeline as pipeline
from moe_fast.cli import main
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, MAX_POSITIONS = 128, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Mixtral (vocab 128, max_position_embeddings 32) with a tokenizer, and good ids."""
    root = tmp_path_factory.mktemp("refusals")
    model = tiny_mixtral(3, layers=2, vocab=VOCAB)
    model.config.max_position_embeddings = MAX_POSITIONS
    src = save_checkpoint(model, root / "src", tokenizer=tiny_tokenizer(VOCAB), shard=None)
    (root / "words.txt").write_text(" ".join(f"w{i % 120}" for i in range(3000)))
    return src, root


def _ids_file(root, name: str, ids: torch.Tensor) -> str:
    path = str(root / name)
    torch.save(ids, path)
    return path


def _bad_calib(root, case: str) -> tuple[str, list[str], str]:
    """(calibration spec, extra flags, a phrase the error line must hold) of one refused input."""
    good = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    if case == "zero-byte .pt":
        (root / "empty.pt").write_bytes(b"")
        return str(root / "empty.pt"), [], "not token ids saved with torch.save"
    if case == "text .pt":
        (root / "text.pt").write_text("these are not pickled ids\n")
        return str(root / "text.pt"), [], "not token ids saved with torch.save"
    if case == "empty tensor":
        return _ids_file(root, "none.pt", torch.zeros(0, 16, dtype=torch.long)), [], "hold no tokens"
    if case == "id >= vocab":
        bad = good.clone()
        bad[2, 5] = VOCAB
        return _ids_file(root, "big.pt", bad), [], f"token id {VOCAB} (sample 2, position 5) is outside the model's vocabulary 0..{VOCAB - 1}"
    if case == "negative id":
        bad = good.clone()
        bad[1, 0] = -3
        return _ids_file(root, "neg.pt", bad), [], "token id -3 (sample 1, position 0)"
    if case == "ids longer than max positions":
        return _ids_file(root, "long.pt", torch.randint(0, VOCAB, (2, 40))), [], "longer than the model's max_position_embeddings (32)"
    if case == "--seq-len past max positions":
        return str(root / "words.txt"), ["--seq-len", "64", "--n-samples", "2"], "max_position_embeddings (32)"
    ok = _ids_file(root, "ok.pt", good)
    flags = {"--beam-width 0": (["--search", "beam", "--beam-width", "0"], "beam_width must be an integer >= 1, got 0"),
             "--chunk-tokens 0": (["--chunk-tokens", "0"], "chunk-tokens must be >= 1, got 0"),
             "--device tpu": (["--device", "tpu"], "'tpu'"),
             "--device cuda": (["--device", "cuda"], "cuda is not available"),
             "--device cuda:7": (["--device", "cuda:7"], "cuda")}[case]
    return ok, flags[0], flags[1]


PRUNE_CASES = ["zero-byte .pt", "text .pt", "empty tensor", "id >= vocab", "negative id", "ids longer than max positions",
               "--seq-len past max positions", "--beam-width 0", "--chunk-tokens 0", "--device tpu", "--device cuda"]


def _forbid_forward(monkeypatch) -> None:
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the input was refused")

    monkeypatch.setattr(pipeline, "HiddenStates", no_forward)


def _assert_refused(rc: int, err: str, phrase: str, out: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert phrase in lines[0] and "Traceback" not in err
    parent, name = os.path.split(out)
    assert [e for e in os.listdir(parent) if name in e] == []  # no out, no partial folder, no staging folder


@pytest.mark.parametrize("case", PRUNE_CASES)
def test_prune_refuses_before_the_lock_and_any_forward(model_dir, tmp_path, capsys, monkeypatch, case) -> None:
    if case == "--device cuda" and torch.cuda.is_available():
        case = "--device cuda:7" if torch.cuda.device_count() < 8 else "--device tpu"
    src, root = model_dir
    calib, flags, phrase = _bad_calib(root, case)
    out = str(tmp_path / "out")
    _forbid_forward(monkeypatch)
    rc = main(["prune", src, "--keep", "4", "--calib", calib, "--out", out, "--no-progress", *flags])
    _assert_refused(rc, capsys.readouterr().err, phrase, out)


@pytest.mark.parametrize("case", ["zero-byte .pt", "text .pt", "id >= vocab", "negative id", "ids longer than max positions",
                                  "--seq-len past max positions", "--device tpu"])
def test_skip_refuses_bad_calibration_and_devices(model_dir, tmp_path, capsys, case) -> None:
    src, root = model_dir
    calib, flags, phrase = _bad_calib(root, case)
    out = str(tmp_path / "out")
    rc = main(["skip", src, "--calib", calib, "--out", out, "--no-progress", *flags])
    _assert_refused(rc, capsys.readouterr().err, phrase, out)


def test_eval_refuses_a_device_it_does_not_have(model_dir, tmp_path, capsys) -> None:
    src, root = model_dir
    out = str(tmp_path / "result.json")
    rc = main(["eval", src, "--data", str(root / "words.txt"), "--device", "tpu", "--json", out, "--prompts", "0"])
    _assert_refused(rc, capsys.readouterr().err, "'tpu'", out)


def test_library_prune_refuses_bad_numbers_before_the_lock(model_dir, tmp_path) -> None:
    src, root = model_dir
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "out")
    for kwargs, phrase in (({"chunk_tokens": 0}, "chunk_tokens"), ({"beam_width": 0, "search": "beam"}, "beam_width"),
                           ({"device": "tpu"}, "tpu")):
        with pytest.raises(ValueError, match=phrase):
            moe_fast.prune(src, ids, 4, out=out, progress=False, return_model=False, **kwargs)
        assert os.listdir(tmp_path) == []


def test_text_calibration_defaults_to_the_model_s_max_positions(model_dir, tmp_path, caplog) -> None:
    # The default of 2048 tokens per sample is more than this model's 32 positions: it takes 32, and says so.
    src, root = model_dir
    _, report = moe_fast.prune(src, str(root / "words.txt"), 4, out=str(tmp_path / "out"), n_samples=4, batch_size=2,
                               progress=False, return_model=False)
    assert report.settings["calibration"]["seq_len"] == MAX_POSITIONS
    assert "max_position_embeddings" in caplog.text
