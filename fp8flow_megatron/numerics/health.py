"""FP8 health telemetry: how much of a tensor FP8 lost (underflow), clipped (saturation) or could not represent.

FP8 underflow silently starves router and expert gradients: a gradient block whose amax is large quantizes its small
entries to zero. These statistics are what the trainer logs so that users can see it happen.
"""

from __future__ import annotations

from typing import Dict

import torch

from .format import E4M3_MAX, Fp8Blockwise
from .quantize import expand_scale_inv


def fp8_health(x: torch.Tensor, q: Fp8Blockwise) -> Dict[str, float]:
    """Statistics of quantizing x (high precision, [M, K]) into q (its FP8 form, same shape).

    Returns a dict of Python numbers:
      numel            elements in x
      nonfinite        count of NaN/inf inputs (a reliability event: callers should fail loudly on it)
      nonzero          count of finite nonzero inputs
      underflow_frac   fraction of finite nonzero inputs whose code is (signed) zero: information FP8 lost
      saturated_frac   fraction of finite inputs whose code is ±448 (at the top of the E4M3 range)
      clipped_frac     fraction of finite inputs with |x * scale| > 448, i.e. clipped rather than rounded to 448
      scale_inv_min, scale_inv_max   range of the scale_inv of the blocks that hold a finite nonzero input (nan
                       when there is none: an all-zero block's scale says nothing about the data's range)
    """
    if tuple(x.shape) != tuple(q.data.shape):
        raise ValueError(f"fp8_health: x {tuple(x.shape)} and q {tuple(q.data.shape)} differ in shape")
    x32 = x.detach().to(torch.float32)
    codes = q.data.detach().view(torch.uint8)
    finite = torch.isfinite(x32)
    nonzero = finite & (x32 != 0)
    code_zero = (codes & 0x7F) == 0
    code_max = (codes & 0x7F) == 0x7E
    block_scale_inv = expand_scale_inv(q)
    scaled = x32 / block_scale_inv
    clipped = finite & (scaled.abs() > E4M3_MAX)
    n_finite = int(finite.sum())
    n_nonzero = int(nonzero.sum())
    s = block_scale_inv[nonzero]
    return {
        "numel": x32.numel(),
        "nonfinite": x32.numel() - n_finite,
        "nonzero": n_nonzero,
        "underflow_frac": float((nonzero & code_zero).sum()) / n_nonzero if n_nonzero else 0.0,
        "saturated_frac": float((code_max & finite).sum()) / n_finite if n_finite else 0.0,
        "clipped_frac": float(clipped.sum()) / n_finite if n_finite else 0.0,
        "scale_inv_min": float(s.min()) if s.numel() else float("nan"),
        "scale_inv_max": float(s.max()) if s.numel() else float("nan"),
    }
