"""CI checks of the fork patch series (no network to GitHub).

* megatron-lm/core_v0.16.1 and core_v0.19.0: the hunks touching files of the megatron-core wheel of that series
  (0.16.1: megatron/core; 0.19.2: megatron/core and megatron/training, which that wheel ships) apply
  (`git apply --check`) to them -- the installed wheel when it is that release, else the wheel from PyPI via
  `pip download` (cached; missing = failure under CI=true, skip otherwise); under the installed megatron-core the
  patched TransformerConfig of its series carries the FP8-Flow fields and rejects the combinations that cannot work.
  Hunks in files no wheel ships (pretrain_gpt.py; 0.16.1's megatron/training/arguments.py) are NOT checked here (see
  the series' README.md).
* transformer-engine/v2.20.2: every hunk applies to the Python files of the transformer-engine==2.20.2 wheel
  (py3-none-any, from PyPI via `pip download`, cached); missing wheel = failure under CI=true, skip otherwise. The
  series' scaling-aware transpose is bit-identical to fp8flow_megatron.numerics.scaling_aware_transpose (CPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from .patch_series import (
    MEGATRON_019_SERIES,
    MEGATRON_SERIES,
    MEGATRON_SERIES_WHEEL,
    TE_SERIES,
    git_apply,
    new_files,
    series,
    stage_files,
    touched_files,
)

TE_VERSION = "2.20.2"
TE_WHEEL = f"transformer_engine-{TE_VERSION}-py3-none-any.whl"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this check must run in CI)")
    pytest.skip(reason)


# -- the series themselves

@pytest.mark.parametrize("directory", [MEGATRON_SERIES, MEGATRON_019_SERIES, TE_SERIES],
                         ids=["megatron-lm-0.16.1", "megatron-lm-0.19.0", "transformer-engine"])
def test_series_are_format_patch_files_with_readme(directory):
    patches = series(directory)
    assert patches, f"no patches in {directory}"
    assert (directory / "README.md").is_file(), f"{directory} has no README.md"
    readme = (directory / "README.md").read_text()
    for i, p in enumerate(patches, 1):
        text = p.read_text()
        assert p.name.startswith(f"{i:04d}-"), f"{p.name}: series numbering has a gap"
        assert text.startswith("From 0000000000000000000000000000000000000000 "), f"{p.name}: not git format-patch"
        assert f"[PATCH {i}/{len(patches)}]" in text, f"{p.name}: subject lacks [PATCH {i}/{len(patches)}]"
        assert touched_files(p), f"{p.name} touches no file"
        assert p.name in readme, f"README.md of {directory.name} does not describe {p.name}"


# -- Megatron-LM: the hunks in files of the megatron-core wheel of each series

MEGATRON_SERIES_IDS = {MEGATRON_SERIES: "core_v0.16.1", MEGATRON_019_SERIES: "core_v0.19.0"}


def _mcore_root() -> Path:
    import megatron.core

    return Path(megatron.core.__file__).resolve().parents[2]  # the directory holding megatron/


def _installed_mcore() -> str:
    import megatron.core

    return megatron.core.__version__.split("+")[0]


def _mcore_wheel_root(version: str, tmp_path_factory) -> Path:
    """A directory holding megatron/ of megatron-core==version: the installed package when it is that release, else
    the cp312 wheel from PyPI (pip download, cached), unpacked."""
    if _installed_mcore() == version:
        return _mcore_root()
    cache = Path(os.environ.get("FP8FLOW_WHEEL_CACHE", Path.home() / ".cache" / "fp8flow_megatron" / "wheels"))
    wheels = sorted(cache.glob(f"megatron_core-{version}-cp312-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
               "--quiet", "-d", str(cache), f"megatron-core=={version}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _missing(f"pip download of megatron-core=={version} failed: {exc}")
        wheels = sorted(cache.glob(f"megatron_core-{version}-cp312-*.whl"))
        if not wheels:
            _missing(f"could not obtain the megatron-core {version} wheel with `{' '.join(cmd)}`: {res.stderr[-500:]}")
    root = tmp_path_factory.mktemp(f"mcore_{version}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith("megatron/")])
    return root


@pytest.mark.parametrize("directory", list(MEGATRON_SERIES_IDS), ids=list(MEGATRON_SERIES_IDS.values()))
def test_megatron_hunks_apply_to_the_series_wheel(tmp_path, tmp_path_factory, directory):
    version = MEGATRON_SERIES_WHEEL[directory]
    root = _mcore_wheel_root(version, tmp_path_factory)
    patches = series(directory)
    wheel_files = sorted({f for p in patches for f in touched_files(p) if (root / f).is_file()})
    assert "megatron/core/transformer/transformer_config.py" in wheel_files, (
        f"the {directory.name} series should touch megatron/core (TransformerConfig fields)")
    if version == "0.19.2":  # that wheel ships Megatron-LM's training package too: its hunk is checked as well
        assert "megatron/training/arguments.py" in wheel_files
    missing = stage_files(root, tmp_path, wheel_files)
    assert not missing, missing
    res = git_apply(tmp_path, patches, check=True, include=wheel_files)
    assert res.returncode == 0, (
        f"{directory.name} hunks do not apply to megatron-core {version}:\n{res.stdout}\n{res.stderr}")


def test_patched_transformer_config_fields(tmp_path):
    """Apply the megatron/core hunks of the installed megatron-core's series to a copy of the installed megatron
    package and build TransformerConfigs."""
    import shutil

    by_series = {v.rsplit(".", 1)[0]: d for d, v in MEGATRON_SERIES_WHEEL.items()}
    directory = by_series.get(_installed_mcore().rsplit(".", 1)[0])
    assert directory is not None, f"no Megatron-LM patch series for the installed megatron-core {_installed_mcore()}"
    shutil.copytree(_mcore_root() / "megatron", tmp_path / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    res = git_apply(tmp_path, series(directory), check=False, include=["megatron/core/*"])
    assert res.returncode == 0, res.stderr
    script = r"""
