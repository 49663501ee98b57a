"""fp8flow_megatron: casting-free FP8 MoE dataflow (FP8-Flow-MoE) for Megatron-core and TransformerEngine."""

from setuptools import find_packages, setup

setup(
    name="fp8flow_megatron",
    version="0.1.0",
    description="Casting-free FP8 MoE training (FP8-Flow-MoE) as a plugin for Megatron-core and TransformerEngine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fp8flow_megatron", "fp8flow_megatron.*"]),
    include_package_data=True,
    install_requires=[
        # A bare torch range pulls the newest CUDA build; install the torch you want first (the README pins it).
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "pyyaml",
        "numpy",
        "psutil",  # megatron.core.dist_checkpointing's writer needs it
        "pybind11",  # builds megatron-core's C++ dataset helpers if its install lacks them (fp8flow_megatron.data)
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        # apex is optional and not on the package registry; nothing here requires it.
        "gpu": ["transformer-engine[pytorch]>=2.12"],
    },
)
