"""Triton, when it is installed: the kernel modules import ``jit`` and ``tl`` from here so they import on CPU-only
machines (CI has no Triton); launching a kernel there raises ``require_triton``'s error instead."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except ImportError:  # CPU-only install: kernel bodies are defined but never compiled
    triton = None
    libdevice = None
    HAVE_TRITON = False

    class _TritonLanguageMissing:
        @staticmethod
        def constexpr(value=None):  # module constants and kernel annotations; nothing else runs without Triton
            return value

    tl = _TritonLanguageMissing()


def jit(fn=None, **kwargs):
    """``triton.jit`` when Triton is importable, else the plain function (never launched)."""
    if fn is None:
        return lambda f: jit(f, **kwargs)
    return triton.jit(fn, **kwargs) if HAVE_TRITON else fn


def require_triton(op: str) -> None:
    if not HAVE_TRITON:
        raise RuntimeError(f"{op} needs Triton (pip install triton; it ships with CUDA builds of torch)")


def require_cuda(op: str, *tensors) -> None:
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise ValueError(f"{op} runs on CUDA tensors; got a tensor on {t.device} (use fp8flow_megatron.numerics)")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
