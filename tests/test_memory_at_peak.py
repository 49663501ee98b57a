"""scripts/memory_at_peak.py on hand-built snapshots (the format of torch.cuda.memory._snapshot()): the window's peak,
what is alive there, and where each block was allocated."""

import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "memory_at_peak", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "memory_at_peak.py"
)
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)


def _frames(*names):
    return [{"filename": f"/site/{n.split(':')[0]}", "line": 7, "name": n.split(":")[1]} for n in names]


W = _frames("torch/nn/functional.py:linear", "fp8flow_megatron/ops/experts.py:forward", "megatron/core/x.py:fwd")
ACT = _frames("torch/_tensor.py:mul", "megatron/core/transformer/mlp.py:forward")
TMP = _frames("transformer_engine/pytorch/module/linear.py:backward")


def _snapshot(live, events):
    # a block's "size" is rounded up; the trace's events and "requested_size" are what was asked for
    blocks = [{"address": a, "size": -(-s // 512) * 512, "requested_size": s, "state": "active_allocated", "frames": f}
              for a, s, f in live]  # fmt: skip
    blocks.append({"address": 999, "size": 64, "state": "inactive"})  # a cached free block: not allocated
    return {"segments": [{"device": 0, "blocks": blocks}], "device_traces": [events]}


def _ev(action, addr, size, frames=None):
    return {"action": action, "addr": addr, "size": size, "frames": frames or []}


def test_the_peak_is_found_inside_the_window_and_its_blocks_are_attributed():
    # before the window: a (100, weights) alive; b (50) alive, freed in the window
    # events: alloc c 300 (act) -> alloc d 200 (tmp) [peak 650] -> free d -> free b -> alloc e 20
    events = [
        _ev("alloc", 3, 300, ACT),
        _ev("segment_alloc", 0, 4096),
        _ev("alloc", 4, 200, TMP),
        _ev("free_requested", 4, 200),
        _ev("free_completed", 4, 200, TMP),
        _ev("free_completed", 2, 50),
        _ev("alloc", 5, 20, ACT),
    ]
    snap = _snapshot([(1, 100, W), (3, 300, ACT), (5, 20, ACT)], events)
    peak, live, end, n = mp.peak_state(snap)
    assert (peak, end, n) == (650, 420, 7)
    assert sorted(live) == [1, 2, 3, 4]
    sites = mp.by_site(live)
    assert sites == {
        "fp8flow_megatron/ops/experts.py:7 forward": (100, 1),
        "megatron/core/transformer/mlp.py:7 forward": (300, 1),
        "transformer_engine/pytorch/module/linear.py:7 backward": (200, 1),
        mp.BEFORE_WINDOW: (50, 1),
    }


def test_no_events_the_snapshot_state_is_the_peak():
    peak, live, end, n = mp.peak_state(_snapshot([(1, 100, W)], []))
    assert (peak, end, n, sorted(live)) == (100, 100, 0, [1])


def test_an_address_reused_pairs_each_free_with_its_own_alloc():
    events = [_ev("alloc", 7, 10, ACT), _ev("free_completed", 7, 10), _ev("alloc", 7, 40, TMP),
              _ev("free_completed", 7, 40), _ev("alloc", 8, 5, W)]  # fmt: skip
    peak, live, _, _ = mp.peak_state(_snapshot([(8, 5, W)], events))
    assert peak == 40 and mp.by_site(live) == {"transformer_engine/pytorch/module/linear.py:7 backward": (40, 1)}


def test_report_lines_up_sites_and_orders_by_difference():
    a = _snapshot([(1, 10**9, ACT)], [])
    b = _snapshot([(1, 10**9, ACT), (2, 3 * 10**9, W)], [])
    table = mp.report([a, b], ["bf16", "fp8flow"], top=5)
    rows = table.splitlines()
    assert rows[0] == "| allocation site | bf16 GB | fp8flow GB |"
    assert rows[2].startswith("| fp8flow_megatron/ops/experts.py:7 forward | 0.000 | 3.000 |")
    assert rows[3].startswith("| megatron/core/transformer/mlp.py:7 forward | 1.000 | 1.000 |")
    assert "| **total at the window's peak** | **1.000** | **4.000** |" in table


def test_frame_site_is_the_innermost_frame_of_this_package_megatron_or_te():
    frames = _frames("torch/t.py:e", "transformer_engine/a.py:f", "megatron/core/b.py:g", "fp8flow_megatron/c.py:h")
    assert mp.frame_site(frames) == "transformer_engine/a.py:7 f"
    assert mp.frame_site(frames[2:]) == "megatron/core/b.py:7 g"
    assert mp.frame_site(frames[3:]) == "fp8flow_megatron/c.py:7 h"  # not "megatron/c.py"
    assert mp.frame_site(_frames("torch/x.py:y")) == "x.py:7 y"
    assert mp.frame_site(None) == "(no stack recorded)"


def test_label_count_must_match(tmp_path):
    with pytest.raises(SystemExit):
        mp.main([str(tmp_path / "a.pickle"), "--label", "x", "--label", "y"])


def test_requested_sizes_add_up_and_a_stackless_alloc_in_the_window_is_not_before_it():
    # live block B (100 requested, a 512-byte block); A (1000, no stack: autograd's C++ side) allocated and freed
    # in the window before B: the peak is A's 1000 alone, and A is "(no stack recorded)", not "before the window"
    events = [_ev("alloc", 1, 1000, []), _ev("free_completed", 1, 1000), _ev("alloc", 2, 100, ACT)]
    peak, live, end, _ = mp.peak_state(_snapshot([(2, 100, ACT)], events))
    assert (peak, end) == (1000, 100)
    sites = mp.by_site(live)
    assert sites == {"(no stack recorded)": (1000, 1)}
    assert sum(b for b, _ in sites.values()) == peak


def test_a_cpp_only_stack_is_named_by_its_autograd_node_or_first_real_frame():
    def cpp(*names):
        return [{"filename": "??", "line": 0, "name": n} for n in names]

    unwind, alloc = "torch::unwind::unwind()", "c10::cuda::CUDACachingAllocator::Native::malloc(...)"
    node = "torch::autograd::generated::MmBackward0::apply(...)"
    engine = "torch::autograd::Engine::evaluate_function(...)"
    assert mp.frame_site(cpp(unwind, alloc, "at::native::empty_cuda(...)", node, engine)) == f"??:0 {node}"
    assert mp.frame_site(cpp(unwind, alloc, "at::native::empty_cuda(...)", engine)) == "??:0 at::native::empty_cuda(...)"
    assert mp.frame_site(cpp(unwind)) == f"??:0 {unwind}"
