"""moe_fast's config.json entry: pruning and skipping each write their part and keep the other's."""

from __future__ import annotations

from types import SimpleNamespace

from moe_fast.checkpoint.config_record import (
    CONFIG_KEY, PRUNING_KEY, SKIPPING_KEY, has_record_entry, merged_record, record_entry, remove_record_entry,
    set_record_entry,
)


def test_each_part_keeps_the_other():
    config = SimpleNamespace()
    set_record_entry(config, PRUNING_KEY, {"keep": 4})
    set_record_entry(config, SKIPPING_KEY, {"betas": None})
    assert getattr(config, CONFIG_KEY) == {"pruning": {"keep": 4}, "skipping": {"betas": None}}
    assert record_entry(config, PRUNING_KEY) == {"keep": 4} and has_record_entry(config, SKIPPING_KEY)
    remove_record_entry(config, SKIPPING_KEY)
    assert getattr(config, CONFIG_KEY) == {"pruning": {"keep": 4}}
    remove_record_entry(config, PRUNING_KEY)
    assert not hasattr(config, CONFIG_KEY)  # nothing left: no empty entry in config.json
    assert record_entry(config, PRUNING_KEY) is None and not has_record_entry(config, PRUNING_KEY)


def test_merged_record_copies_and_ignores_a_malformed_entry():
    existing = {"pruning": 1}
    merged = merged_record(existing, SKIPPING_KEY, 2)
    assert merged == {"pruning": 1, "skipping": 2} and existing == {"pruning": 1}
    assert merged_record("garbage", PRUNING_KEY, 3) == {"pruning": 3}
