"""GPU: the TE series applied to the installed TE's Python files (a temp copy); the patched GroupedLinear must give the
same output, dgrad and wgrad as fp8flow_megatron's grouped-GEMM recipe on the same FP8 operands (bit-identical: the
same TE GEMMs on the same codes and scales), and the series' own upstream-style tests must pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .patch_series import REPO, TE_SERIES, git_apply, series

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def patched_te(tmp_path_factory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import transformer_engine
    except ImportError:
        pytest.skip("transformer_engine is not importable")
    src = Path(transformer_engine.__file__).resolve().parent
    root = tmp_path_factory.mktemp("te_patched")

    def copy(s, d):  # Python files are copied (they get patched); libraries are linked
        if s.endswith(".py"):
            shutil.copyfile(s, d)
        else:
            os.symlink(s, d)

    shutil.copytree(src, root / "transformer_engine", copy_function=copy, ignore=shutil.ignore_patterns("__pycache__"))
    # TE looks for its libraries next to the imported package first: link the installed ones beside the copy.
    for entry in src.parent.iterdir():
        if entry.name != "transformer_engine" and (entry.suffix == ".so" or entry.name.startswith("libtransformer_engine")):
            os.symlink(entry, root / entry.name)
    res = git_apply(root, series(TE_SERIES), check=False)
    assert res.returncode == 0, f"TE series does not apply to {src}:\n{res.stdout}\n{res.stderr}"
    return root


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_patched_grouped_linear_matches_plugin_recipe(patched_te):
    res = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("te_patch_gpu_check.py"))],
        env=_env(patched_te), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print("TE patch vs plugin:", json.dumps(result))
    assert result["te_from"].startswith(str(patched_te)), result["te_from"]
    for name, d in result["vs_plugin"].items():
        assert d == 0.0, f"patched GroupedLinear {name} differs from the plugin's recipe by {d}: {result}"
    for name, d in result["vs_stock_on_dequantized"].items():
        assert d == 0.0, f"patched GroupedLinear {name} differs from stock TE on dequantized values by {d}: {result}"


def test_series_upstream_tests(patched_te):
    test_file = patched_te / "tests" / "pytorch" / "test_grouped_linear_prequantized_fp8.py"
    assert test_file.is_file()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(patched_te), str(test_file)],
        env=_env(patched_te), capture_output=True, text=True, timeout=600, cwd=patched_te,
    )
    print(res.stdout[-2000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
