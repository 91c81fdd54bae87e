"""The registry of adapter kinds (``mlora.adapters.kinds``) and the kind folders agree.

A kind is a folder ``mlora/adapters/KIND/`` whose ``kind.py`` builds its ``KIND``; the registry
names each once. These tests keep the two equal, and check that the registry answers every
``routing_strategy`` the config accepts and every ``peft_type`` a kind writes with one kind.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mlora.adapters.kinds import KINDS, kind_for_peft_type
from mlora.config.schema import MOE_STRATEGY_DEFAULTS

ADAPTERS = Path(__file__).resolve().parents[1] / "mlora" / "adapters"


def test_every_kind_folder_is_registered_once_and_nothing_else_is() -> None:
    folders = sorted(p.parent.name for p in ADAPTERS.glob("*/kind.py"))
    from_folders = [importlib.import_module(f"mlora.adapters.{f}.kind").KIND for f in folders]
    assert len(KINDS) == len({id(k) for k in KINDS})  # no kind listed twice
    assert {id(k) for k in from_folders} == {id(k) for k in KINDS}


def test_each_kind_folder_holds_its_format_and_spec() -> None:
    for folder in (p.parent for p in ADAPTERS.glob("*/kind.py")):
        assert (folder / "format.py").is_file(), folder.name
        assert (folder / "spec.py").is_file(), folder.name


def test_each_config_strategy_selects_exactly_one_kind() -> None:
    """Unset (plain LoRA) and every ``routing_strategy`` value the config accepts."""
    for strategy in (None, *MOE_STRATEGY_DEFAULTS):
        owners = [k.name for k in KINDS if strategy in k.routing_strategies]
        assert len(owners) == 1, (strategy, owners)
    claimed = [s for k in KINDS for s in k.routing_strategies]
    assert set(claimed) == {None, *MOE_STRATEGY_DEFAULTS}  # no kind claims an unknown value


def test_each_peft_type_reads_back_as_the_kind_that_writes_it() -> None:
    peft_types = [t for k in KINDS for t in k.peft_types]
    assert len(peft_types) == len(set(peft_types))
    for kind in KINDS:
        for peft_type in kind.peft_types:
            assert kind_for_peft_type(peft_type) is kind
