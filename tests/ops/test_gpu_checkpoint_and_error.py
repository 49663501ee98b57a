"""On the GPU with megatron-core + TE (EP=1, one process): distributed checkpoints move between the stock TE MoE layer
(TEGroupedMLP experts) and the FP8-Flow layer in both directions, and the FP8-Flow layer's error vs an fp32 layer is
no worse than stock TE blockwise FP8's on the same weights and inputs.

Every layer is built as megatron builds it: megatron's get_moe_module_spec (use_te=True, grouped GEMM for the stock
TE layers; the local spec for the fp32 reference), and fp8flow_moe_spec of the TE spec for the FP8-Flow layer.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

# Small but valid for blockwise FP8: hidden and moe_ffn are multiples of 128 (1x128 / 128x128 blocks).
HIDDEN, NUM_EXPERTS, TOPK, MOE_FFN = 512, 8, 2, 256
SEQ, BATCH = 128, 4  # 512 tokens: about 128 rows per expert, one full 128-row block for the wgrad operands
DEVICE = "cuda"

VARIANTS = ("reference", "bf16", "te_blockwise", "fp8flow")

# A stock megatron-core 0.16.1 + TE 2.20.2 problem, not FP8-Flow's: after an FP8 step a TE grouped linear under the
# stateless blockwise recipe stores an empty _extra_state, and TEGroupedLinear._split_extra_state decodes it to None and
# indexes it (megatron/core/extensions/transformer_engine.py:1697-1705), so the stock TE blockwise layer cannot build
# its sharded_state_dict at all. Upstream fix: Megatron-LM PR #6509. The test runs in full once that is fixed.
@pytest.fixture(scope="module")
def megatron_te_gpu():
    """megatron's parallel state for one GPU process (EP=1), set up as tests/ops/test_gpu_moe_layer.py does."""
    pytest.importorskip("transformer_engine.pytorch")
    from tests.megatron.mcore_env import free_port, init_megatron, teardown

    from fp8flow_megatron.megatron.stock_fixes import install_grouped_extra_state_fix

    init_megatron(0, 1, free_port(), ep=1, seed=0)
    # stock megatron-core 0.16.1 cannot save TE 2.20's empty blockwise _extra_state (Megatron-LM PR #6509); the
    # trainer installs the same fix, and the te_blockwise case below fails without it
    assert install_grouped_extra_state_fix()
    yield
    teardown()


