"""The pieces around the per-layer phases of ``prune()``: settings, calibration batches, the
partial folder (lock and resume), the export through a staged directory, the report, timings."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moe_fast.pruning.calibration_batches import check_same_on_all_ranks, load_batches, needs_tokenizer
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.memory import Timings
from moe_fast.pruning.output import export_pruned, verify_export
from moe_fast.pruning.progress import PARTIAL_SUFFIX, Progress, check_out, claimed, naming_errors, partial_folder
from moe_fast.pruning.report import REPORT_NAME, LayerResult, PruneReport, loss_key
from moe_fast.pruning.settings import SearchSpec, check_arguments, run_settings
from moe_fast.checkpoint.staging import LOCK_NAME
from helpers.tiny_models import tiny_mixtral


class _Adapter:
    num_experts, top_k = 8, 2


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [(("blockwise", "paper", 8), "mode must be"), (("layerwise", "l1", 8), "objective must be"), (("layerwise", "paper", 0), "batch_size")],
)
def test_check_arguments_refuses_bad_choices(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_arguments(*args)


def test_search_spec_resolves_the_search_and_the_rank_bound() -> None:
    spec = SearchSpec.build(_Adapter(), 6, "auto", 4, "paper", None)
    assert (spec.method, spec.num_drop, spec.rank_bound, spec.lazy) == ("exhaustive", 2, 4, False)
    assert SearchSpec.build(_Adapter(), 6, "greedy", 4, "paper", None).lazy  # lazy by default for greedy
    assert not SearchSpec.build(_Adapter(), 6, "greedy", 4, "paper", False).lazy
    assert SearchSpec.build(_Adapter(), 6, "exhaustive", 4, "paper", True).lazy
    for num_keep in (1, 8):
        with pytest.raises(ValueError, match=r"top-k \(2\) <= keep < number of experts \(8\)"):
            SearchSpec.build(_Adapter(), num_keep, "auto", 4, "paper", None)


def test_run_settings_keep_the_report_keys_in_order() -> None:
    class Source:
        config = type("C", (), {"model_type": "mixtral"})()
        dtype = torch.bfloat16

    spec = SearchSpec.build(_Adapter(), 5, "beam", 3, "mse", None)
    settings = run_settings(spec, "progressive", Source(), {"n_samples": 2})
    assert list(settings) == ["keep", "num_experts", "top_k", "mode", "objective", "search", "beam_width", "rank_bound",
                              "lazy", "recompute_outputs", "model_type", "dtype", "calibration"]
    assert (settings["keep"], settings["rank_bound"], settings["beam_width"], settings["dtype"]) == (5, 5, 3, "bfloat16")


# --- calibration batches -----------------------------------------------------------------------


def test_load_batches_describes_the_tokens() -> None:
    ids = torch.randint(0, 100, (10, 7), generator=torch.Generator().manual_seed(0))
    calib = load_batches(ids, None, None, None, 4, 42)
    assert calib.num_batches == 3 and calib.num_tokens == 70
    assert torch.equal(calib.batch(2), ids[8:])
    assert list(calib.summary) == ["spec", "n_samples", "seq_len", "batch_size", "seed", "fingerprint"]
    assert calib.summary["spec"] == "tensor" and calib.summary["n_samples"] == 10
    assert not needs_tokenizer(ids) and not needs_tokenizer("x/ids.PT") and needs_tokenizer("builtin:python-prose")


def test_ranks_with_other_tokens_are_refused() -> None:
    calib = load_batches(torch.zeros(2, 3, dtype=torch.long), None, None, None, 1, 0)

    class TwoRanks(Dist):
        def gather(self, obj) -> list:
            return [obj, "another fingerprint"]

    check_same_on_all_ranks(Dist(), calib)
    with pytest.raises(ValueError, match="different calibration tokens"):
        check_same_on_all_ranks(TwoRanks(2, 0), calib)


# --- the partial folder: lock and resume --------------------------------------------------------


def _settings() -> dict:
    return {"keep": 6, "calibration": {"fingerprint": "abc"}}


def _layer() -> LayerResult:
    return LayerResult([0, 1, 2], [3], {"3": 0.5}, "exhaustive", search_state_bytes=10)


def test_progress_without_resume_starts_empty_and_keeps_its_lock(tmp_path) -> None:
    out = str(tmp_path / "out")
    progress = Progress.claim(out)
    try:
        folder = partial_folder(out)
        assert folder == out + PARTIAL_SUFFIX
        open(os.path.join(folder, "stale.bin"), "w").close()
        os.mkdir(os.path.join(folder, "export"))
        assert progress.start(_settings(), resume=False) == {}
        assert sorted(os.listdir(folder)) == sorted([LOCK_NAME, "progress.json"])
        assert json.load(open(os.path.join(folder, "progress.json"))) == {"settings": _settings(), "layers": {}, "states_next_layer": 0}
    finally:
        progress.release(finished=True)
    assert not os.path.exists(out + PARTIAL_SUFFIX)


def test_progress_resumes_the_saved_layers_under_the_same_settings(tmp_path) -> None:
    out = str(tmp_path / "out")
    first = Progress.claim(out)
    first.start(_settings(), resume=False)
    first.save(_settings(), PruneReport(layers={0: _layer()}))
    first.release(finished=False)  # an interrupted run: the progress stays
    again = Progress.claim(out)
    try:
        assert again.start(_settings(), resume=True) == {0: _layer()}
        with pytest.raises(ValueError, match="other settings"):
            again.start({**_settings(), "keep": 5}, resume=True)
    finally:
        again.release(finished=False)


def test_progress_without_a_folder_saves_nothing(tmp_path) -> None:
    progress = Progress()
    assert progress.start(_settings(), resume=True) == {}
    progress.save(_settings(), PruneReport(layers={0: _layer()}))
    progress.release(finished=True)


def test_claimed_removes_the_folder_on_success_and_keeps_progress_on_error(tmp_path) -> None:
    out = str(tmp_path / "out")
    with claimed(out, Dist()) as progress:
        progress.start(_settings(), resume=False)
    assert not os.path.exists(out + PARTIAL_SUFFIX)
    with pytest.raises(KeyboardInterrupt):
        with claimed(out, Dist()) as progress:
            progress.start(_settings(), resume=False)
            raise KeyboardInterrupt
    assert os.listdir(out + PARTIAL_SUFFIX) == ["progress.json"]  # lock gone, progress kept
    with claimed(None, Dist()) as progress:
        assert progress.folder is None


def test_a_non_empty_out_is_refused_before_the_lock(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_out(str(out))  # empty: fine
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        with claimed(str(out), Dist()):
            pass
    assert not os.path.exists(str(out) + PARTIAL_SUFFIX)


def test_naming_errors_gives_a_nameless_os_error_the_path() -> None:
    with pytest.raises(OSError) as info:
        with naming_errors("/some/file"):
            raise OSError(28, "No space left on device")
    assert info.value.filename == "/some/file" and info.value.errno == 28
    with pytest.raises(OSError) as info:
        with naming_errors("/some/file"):
            raise OSError(13, "Permission denied", "/other")
    assert info.value.filename == "/other"


# --- export -------------------------------------------------------------------------------------


def _report() -> PruneReport:
    return PruneReport(layers={0: _layer()}, settings={"objective": "paper", "mode": "layerwise", "search": "exhaustive", "calibration": {}})


def test_export_moves_a_verified_checkpoint_with_its_report(tmp_path) -> None:
    out = str(tmp_path / "out")
    clock = Timings("calibration")
    export_pruned(out, _report(), clock, torch.device("cpu"), lambda d: tiny_mixtral(0, layers=1).save_pretrained(d))
    assert os.path.isfile(os.path.join(out, "config.json"))
    saved = json.load(open(os.path.join(out, REPORT_NAME)))
    assert list(saved["timings"]) == ["calibration", "export", "total"]
    assert saved["settings"]["peak_memory_kind"] == "cpu_max_rss" and saved["peak_memory_bytes"] > 0
    assert os.listdir(tmp_path) == ["out"]  # no stage left beside it


def test_a_failed_export_leaves_neither_out_nor_a_stage(tmp_path) -> None:
    out = str(tmp_path / "out")

    def no_weights(directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write("{}")

    with pytest.raises(OSError, match="no weights|model.safetensors"):
        export_pruned(out, _report(), Timings(), torch.device("cpu"), no_weights)
    assert os.listdir(tmp_path) == []


def test_verify_export_wants_the_report(tmp_path) -> None:
    tiny_mixtral(0, layers=1).save_pretrained(tmp_path)
    with pytest.raises(OSError, match="missing from the export"):
        verify_export(str(tmp_path))
    _report().save(str(tmp_path / REPORT_NAME))
    verify_export(str(tmp_path))


# --- report and timings -------------------------------------------------------------------------


def test_report_pieces() -> None:
    assert loss_key((1, 5)) == "1,5" and loss_key(()) == ""
    assert _layer().lazy_note() == ""
    lazy = LayerResult([0], [1], {}, "beam", expert_outputs_per_token=2.5, scored_exactly=12)
    assert lazy.lazy_note() == "; 2.50 expert outputs/token, 12 scored exactly"
    lazy.discarded_by_bound = 3
    assert lazy.lazy_note().endswith(", 3 discarded by bound")
    record = _report().pruning_record()
    assert list(record) == ["kept_experts", "objective", "mode", "search", "calibration"]
    assert record["kept_experts"] == {"0": [0, 1, 2]}


def test_timings_keep_the_phase_order_and_add_up() -> None:
    clock = Timings("calibration", "forward", "search")
    for _ in range(2):
        with clock.measure("search"):
            pass
    clock.mark("calibration")
    with clock.measure("export"):
        pass
    clock.mark("total")
    assert list(clock.seconds) == ["calibration", "forward", "search", "export", "total"]
    assert clock.seconds["forward"] == 0.0 and clock.seconds["total"] >= clock.seconds["calibration"] > 0
