"""The stock-megatron fix for TE's empty grouped extra state (megatron/stock_fixes.py), on a stand-in class: CPU has
no TE, so megatron-core's real TEGroupedLinear is exercised by tests/ops/test_gpu_checkpoint_and_error.py."""

import pytest
import torch

from fp8flow_megatron.megatron import stock_fixes


class _StockGroupedLinear:
    """Stands in for megatron-core 0.16.1's TEGroupedLinear: decoding an empty state yields None, then indexing fails."""

    num_gemms = 3

    def _split_extra_state(self, state):
        decoded = None if state.numel() == 0 else {"extra_fp8_variables": {"n": int(state.numel())}}
        return [{"extra_fp8_variables": decoded["extra_fp8_variables"]}] * self.num_gemms


@pytest.fixture
def stand_in(monkeypatch):
    from megatron.core.extensions import transformer_engine as mcore_te

    cls = type("TEGroupedLinear", (_StockGroupedLinear,), {})
    monkeypatch.setattr(mcore_te, "TEGroupedLinear", cls, raising=False)
    return cls


def test_stock_split_fails_on_an_empty_state_without_the_fix(stand_in):
    with pytest.raises(TypeError, match="NoneType"):
        stand_in()._split_extra_state(torch.empty(0, dtype=torch.uint8))


def test_the_fix_replicates_an_empty_state_and_leaves_real_state_to_megatron(stand_in):
    assert stock_fixes.install_grouped_extra_state_fix()
    layer = stand_in()
    empty = torch.empty(0, dtype=torch.uint8)
    assert all(s is empty for s in layer._split_extra_state(empty)) and len(layer._split_extra_state(empty)) == 3
    assert layer._split_extra_state(torch.ones(5, dtype=torch.uint8))[0] == {"extra_fp8_variables": {"n": 5}}
    patched = stand_in._split_extra_state
    assert stock_fixes.install_grouped_extra_state_fix()  # idempotent: not wrapped twice
    assert stand_in._split_extra_state is patched


def test_without_te_there_is_nothing_to_fix(monkeypatch):
    from megatron.core.extensions import transformer_engine as mcore_te

    monkeypatch.setattr(mcore_te, "TEGroupedLinear", type("TEGroupedLinear", (), {}), raising=False)
    assert not stock_fixes.install_grouped_extra_state_fix()