def moe_config(variant: str):
    """The TransformerConfig of one variant (see build_moe_layer). Shapes and routing are shared; precision, expert kind
    and fused kernels differ: stock TE layers use TE's fused permute and megatron's fused weighted SwiGLU, as a stock
    run would (the settings of scripts/bench_moe_layer.py). The aux loss is off so that the router gradient comes from
    the experts alone."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fp32 = variant == "reference"
    fp8 = variant in ("te_blockwise", "fp8flow")
    stock_te = variant in ("bf16", "te_blockwise")
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=8,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
        moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=not fp32, moe_permute_fusion=stock_te, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=not fp32, add_bias_linear=False,
        params_dtype=torch.float32 if fp32 else torch.bfloat16, bf16=not fp32,
        fp8="e4m3" if fp8 else None, fp8_recipe="blockwise" if fp8 else "delayed",
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    config.moe_fp8_flow = variant == "fp8flow"
    config.moe_expert_recompute = False
    return config


def build_moe_layer(variant: str):
    """One MoE layer on the GPU, in training mode, with megatron's initialization (router and experts).

    reference     fp32 params, SequentialMLP experts (megatron's local spec): the experts run plain fp32 matmuls. Not
                  the TE layer in fp32: TE runs pure-fp32 GEMMs in TF32 (common/gemm/cublaslt_gemm.cu, "Use TF32 only
                  for pure FP32 GEMM"), which would put a 1e-3-level error into the reference's experts. (The router
                  GEMM goes through TE in every variant, megatron's router_gating_linear; on the BF16-representable
                  inputs used here its forward TF32 products are exact, so every variant routes alike.)
    bf16          stock TEGroupedMLP, BF16 params.
    te_blockwise  stock TEGroupedMLP, BF16 params, fp8="e4m3" / fp8_recipe="blockwise": TEGroupedMLP then pads every
                  expert's rows with TE's Fp8Padding. Run it under fp8_autocast().
    fp8flow       FP8FlowMoELayer with FP8FlowGroupedMLP experts, BF16 params, the FP8 config an FP8-Flow run uses.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from fp8flow_megatron.megatron.compat import build_mlp
    from fp8flow_megatron.megatron.spec import fp8flow_moe_spec

    assert variant in VARIANTS, variant
    grouped = variant != "reference"
    spec = get_moe_module_spec(use_te=grouped, num_experts=NUM_EXPERTS, moe_grouped_gemm=grouped)
    if variant == "fp8flow":
        spec = fp8flow_moe_spec(spec)
    return build_mlp(spec, moe_config(variant)).to(DEVICE)


def fp8_autocast():
    """TE blockwise FP8 as megatron enters it for fp8="e4m3", fp8_recipe="blockwise" (megatron.core.fp8_utils
    get_fp8_recipe / get_fp8_context): E4M3, 1x128 activations and gradients, 128x128 weights, power-of-two scales."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling(fp8_format=Format.E4M3))


def make_inputs():
    """Activations ~ N(0, 1) and an output gradient ~ N(0, 1e-2), both BF16 ([SEQ, BATCH, HIDDEN])."""
    x = torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE).bfloat16()
    grad_out = (torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE) * 1e-2).bfloat16()
    return x, grad_out


def run_step(layer, x, grad_out):
    """Forward + backward in the layer's own precision (under fp8_autocast when its config sets fp8, as megatron's
    transformer layer would); returns the output and the input gradient. Parameter gradients stay in .grad."""
    x = x.detach().clone().requires_grad_()
    with fp8_autocast() if layer.config.fp8 else contextlib.nullcontext():
        y, _ = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad.detach()


def save_checkpoint(layer, directory):
    """A megatron distributed checkpoint of the layer's sharded_state_dict (TE's per-GEMM _extra_state entries are
    ShardedObjects in it, as in a training checkpoint)."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True)
    dist_checkpointing.save(layer.sharded_state_dict(), str(directory))


