"""Every megatron-core version switch of the plugin lives here (and only here).

0.16.x: ModuleSpec + build_module, MLPSubmodules for experts, TransformerLayer passes no pg_collection to MoELayer
        subclasses, pretrain(dataset_provider, model_provider, ...).
>=0.17: builder-style specs (functools.partial), GroupedMLPSubmodules, `name=` / `is_mtp_layer=` keyword arguments.
>=0.18: pretrain(cfg_container, ...) + parse_and_validate_args.
Only 0.16.x is tested (CI, and the GPU suite), so only 0.16.x is admitted (setup.py and SUPPORTED_RANGE):
importing fp8flow_megatron.megatron under any other version raises with the range and the pip command. The >=0.17
helpers below describe the upstream changes for the port; nothing reaches them until the range is widened.
"""

from __future__ import annotations

from functools import lru_cache

from packaging.version import Version

TESTED_MCORE = ("0.16.1",)
SUPPORTED_RANGE = (Version("0.16.1"), Version("0.17"))  # keep equal to setup.py's install_requires


@lru_cache(maxsize=None)
def mcore_version() -> Version:
    import megatron.core

    return Version(megatron.core.__version__)


def check_mcore_version() -> Version:
    """The installed megatron-core version, or an ImportError naming the supported range and the fix."""
    v = mcore_version()
    lo, hi = SUPPORTED_RANGE
    if not (lo <= v < hi):
        raise ImportError(
            f"fp8flow_megatron supports megatron-core >={lo},<{hi} (tested: {', '.join(TESTED_MCORE)}); found {v}. "
            f"Fix: pip install 'megatron-core=={TESTED_MCORE[-1]}' (megatron-core 0.17+ changed the spec and "
            f"pretrain APIs, which the plugin does not support yet)."
        )
    return v


def uses_builder_specs() -> bool:
    """megatron-core >= 0.17 builds MoE submodules from partial() builders instead of ModuleSpec."""
    return mcore_version() >= Version("0.17")


def pretrain_takes_cfg_container() -> bool:
    """Megatron-LM >= 0.18 changed pretrain() to take a config container first."""
    return mcore_version() >= Version("0.18")


def require_module_spec_api(what: str) -> None:
    if uses_builder_specs():
        raise NotImplementedError(
            f"{what}: megatron-core {mcore_version()} uses builder-style specs, which fp8flow_megatron does not "
            f"support yet. Use megatron-core 0.16.x (pip install 'megatron-core==0.16.1')."
        )


def require_positional_pretrain(entry: str) -> None:
    """Refuse Megatron-LM entry points built on pretrain(cfg_container, ...) (megatron-core >= 0.18).

    0.16.x/0.17.x: pretrain(dataset_provider, model_provider, model_type, forward_step, ..., extra_args_provider=).
    0.18+: parse_and_validate_args(extra_args_provider=) then pretrain(cfg_container, dataset_provider, model_type,
    forward_step, model_provider=None, ...), and 0.19+ builds the model from gpt_config_from_args(args); the spec
    injection there is untested, so it is refused rather than guessed.
    """
    if pretrain_takes_cfg_container():
        raise RuntimeError(
            f"{entry} drives Megatron-LM's pretrain(dataset_provider, model_provider, ...) entry of megatron-core "
            f"0.16.x/0.17.x; megatron-core {mcore_version()} has pretrain(cfg_container, ...), which fp8flow_megatron "
            f"does not support yet. Use a Megatron-LM core_v0.16.x checkout with megatron-core 0.16.1 "
            f"(pip install 'megatron-core=={TESTED_MCORE[-1]}'), or fp8flow_megatron's own trainer "
            f"(python -m fp8flow_megatron.train)."
        )
