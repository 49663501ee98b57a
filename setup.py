"""fp8flow_megatron: casting-free FP8 MoE dataflow (FP8-Flow-MoE) for Megatron-core and TransformerEngine."""

import os

from setuptools import find_packages, setup


def cuda_extension_kwargs():
    """The optional CUDA extension fp8flow_megatron._fp8flow_cuda (csrc/), built only when nvcc and a CUDA build of
    torch are both present; otherwise nothing is compiled and the kernels build it on first use (see
    fp8flow_megatron/kernels/_extension.py). pip's build isolation hides the installed torch: build it with
    `pip install --no-build-isolation -e .`. Target GPUs: TORCH_CUDA_ARCH_LIST (default 9.0, Hopper)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    extension = CUDAExtension(
        name="fp8flow_megatron._fp8flow_cuda",
        sources=["csrc/extension.cpp", "csrc/scaling_aware_transpose.cu"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        # No fast-math: the transpose relies on fp32 subnormals and IEEE division (same flags as the JIT build).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="fp8flow_megatron",
    version="0.1.0",
    description="Casting-free FP8 MoE training (FP8-Flow-MoE) as a plugin for Megatron-core and TransformerEngine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fp8flow_megatron", "fp8flow_megatron.*"]),
    include_package_data=True,
    package_data={"fp8flow_megatron.data": ["corpus/*"]},  # the embedded training text ships with the package
    install_requires=[
        # A bare torch range pulls the newest CUDA build; install the torch you want first (the README pins it).
        "torch>=2.6",
        # exactly the tested series, 0.16.x and 0.19.2+ (0.17+ wheels need Python >= 3.12):
        # fp8flow_megatron.megatron.compat.install_requirement() (a test checks it)
        "megatron-core>=0.16.1,!=0.17.*,!=0.18.*,!=0.19.0,!=0.19.1,<0.20",
        "pyyaml",
        "numpy",
        "psutil",
        "matplotlib",  # the trainer's loss_curve.png  # megatron.core.dist_checkpointing's writer needs it
        "pybind11",  # builds megatron-core's C++ dataset helpers if its install lacks them (fp8flow_megatron.data)
    ],
    entry_points={"console_scripts": ["fp8flow-train = fp8flow_megatron.train:cli"]},
    extras_require={
        "test": ["pytest", "hypothesis"],
        # apex is optional and not on the package registry; nothing here requires it.
        "gpu": ["transformer-engine[pytorch]>=2.12"],
    },
    **cuda_extension_kwargs(),
)