import megatron.core, sys
from megatron.core.transformer.transformer_config import TransformerConfig
assert megatron.core.__file__.startswith(sys.argv[1]), megatron.core.__file__
base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_moe_experts=4, moe_ffn_hidden_size=128)
c = TransformerConfig(**base)
assert c.moe_fp8_flow is False and c.moe_expert_recompute is False
for kw, msg in [(dict(moe_fp8_flow=True), "blockwise"), (dict(moe_expert_recompute=True), "requires moe_fp8_flow")]:
    try:
        TransformerConfig(**base, **kw)
    except ValueError as e:
        assert msg in str(e), e
    else:
        raise AssertionError(f"{kw} accepted")
from fp8flow_megatron.megatron import FP8FlowConfig
assert FP8FlowConfig.from_source(c).enabled is False
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])]))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]


# -- TransformerEngine: every hunk against the 2.20.2 wheel's Python files

def _te_wheel() -> Path:
    cache = Path(os.environ.get("FP8FLOW_WHEEL_CACHE", Path.home() / ".cache" / "fp8flow_megatron" / "wheels"))
    wheel = cache / TE_WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--quiet", "-d", str(cache), f"transformer-engine=={TE_VERSION}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _missing(f"pip download of transformer-engine=={TE_VERSION} failed: {exc}")
    if not wheel.is_file():
        _missing(f"could not obtain {TE_WHEEL} with `{' '.join(cmd)}`: {res.stderr.strip()[-500:]}")
    return wheel


@pytest.fixture(scope="module")
def te_wheel_tree(tmp_path_factory) -> Path:
    """The wheel's transformer_engine/ files that the series touches, at their repository paths."""
    wheel = _te_wheel()
    root = tmp_path_factory.mktemp("te_wheel")
    patches = series(TE_SERIES)
    created = {f for p in patches for f in new_files(p)}
    wanted = sorted({f for p in patches for f in touched_files(p)} - created)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        absent = [f for f in wanted if f not in names]
        assert not absent, f"files the TE series patches are not in {wheel.name}: {absent}"
        for f in wanted:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(zf.read(f))
    return root


def test_te_hunks_apply_to_wheel(te_wheel_tree):
    res = git_apply(te_wheel_tree, series(TE_SERIES), check=True)
    assert res.returncode == 0, f"TE series does not apply to transformer-engine {TE_VERSION}:\n{res.stdout}\n{res.stderr}"


