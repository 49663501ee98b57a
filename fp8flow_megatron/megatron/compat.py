"""Every megatron-core version switch of the plugin lives here (and only here).

0.16.x: ModuleSpec + build_module, MLPSubmodules for experts, TransformerLayer passes no pg_collection to MoELayer
        subclasses, pretrain(dataset_provider, model_provider, ...), cuda_graph_scope.
0.19.x: builder-style specs (functools.partial: `partial(MoELayer, submodules=MoESubmodules(
        experts=partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(...))))`), called with `name=` /
        `is_mtp_layer=`; TransformerLayer passes pg_collection to every mlp builder; grouped linears are called with
        `name=`; Megatron-LM's pretrain_gpt builds the model from gpt_config_from_args (GPTModelConfig) and calls
        pretrain(cfg_container, ...) after parse_and_validate_args; cuda_graph_scope became cuda_graph_modules.

Which versions import: a series is named by its first admitted release, "0.16.1" = >=0.16.1,<0.17.
  TESTED_MCORE  run by the GPU suite (scripts/gpu_suite_both_mcore.sh) and the CPU suite (CI runs 0.16.1, the only
                one with a Python 3.11 wheel): imports.
  PORTED_MCORE  ported and green on the CPU suite, not yet run on a GPU: imports only with FP8FLOW_ALLOW_PORTED_MCORE=1
                (empty now: 0.19.2 was promoted after its H200 run, 2026-12-02).
Anything else raises ImportError with the admitted versions and the pip command. setup.py admits exactly the tested
series: its megatron-core requirement is install_requirement() (tests/megatron/test_compat.py checks it). Promoting a
ported series after its GPU run: move it from PORTED_MCORE to TESTED_MCORE, and paste install_requirement() into
setup.py.
"""

from __future__ import annotations

import functools
import os
import sys
from functools import lru_cache
from typing import Dict, Sequence, Tuple

from packaging.version import Version

TESTED_MCORE: Tuple[str, ...] = ("0.16.1", "0.19.2")
PORTED_MCORE: Tuple[str, ...] = ()
ALLOW_PORTED_ENV = "FP8FLOW_ALLOW_PORTED_MCORE"
# megatron-core publishes wheels from 0.17 on for Python >= 3.12 only: the pip command an error suggests must install
MIN_PYTHON: Dict[str, Tuple[int, int]] = {"0.19.2": (3, 12)}


def series_range(first: str) -> Tuple[Version, Version]:
    """The releases a series admits: "0.19.2" -> [0.19.2, 0.20)."""
    v = Version(first)
    return v, Version(f"{v.major}.{v.minor + 1}")


def _in_series(v: Version, series: Sequence[str]) -> bool:
    return any(lo <= v < hi for lo, hi in map(series_range, series))


def _spell(series: Sequence[str]) -> str:
    return ", ".join(f">={lo},<{hi}" for lo, hi in map(series_range, series))


def install_requirement(series: Sequence[str] = TESTED_MCORE) -> str:
    """The pip requirement that admits exactly `series`: ("0.16.1",) -> 'megatron-core>=0.16.1,<0.17';
    ("0.16.1", "0.19.2") -> 'megatron-core>=0.16.1,!=0.17.*,!=0.18.*,!=0.19.0,!=0.19.1,<0.20'."""
    ranges = sorted(map(series_range, series))
    excluded = []
    for (_, hi), (lo_next, _) in zip(ranges, ranges[1:]):
        minor = hi.minor
        while (hi.major, minor) < (lo_next.major, lo_next.minor):
            excluded.append(f"!={hi.major}.{minor}.*")
            minor += 1
        excluded += [f"!={lo_next.major}.{lo_next.minor}.{p}" for p in range(lo_next.micro)]
    return "megatron-core" + ",".join([f">={ranges[0][0]}", *excluded, f"<{ranges[-1][1]}"])


@lru_cache(maxsize=None)
def mcore_version() -> Version:
    import megatron.core

    return Version(megatron.core.__version__)


def suggested_pin(python: Tuple[int, int] = tuple(sys.version_info[:2])) -> str:
    """The pip command for the newest tested megatron-core that has a wheel for this Python."""
    usable = [v for v in TESTED_MCORE if python >= MIN_PYTHON.get(v, (0, 0))] or list(TESTED_MCORE[:1])
    return f"pip install 'megatron-core=={max(usable, key=Version)}'"


def ported_allowed() -> bool:
    return os.environ.get(ALLOW_PORTED_ENV, "") == "1"


