"""--moe-fp8-flow-cuda-graph on CPU: the flag, its YAML key, the config it reaches, each refusal (flag + fix), and the
layer wiring (which calls take the graphed path; on CPU every call runs eager and equals the flag-off layer).
The capture itself is checked on the GPU: tests/ops/test_gpu_cuda_graph_layer.py, tests/test_gpu_train.py -k
cuda_graphed."""

import argparse
from types import SimpleNamespace

import pytest
import torch

from fp8flow_megatron.megatron import FP8FlowConfigError, add_fp8_flow_args, parse_args_with_yaml, validate_fp8_flow
from fp8flow_megatron.megatron import config as config_module
from fp8flow_megatron.megatron.config import FP8FlowConfig, apply_to_transformer_config, validation_errors

from .mcore_env import moe_config, moe_layer, run_layer
from .test_config import GOOD

GRAPH = {**GOOD, "moe_fp8_flow_cuda_graph": True, "moe_fp8_flow_gemm": "triton", "expert_model_parallel_size": 1,
         "pipeline_model_parallel_size": 1}


@pytest.fixture(autouse=True)
def experimental_opt_in(monkeypatch):
    """The flag is refused without FP8FLOW_EXPERIMENTAL_CUDA_GRAPH=1 (test_refused_without_the_opt_in); the other
    refusals are checked with it set."""
    monkeypatch.setenv("FP8FLOW_EXPERIMENTAL_CUDA_GRAPH", "1")


def test_refused_without_the_opt_in(monkeypatch, with_cuda):
    monkeypatch.delenv("FP8FLOW_EXPERIMENTAL_CUDA_GRAPH")
    errors = validation_errors(argparse.Namespace(**GRAPH))
    assert any("--moe-fp8-flow-cuda-graph is experimental" in e and "FP8FLOW_EXPERIMENTAL_CUDA_GRAPH=1" in e
               for e in errors), errors
    monkeypatch.setenv("FP8FLOW_EXPERIMENTAL_CUDA_GRAPH", "1")
    assert not validation_errors(argparse.Namespace(**GRAPH))


@pytest.fixture
def with_cuda(monkeypatch):
    """Validation as on a GPU machine (the graph flag needs CUDA)."""
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)


def test_flag_parses_and_reaches_the_transformer_config():
    p = add_fp8_flow_args(argparse.ArgumentParser())
    assert not p.parse_args([]).moe_fp8_flow_cuda_graph
    assert p.parse_args(["--moe-fp8-flow-cuda-graph"]).moe_fp8_flow_cuda_graph
    assert not p.parse_args(["--no-moe-fp8-flow-cuda-graph"]).moe_fp8_flow_cuda_graph
    cfg = FP8FlowConfig.from_source(argparse.Namespace(**GRAPH))
    assert cfg.cuda_graph and not FP8FlowConfig.from_source(argparse.Namespace(**GOOD)).cuda_graph
    assert apply_to_transformer_config(SimpleNamespace(), cfg).moe_fp8_flow_cuda_graph is True


