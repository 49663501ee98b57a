"""fp8flow_megatron: casting-free FP8 MoE dataflow (FP8-Flow-MoE) for Megatron-core and TransformerEngine."""

__version__ = "0.1.0"