def _load_patched_transpose(tmp_path: Path):
    """The series' scaling-aware transpose module, applied and loaded without TE (its one TE import is stubbed)."""
    res = git_apply(tmp_path, series(TE_SERIES)[:1], check=False)
    assert res.returncode == 0, res.stderr
    path = tmp_path / "transformer_engine/pytorch/tensor/_blockwise_scaling_aware_transpose.py"
    pkg = "_te_patch_stub"
    stub_storage = types.ModuleType(f"{pkg}.storage.float8_blockwise_tensor_storage")
    stub_storage.Float8BlockwiseQTensorStorage = type("Float8BlockwiseQTensorStorage", (), {})
    for name in (pkg, f"{pkg}.storage"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules[stub_storage.__name__] = stub_storage
    spec = importlib.util.spec_from_file_location(f"{pkg}.sat", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("m,k", [(0, 256), (1, 128), (129, 256), (300, 384), (128, 200)])
def test_te_series_transpose_matches_plugin_spec(tmp_path, m, k):
    from fp8flow_megatron.numerics import quantize_1x128, scaling_aware_transpose

    mod = _load_patched_transpose(tmp_path)
    torch.manual_seed(m * 1000 + k)
    x = torch.randn(m, k)
    if m:
        x = x * torch.logspace(-12, 6, m)[:, None]  # rows 18 decades apart: column blocks hit the subnormals
    if m > 2:
        x[0, :128] = 0  # an all-zero row block
        x[1, 5] = 1e-30
    q = quantize_1x128(x)
    ref = scaling_aware_transpose(q)
    nb, pad4 = -(-k // 128), -(-m // 4) * 4
    gemm_ready = torch.zeros(nb, pad4)  # TE's row-wise 1x128 scale layout [ceil(K/128), pad4(M)]
    gemm_ready[:, :m] = q.scale_inv.t()
    data_t, scale_t = mod.scaling_aware_transpose_1x128(q.data.view(torch.uint8), gemm_ready)
    assert data_t.shape == (k, m) and scale_t.shape == (-(-m // 128), -(-k // 4) * 4)
    mismatch = (data_t != ref.data.view(torch.uint8)).nonzero()
    assert mismatch.numel() == 0, f"codes differ first at {mismatch[0].tolist()} (m={m}, k={k})"
    assert torch.equal(scale_t[:, :k], ref.scale_inv.t()), f"scales differ (m={m}, k={k})"
    assert (scale_t[:, k:] == 0).all()


# -- Megatron-LM 0.19's own argument parser (the megatron-core 0.19.2 wheel ships megatron/training)

_PARSE_SCRIPT = r"""
import sys
from megatron.training.arguments import parse_args
from fp8flow_megatron.megatron import add_fp8_flow_args, validate_fp8_flow
sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1", "--num-experts", "4",
            "--moe-ffn-hidden-size", "128", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
            "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--moe-router-dtype", "fp32", "--swiglu",
            "--disable-bias-linear", "--moe-fp8-flow", "--moe-expert-recompute", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "256", "--train-iters", "2", "--lr", "1e-4", "--bf16"]
args = parse_args(add_fp8_flow_args)  # chained as route 1 does; with 0001 applied the flags exist already
assert args.moe_fp8_flow and args.moe_expert_recompute and args.moe_fp8_flow_gemm == "auto", args
# flags of 0.16 that 0.19 removed are simply absent, and validation does not need them
assert not hasattr(args, "moe_use_legacy_grouped_gemm") and not hasattr(args, "moe_extended_tp")
assert validate_fp8_flow(args).enabled
print("ok")
"""


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "core_v0.19.0-series"])
def test_megatron_lm_019_parses_the_fp8_flow_flags(tmp_path, patched):
    import shutil

    if not _installed_mcore().startswith("0.19."):
        pytest.skip(f"needs megatron-core 0.19.x (installed: {_installed_mcore()}), whose wheel ships megatron/training")
    path = [str(Path(__file__).resolve().parents[2])]
    if patched:
        shutil.copytree(_mcore_root() / "megatron", tmp_path / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
        res = git_apply(tmp_path, series(MEGATRON_019_SERIES), check=False, include=["megatron/*"])
        assert res.returncode == 0, res.stderr
        path.insert(0, str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), FP8FLOW_ALLOW_PORTED_MCORE="1")
    out = subprocess.run([sys.executable, "-c", _PARSE_SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