def test_yaml_key_is_the_flag_dest(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_fp8_flow_args(p)
    y = tmp_path / "g.yaml"
    y.write_text("moe_fp8_flow: true\nmoe_fp8_flow_cuda_graph: true\n")
    assert parse_args_with_yaml(p, ["--config", str(y)]).moe_fp8_flow_cuda_graph
    assert not parse_args_with_yaml(p, ["--config", str(y), "--no-moe-fp8-flow-cuda-graph"]).moe_fp8_flow_cuda_graph


def test_the_trainer_parses_and_prints_the_flag(capsys):
    from fp8flow_megatron.megatron.arguments import build_parser
    from fp8flow_megatron.train import print_config

    args = build_parser().parse_args(["--moe-fp8-flow-cuda-graph"])
    assert args.moe_fp8_flow_cuda_graph
    args.rank, args.use_cuda = 0, False
    print_config(args)
    assert any(line.split()[:2] == ["moe_fp8_flow_cuda_graph", "True"] for line in capsys.readouterr().out.splitlines())


def test_good_graph_config_validates(with_cuda):
    assert validate_fp8_flow(argparse.Namespace(**GRAPH)).cuda_graph
    # auto resolves to triton with 64 local experts at EP=1
    assert validation_errors(argparse.Namespace(**{**GRAPH, "moe_fp8_flow_gemm": "auto"})) == []


@pytest.mark.parametrize(
    "change,fragment,fix",
    [
        ({"moe_fp8_flow_gemm": "te"}, "Triton GEMM engine", "--moe-fp8-flow-gemm triton"),
        ({"moe_fp8_flow_gemm": "auto", "num_moe_experts": 32}, "--moe-fp8-flow-gemm auto", "--moe-fp8-flow-gemm triton"),
        ({"expert_model_parallel_size": 8}, "--expert-model-parallel-size 1 (got 8)", "--expert-model-parallel-size 1"),
        ({"pipeline_model_parallel_size": 2}, "--pipeline-model-parallel-size 1 (got 2)", "PP=1"),
        ({"moe_expert_recompute": True}, "--moe-expert-recompute", "drop --moe-expert-recompute"),
        ({"disable_parameter_transpose_cache": True}, "--disable-parameter-transpose-cache", "use one of the two"),
        ({"recompute_granularity": "full"}, "--recompute-granularity full", "drop that recompute"),
        ({"recompute_granularity": "selective", "recompute_modules": ["moe"]}, "--recompute-modules moe",
         "drop that recompute"),
        ({"fine_grained_activation_offloading": True}, "activation offloading", "drop the offloading"),
        ({"cpu_offloading": True}, "activation offloading", "drop the offloading"),
    ],
)
def test_each_graph_refusal_names_the_flag_and_the_fix(with_cuda, change, fragment, fix):
    bad = argparse.Namespace(**{**GRAPH, **change})
    errors = validation_errors(bad)
    assert len(errors) == 1, errors
    assert errors[0].startswith("--moe-fp8-flow-cuda-graph ") and fragment in errors[0] and fix in errors[0], errors[0]
    with pytest.raises(FP8FlowConfigError, match="--moe-fp8-flow-cuda-graph"):
        validate_fp8_flow(bad)


def test_graph_flag_needs_cuda_and_fp8_flow(monkeypatch):
    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    (msg,) = validation_errors(argparse.Namespace(**GRAPH))
    assert "needs a CUDA device" in msg and "drop --moe-fp8-flow-cuda-graph" in msg
    (msg,) = validation_errors(argparse.Namespace(**{**GRAPH, "moe_fp8_flow": False}))
    assert "--moe-fp8-flow-cuda-graph only applies with --moe-fp8-flow" in msg


@pytest.mark.parametrize("megatron_graphs", [{"cuda_graph_impl": "local"}, {"enable_cuda_graph": True},
                                             {"external_cuda_graph": True}])
def test_megatron_graphs_stay_refused_and_point_to_ours(with_cuda, megatron_graphs):
    for base in (GOOD, GRAPH):
        (msg,) = validation_errors(argparse.Namespace(**{**base, **megatron_graphs}))
        assert "--cuda-graph-impl none" in msg and "--moe-fp8-flow-cuda-graph" in msg, msg


def test_the_layer_refuses_an_engine_it_cannot_capture(megatron_ep1):
    cfg = moe_config(True)
    cfg.moe_fp8_flow_cuda_graph, cfg.moe_fp8_flow_gemm = True, "te"
    with pytest.raises(FP8FlowConfigError, match="--moe-fp8-flow-cuda-graph.*--moe-fp8-flow-gemm triton"):
        moe_layer(cfg)


def test_cpu_calls_run_eager_and_equal_the_flag_off_layer(megatron_ep1, clean_guard):
    """The graphed layer on CPU: every call takes megatron's eager forward (graphs need CUDA), the weight cache is
    persistent, and the results equal the same layer without the flag, over steps with weight updates."""
    torch.manual_seed(3)
    cfg = moe_config(True, num_experts=8)
    plain = moe_layer(cfg)
    cfg_g = moe_config(True, num_experts=8)
    cfg_g.moe_fp8_flow_cuda_graph = True
    graphed = moe_layer(cfg_g)
    graphed.load_state_dict(plain.state_dict())
    assert graphed.cuda_graphs is not None and plain.cuda_graphs is None
    assert graphed.experts._weight_cache.persistent
    x = torch.randn(12, 2, 128)
    assert not graphed.cuda_graphs.usable(x.clone().requires_grad_())  # CPU
    for step in range(3):
        for layer in (plain, graphed):
            layer.experts.is_first_microbatch = True
            got = run_layer(layer, x)
            if layer is plain:
                ref = got
        for u, v in zip(got, ref):
            assert torch.equal(u, v), step
        with torch.no_grad():
            for layer in (plain, graphed):
                for p in layer.experts.parameters():
                    p.add_(0.01 * (step + 1))
                layer.zero_grad(set_to_none=True)
    assert graphed.cuda_graphs.num_captures == 0


def test_usable_only_for_training_forwards_with_grad(megatron_ep1, monkeypatch):
    from fp8flow_megatron.ops.telemetry import monitor

    cfg = moe_config(True)
    cfg.moe_fp8_flow_cuda_graph = True
    layer = moe_layer(cfg)
    graphs = layer.cuda_graphs
    fake = SimpleNamespace(is_cuda=True, requires_grad=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert graphs.usable(fake)
    with torch.no_grad():
        assert not graphs.usable(fake)  # evaluation, recompute's first pass
    layer.eval()
    assert not graphs.usable(fake)
    layer.train()
    monkeypatch.setattr(monitor, "enabled", True)
    assert not graphs.usable(fake)  # logged iterations observe FP8 health on the host
    monkeypatch.setattr(monitor, "enabled", False)
    assert not graphs.usable(SimpleNamespace(is_cuda=True, requires_grad=False))


def test_weight_stack_quantizes_into_given_buffers():
    """numerics.gemm.quantize_weight_stack(out=...): the same codes as a fresh call, written into the given buffers
    (what a captured graph reads); wrong buffers are refused with the expected layout."""
    from fp8flow_megatron.numerics.gemm import quantize_weight_stack

    torch.manual_seed(0)
    weights = [torch.randn(256, 384) for _ in range(3)]
    first = quantize_weight_stack(weights)
    addresses = [t.data_ptr() for s in first for t in (s.data, s.scale_inv)]
    new = [w * 3 for w in weights]
    got = quantize_weight_stack(new, out=first)
    ref = quantize_weight_stack(new)
    assert got is first and [t.data_ptr() for s in got for t in (s.data, s.scale_inv)] == addresses
    for a, b in zip(got, ref):
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale_inv, b.scale_inv)
    with pytest.raises(ValueError, match="out stack.data is .* expected a contiguous"):
        quantize_weight_stack(weights[:2], out=first)


def test_persistent_cache_refreshes_in_place_with_an_in_place_engine():
    from fp8flow_megatron.numerics.gemm import quantize_weight_stack
    from fp8flow_megatron.ops.experts import WeightQuantCache

    class InPlaceEngine:
        name, quantizes_in_place = "fake", True

        def quantize_weights(self, weights, nonfinite_flag=None, out=None):
            return quantize_weight_stack(weights, nonfinite_flag, out=out)

    weights = [torch.randn(128, 128) for _ in range(2)]
    cache = WeightQuantCache(persistent=True)
    first = cache.get_group("fc1", weights, InPlaceEngine(), refresh=True)
    before = cache.addresses()
    with torch.no_grad():
        for w in weights:
            w.mul_(2)
    again = cache.get_group("fc1", weights, InPlaceEngine(), refresh=True)
    assert again is first and cache.addresses() == before and cache.num_quantizations == 2
    assert torch.equal(again[0].scale_inv, quantize_weight_stack(weights)[0].scale_inv)
    plain = WeightQuantCache()
    a = plain.get_group("fc1", weights, InPlaceEngine(), refresh=True)
    assert plain.get_group("fc1", weights, InPlaceEngine(), refresh=True) is not a  # not persistent: replaced


@pytest.mark.parametrize("shared", [False, True])
def test_graphed_forward_decomposition_equals_megatron_forward(megatron_ep1, clean_guard, monkeypatch, shared):
    """The graphed path's forward (shared experts -> router -> routed_experts_eager, the captured region -> sum), run
    eagerly on CPU, equals megatron's MoELayer.forward bit for bit: output, input grad and every parameter's grad,
    with the aux loss and z-loss on (their gradients reach the router through the region's probs gradient)."""
    from fp8flow_megatron.megatron.cuda_graph import MoELayerCudaGraphs

    torch.manual_seed(4)
    extra = dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    if shared:
        extra["moe_shared_expert_intermediate_size"] = 256
    plain = moe_layer(moe_config(True, num_experts=8, **extra))
    cfg = moe_config(True, num_experts=8, **extra)
    cfg.moe_fp8_flow_cuda_graph = True
    graphed = moe_layer(cfg)
    graphed.load_state_dict(plain.state_dict())
    monkeypatch.setattr(MoELayerCudaGraphs, "usable", lambda self, h: True)
    regions = []

    def eager_region(self, hidden_states, probs, routing_map):
        regions.append(tuple(hidden_states.shape))
        return self.layer.routed_experts_eager(hidden_states, probs, routing_map)

    monkeypatch.setattr(MoELayerCudaGraphs, "routed", eager_region)
    x = torch.randn(10, 2, 128)
    ref, got = run_layer(plain, x), run_layer(graphed, x)
    assert regions == [(10, 2, 128)], "the graphed path was not taken"
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    for (name, p), (_, q) in zip(plain.named_parameters(), graphed.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_lazy_capture_per_shape_recapture_on_a_new_environment_and_the_graph_limit(megatron_ep1, monkeypatch, caplog):
    """MoELayerCudaGraphs.routed's bookkeeping with the capture stubbed (it needs CUDA): a shape's first call runs
    eager, its second captures and replays, later calls replay; a changed environment (e.g. the guard's flag buffer
    grew) re-captures with a log line naming it; the weights are prepared eagerly before every graphed call; past
    MAX_GRAPHS shapes, a new shape stays eager (warned once)."""
    import logging

    from fp8flow_megatron.megatron import cuda_graph

    cfg = moe_config(True)
    cfg.moe_fp8_flow_cuda_graph = True
    layer = moe_layer(cfg)
    graphs = layer.cuda_graphs
    log = []
    monkeypatch.setattr(layer, "routed_experts_eager", lambda h, p, r: log.append(("eager", h.shape[0])) or h)
    monkeypatch.setattr(layer.experts, "prepare_weights", lambda device: log.append(("prepare", None)))
    env = {"guard buffer": 1}
    monkeypatch.setattr(cuda_graph.MoELayerCudaGraphs, "_environment",
                        lambda self, device: (True, env["guard buffer"], (), (), (), False))

    def fake_capture(self, h, p, r):
        log.append(("capture", h.shape[0]))
        return lambda h, p, r: log.append(("replay", h.shape[0])) or h

    monkeypatch.setattr(cuda_graph.MoELayerCudaGraphs, "_capture", fake_capture)

    def call(tokens):
        graphs.routed(torch.zeros(tokens, 2, 128), torch.zeros(2 * tokens, 4, requires_grad=True),
                      torch.zeros(2 * tokens, 4, dtype=torch.bool))

    call(8), call(8), call(8)
    assert log == [("eager", 8), ("prepare", None), ("capture", 8), ("replay", 8), ("prepare", None), ("replay", 8)]
    log.clear()
    env["guard buffer"] = 2
    with caplog.at_level(logging.INFO, logger=cuda_graph.__name__):
        call(8)
    assert log == [("prepare", None), ("capture", 8), ("replay", 8)]
    assert "re-capturing" in caplog.text and "the guard's flag buffer changed" in caplog.text
    log.clear()
    for tokens in (9, 10, 11):  # three more shapes: 4 graphs in all
        call(tokens), call(tokens)
    assert [e for e in log if e[0] == "capture"] == [("capture", t) for t in (9, 10, 11)]
    log.clear()
    with caplog.at_level(logging.WARNING, logger=cuda_graph.__name__):
        call(12), call(12), call(12)
    assert log == [("eager", 12)] * 3 and "holds 4 graphs already" in caplog.text
    assert graphs.num_replays == 6  # shape 8: two, then one after the re-capture; 9, 10, 11: one each


def test_the_graphed_layer_hands_unfused_wgrads_to_ddp_and_refuses_transient_weights(megatron_ep1, with_cuda):
    # the graphed layer's replays return their captured weight gradients for DDP's hook to add, so its eager calls
    # must not add them into main_grad themselves (the hook would then skip the replays' gradients); and it reads
    # persistent FP8 weight buffers, which --disable-parameter-transpose-cache drops
    cfg = moe_config(True)
    cfg.moe_fp8_flow_cuda_graph, cfg.moe_fp8_flow_gemm = True, "triton"
    assert not moe_layer(cfg).experts.wgrad_into_main_grad
    assert moe_layer(moe_config(True)).experts.wgrad_into_main_grad
    cfg.disable_parameter_transpose_cache = True
    with pytest.raises(FP8FlowConfigError, match="--moe-fp8-flow-cuda-graph.*--disable-parameter-transpose-cache"):
        moe_layer(cfg)
