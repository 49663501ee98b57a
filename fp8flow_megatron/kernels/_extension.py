"""The compiled CUDA extension ``fp8flow_megatron._fp8flow_cuda`` (sources in csrc/): the copy setup.py built when
nvcc and a CUDA torch were present at install time, else built on first use with torch.utils.cpp_extension.load
(about a minute; cached in torch's extension directory, TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("extension.cpp", "scaling_aware_transpose.cu")
# No fast-math: the transpose relies on fp32 subnormals (2^-136 is a valid dequantized value) and IEEE division.
NVCC_FLAGS = ["-O3", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-lineinfo"]
CXX_FLAGS = ["-O3"]
FUNCTIONS = ("scaling_aware_transpose", "scaling_aware_transpose_grouped")  # what the current csrc/ binds


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The extension module; raises RuntimeError, saying what is missing, when it can be neither imported nor built."""
    try:
        from fp8flow_megatron import _fp8flow_cuda  # built by setup.py

        if all(hasattr(_fp8flow_cuda, f) for f in FUNCTIONS):
            return _fp8flow_cuda
        # built from older sources (before a function was added): JIT-build the current ones instead
    except ImportError:
        pass
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(
            f"fp8flow_megatron's CUDA kernels need a CUDA build of torch; this torch is {torch.__version__}"
        )
    from torch.utils import cpp_extension

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    if nvcc is None or not os.path.exists(nvcc):
        raise RuntimeError(
            "fp8flow_megatron._fp8flow_cuda is not built and nvcc was not found to build it: install the CUDA toolkit "
            "(or set CUDA_HOME), or reinstall on a machine that has it with `pip install --no-build-isolation -e .`"
        )
    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        raise RuntimeError(
            f"fp8flow_megatron._fp8flow_cuda is not built and its sources {missing} are not in {CSRC}: reinstall "
            "from a source checkout with nvcc present (`pip install --no-build-isolation -e .`)"
        )
    return cpp_extension.load(
        name="fp8flow_cuda_jit",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(CSRC)],
    )