def check_mcore_version() -> Version:
    """The installed megatron-core version, or an ImportError naming the admitted versions and the fix."""
    v = mcore_version()
    if _in_series(v, TESTED_MCORE):
        return v
    pip = suggested_pin()
    if _in_series(v, PORTED_MCORE):
        if ported_allowed():
            return v
        raise ImportError(
            f"fp8flow_megatron: megatron-core {v} is ported (CPU suite green) but not GPU-verified yet; tested: "
            f"{_spell(TESTED_MCORE)}. To run it anyway: export {ALLOW_PORTED_ENV}=1. Or install the tested one: {pip} "
            f"(Python 3.12 has its wheel too)."
        )
    ported = f"; ported, opt-in with {ALLOW_PORTED_ENV}=1: {_spell(PORTED_MCORE)}" if PORTED_MCORE else ""
    raise ImportError(
        f"fp8flow_megatron supports megatron-core {_spell(TESTED_MCORE)} (tested){ported}; found {v}. Fix: {pip}"
    )


# ------------------------------------------------------------------------------------------------------ specs
def uses_builder_specs() -> bool:
    """megatron-core >= 0.17 builds MoE submodules from partial() builders instead of ModuleSpec."""
    return mcore_version() >= Version("0.17")


def spec_module(spec):
    """The class a spec builds: ModuleSpec.module, partial.func, or the class itself."""
    if isinstance(spec, functools.partial):
        return spec.func
    return getattr(spec, "module", spec)


def spec_submodules(spec):
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def spec_with(spec, module, submodules):
    """A spec of the same style as `spec` (ModuleSpec on 0.16, partial on >=0.17) building `module` with
    `submodules`, keeping the other parameters of `spec`."""
    if isinstance(spec, functools.partial):
        keywords = dict(spec.keywords, submodules=submodules)
        return functools.partial(module, *spec.args, **keywords)
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=module, params=dict(spec.params), submodules=submodules, metainfo=dict(spec.metainfo))


def experts_spec(module, linear_fc1, linear_fc2, like=None):
    """The experts spec: ModuleSpec(module, MLPSubmodules(fc1, fc2)) on 0.16, partial(module,
    submodules=GroupedMLPSubmodules(fc1, fc2, activation_func)) on >=0.17 (activation kept from `like`)."""
    if uses_builder_specs():
        from megatron.core.transformer.moe.experts import GroupedMLPSubmodules

        activation = getattr(spec_submodules(like), "activation_func", None) if like is not None else None
        submodules = GroupedMLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2, activation_func=activation)
        return functools.partial(module, submodules=submodules)
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=module, submodules=MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2))


def build_mlp(spec, config):
    """Build a layer's mlp from its spec as TransformerLayer does (tests and tools that build one MoE layer alone)."""
    if uses_builder_specs():
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        return spec(config=config, pg_collection=get_default_pg_collection(), is_mtp_layer=False)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, config=config)


def mlp_kwargs_passed_to_moe_subclasses() -> bool:
    """0.16's TransformerLayer gives pg_collection only to the exact stock MLP classes (and logs "Unknown MLP type"
    for a subclass); >=0.17 calls every mlp builder with config, pg_collection, is_mtp_layer and name."""
    return uses_builder_specs()


# ---------------------------------------------------------------------------------------------- config fields
def cuda_graph_off_kwargs(field_names) -> dict:
    """TransformerConfig kwargs for "no CUDA graph scope" without a deprecation warning: the dataclass default "full"
    warns at every config ([] means the same, the whole layer, were graphs on): cuda_graph_scope in 0.16.1, renamed
    cuda_graph_modules in 0.19."""
    for name in ("cuda_graph_modules", "cuda_graph_scope"):
        if name in field_names:
            return {name: []}
    return {}


def null_tokenizer(vocab_size: int):
    """megatron-core's NullTokenizer with one meaning of Megatron's --vocab-size N for the plugin, 0.16.1's: N ids plus
    end-of-document, so N + 1 ids with eod == N. The 0.19 NullTokenizer(N) has N ids with eod == N - 1 (Megatron-LM
    core_v0.19 passes --vocab-size to it unchanged, so there --vocab-size counts the end-of-document id): it is given
    N + 1, which is the same tokenizer."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(vocab_size + 1 if uses_builder_specs() else vocab_size)


# ------------------------------------------------------------------------------------------- Megatron-LM entry
def pretrain_takes_cfg_container() -> bool:
    """Megatron-LM >= 0.18: parse_and_validate_args, then pretrain(cfg_container, dataset_provider, model_type,
    forward_step, ...), the model built from gpt_config_from_args(args) (0.19)."""
    return mcore_version() >= Version("0.18")