def load_checkpoint(layer, directory):
    """Load as megatron's training loop does: the layer's own sharded_state_dict says what to read, then a strict
    load_state_dict applies it (TE's load pre-hook merges the per-GEMM _extra_state entries back into one)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(layer.sharded_state_dict(), str(directory))
    layer.load_state_dict(state)


def zero_params(layer):
    """Zero every parameter, so a parameter that a load skips cannot equal its source by accident."""
    with torch.no_grad():
        for param in layer.parameters():
            param.zero_()


def copy_params(source, target):
    """Copy parameters by name (the stock TE layer and the FP8-Flow layer have the same names and shapes)."""
    source_params, target_params = dict(source.named_parameters()), dict(target.named_parameters())
    assert set(source_params) == set(target_params), sorted(set(source_params) ^ set(target_params))
    with torch.no_grad():
        for name, param in target_params.items():
            param.copy_(source_params[name])


def assert_same_params(expected_layer, layer):
    """Every parameter of `layer` is bitwise equal to the one of the same name in `expected_layer`."""
    expected = dict(expected_layer.named_parameters())
    actual = dict(layer.named_parameters())
    assert set(expected) == set(actual), sorted(set(expected) ^ set(actual))
    for name, param in actual.items():
        assert param.dtype == expected[name].dtype and torch.equal(param, expected[name]), name


def grouped_param_names():
    """Parameter names of a TEGroupedMLP / FP8FlowGroupedMLP MoE layer without shared experts."""
    experts = {f"experts.linear_fc{fc}.weight{i}" for fc in (1, 2) for i in range(NUM_EXPERTS)}
    return {"router.weight"} | experts


@pytest.mark.parametrize("stock_variant", ["bf16", "te_blockwise"])
def test_stock_checkpoint_loads_into_fp8flow(megatron_te_gpu, tmp_path, stock_variant):
    torch.manual_seed(11)
    x, grad_out = make_inputs()
    stock = build_moe_layer(stock_variant)
    assert set(dict(stock.named_parameters())) == grouped_param_names()
    run_step(stock, x, grad_out)  # the run that wrote the checkpoint has trained in its own precision
    save_checkpoint(stock, tmp_path / "stock")

    loaded = build_moe_layer("fp8flow")
    zero_params(loaded)
    load_checkpoint(loaded, tmp_path / "stock")
    assert_same_params(stock, loaded)

    # Functional, not just names-equal: the loaded layer computes exactly what an FP8-Flow layer given the stock
    # weights by copying computes (the FP8-Flow path is deterministic: no atomics; top-2 sums are order-free).
    copied = build_moe_layer("fp8flow")
    copy_params(stock, copied)
    y_loaded, dx_loaded = run_step(loaded, x, grad_out)
    y_copied, dx_copied = run_step(copied, x, grad_out)
    assert torch.equal(y_loaded, y_copied)
    assert torch.equal(dx_loaded, dx_copied)
    copied_params = dict(copied.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param.grad, copied_params[name].grad), name


@pytest.mark.parametrize("stock_variant", ["bf16", "te_blockwise"])
def test_fp8flow_checkpoint_loads_into_stock(megatron_te_gpu, tmp_path, stock_variant):
    torch.manual_seed(12)
    x, grad_out = make_inputs()
    flow = build_moe_layer("fp8flow")
    assert set(dict(flow.named_parameters())) == grouped_param_names()
    run_step(flow, x, grad_out)
    with torch.no_grad():  # an optimizer step's worth of change, so the checkpoint holds trained, not initial, values
        for param in flow.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    save_checkpoint(flow, tmp_path / "fp8flow")

    loaded = build_moe_layer(stock_variant)
    zero_params(loaded)
    load_checkpoint(loaded, tmp_path / "fp8flow")
    assert_same_params(flow, loaded)

    # Functional: the loaded stock layer computes exactly what a stock layer given the weights by copying computes.
    copied = build_moe_layer(stock_variant)
    copy_params(flow, copied)
    y_loaded, dx_loaded = run_step(loaded, x, grad_out)
    y_copied, dx_copied = run_step(copied, x, grad_out)
    assert torch.equal(y_loaded, y_copied)
    assert torch.equal(dx_loaded, dx_copied)


def round_params_to_bf16(layer):
    """Make every parameter BF16-representable (in place, still fp32), so the BF16 layers can hold exactly the
    reference's weights."""
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(param.bfloat16())


