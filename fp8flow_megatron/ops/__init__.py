"""Autograd operations composing the FP8 kernels (or their pure-torch twins on CPU)."""
