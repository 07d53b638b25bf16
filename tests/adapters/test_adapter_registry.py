"""Every family module in moe_fast/adapters is registered without a list to edit: the adapters
package imports its modules and keeps each class that names model_types."""

from __future__ import annotations

import importlib
from pathlib import Path

import moe_fast.adapters as adapters
from moe_fast.adapters import ADAPTERS, MoEAdapter, get_adapter

from helpers.tiny_models import FAMILIES, ROUTING_FAMILIES, tiny_config


def test_every_adapter_module_is_registered_once():
    modules = sorted(p.stem for p in Path(adapters.__file__).parent.glob("*.py") if p.stem != "__init__")
    expected = []
    for name in modules:
        module = importlib.import_module(f"moe_fast.adapters.{name}")
        expected += [obj for obj in vars(module).values()
                     if isinstance(obj, type) and issubclass(obj, MoEAdapter) and obj.model_types and obj.__module__ == module.__name__]
    assert sorted(c.__name__ for c in ADAPTERS) == sorted(c.__name__ for c in expected)
    assert len(set(ADAPTERS)) == len(ADAPTERS)
    types = [t for c in ADAPTERS for t in c.model_types]
    assert len(types) == len(set(types)), "two adapters claim the same model_type"


def test_every_tested_family_resolves_to_its_adapter():
    for family in list(FAMILIES) + list(ROUTING_FAMILIES):
        config = tiny_config(family)
        assert config.model_type in get_adapter(config).model_types