def copy_reference_weights(reference, layer):
    """Give a grouped-GEMM layer (stock TE or FP8-Flow) the reference's router and expert weights (SequentialMLP
    local_experts[i].linear_fc{1,2}.weight -> experts.linear_fc{1,2}.weight{i}); the reference's weights are
    BF16-representable, so the copy is exact. Checks that no other parameter exists, i.e. none is left at its init."""
    reference_params = dict(reference.named_parameters())
    params = dict(layer.named_parameters())
    assert set(params) == grouped_param_names(), sorted(set(params) ^ grouped_param_names())
    assert set(reference_params) == {_reference_name(name) for name in params}, sorted(reference_params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(reference_params[_reference_name(name)])
            assert torch.equal(param.float(), reference_params[_reference_name(name)]), name


def _reference_name(grouped_name: str) -> str:
    """The reference (SequentialMLP) parameter name of a grouped-layer parameter name."""
    if grouped_name == "router.weight":
        return grouped_name
    linear, index = grouped_name.removeprefix("experts.").split(".weight")
    return f"experts.local_experts.{index}.{linear}.weight"


def expert_weights(layer, linear: str):
    """The per-expert weights of linear_fc1 or linear_fc2, in expert order, for SequentialMLP or grouped experts."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return [getattr(expert, linear).weight for expert in experts.local_experts]
    return [getattr(getattr(experts, linear), f"weight{i}") for i in range(experts.num_local_experts)]


def measure(layer, x, grad_out):
    """One forward + backward; returns the output, input grad, router weight grad and the fc1 / fc2 expert weight
    grads (all experts concatenated), as fp32."""
    y, dx = run_step(layer, x, grad_out)
    return {
        "out": y.float(),
        "dx": dx.float(),
        "drouter": layer.router.weight.grad.float(),
        "dw_fc1": torch.cat([w.grad.float().flatten() for w in expert_weights(layer, "linear_fc1")]),
        "dw_fc2": torch.cat([w.grad.float().flatten() for w in expert_weights(layer, "linear_fc2")]),
    }


def test_fp8flow_error_no_worse_than_te_blockwise(megatron_te_gpu):
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
    from transformer_engine.pytorch import Fp8Padding

    from fp8flow_megatron.megatron.experts import FP8FlowGroupedMLP
    from fp8flow_megatron.megatron.token_dispatcher import FP8FlowTokenDispatcher
    from fp8flow_megatron.ops.gemm_engine import gemm_engine_for
    from tests.megatron.mcore_env import rel

    assert gemm_engine_for(torch.device(DEVICE)).name == "te"
    torch.manual_seed(13)
    reference = build_moe_layer("reference")
    round_params_to_bf16(reference)
    te_blockwise = build_moe_layer("te_blockwise")
    flow = build_moe_layer("fp8flow")
    assert type(reference.experts) is SequentialMLP
    assert type(te_blockwise.experts) is TEGroupedMLP and isinstance(te_blockwise.experts.quantization_padding, Fp8Padding)
    assert isinstance(flow.experts, FP8FlowGroupedMLP) and isinstance(flow.token_dispatcher, FP8FlowTokenDispatcher)
    copy_reference_weights(reference, te_blockwise)
    copy_reference_weights(reference, flow)

    # BF16 inputs, given to the reference in fp32: all three layers see identical values, so the router (fp32 in
    # each) picks the same experts and the errors below are the FP8 computation's alone, not routing flips.
    x, grad_out = make_inputs()
    expected = measure(reference, x.float(), grad_out.float())
    te_result = measure(te_blockwise, x, grad_out)
    flow_result = measure(flow, x, grad_out)
    errors = {name: (rel(te_result[name], ref), rel(flow_result[name], ref)) for name, ref in expected.items()}
    report = ", ".join(f"{name}: te {te:.4e} fp8flow {fl:.4e}" for name, (te, fl) in errors.items())
    print("relative L2 error vs fp32:", report)

    for name, (te_err, flow_err) in errors.items():
        # Both really ran FP8 (E4M3 keeps 3 mantissa bits: about 6.6e-2 here, as the exact CPU emulation of the
        # FP8-Flow layer measures at this config; a BF16 path stays below 1e-2) and nothing is broken (a wrong
        # scale or layout gives errors of order 1).
        assert 0.02 < te_err < 0.1, (name, report)
        assert 0.02 < flow_err < 0.1, (name, report)
        # Both quantize the same tensors with the same rule (1x128 / 128x128, power-of-two scales). What differs:
        # accumulation order in the GEMMs, TE rounding the SwiGLU output (and its gradient) to BF16 before
        # quantizing where FP8-Flow quantizes from fp32, and FP8-Flow's wgrad operands coming from the
        # scaling-aware transpose of the FP8 codes (exact except values that fall to E4M3 subnormals) where TE
        # quantizes BF16 column-wise. Each moves the error well under 1% of itself; 5% (+1e-4) absorbs them and
        # still fails a recipe that is really worse.
        assert flow_err <= te_err * 1.05 + 1e-4, (name, report)
