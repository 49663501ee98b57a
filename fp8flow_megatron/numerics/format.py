"""The E4M3 format, the blockwise FP8 container, and the one scale rule everything else uses.

This module is the single home of the scale convention (DESIGN.md §2): power-of-two scales computed from the fp32
block amax exactly as TE's ``compute_scale_from_amax(force_pow_2_scales=True, epsilon=0)`` does, so codes and scales
produced here are bit-identical to TE's ``Float8BlockQuantizer(E4M3, force_pow_2_scales=True, amax_epsilon=0)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_MIN_NORMAL_EXP = -6  # smallest normal: 2^-6
E4M3_SUBNORMAL_STEP_EXP = -9  # subnormal spacing: 2^-9
E4M3_MAX_CODE = 0x7E  # +448; 0x7F is NaN in the fn variant (no infinities)
BLOCK = 128
ROWWISE_1X128 = (1, BLOCK)
BLOCK_128X128 = (BLOCK, BLOCK)
# TE replaces an infinite scale (amax so small that 448/amax overflows fp32) by FLT_MAX, whose mantissa is then
# cleared: 2^127.
SCALE_FOR_INF = 2.0**127

_EXP_MASK = 0x7F800000  # sign and mantissa cleared: floor to a power of two (scale is positive)


@dataclass
class Fp8Blockwise:
    """A blockwise-scaled E4M3 tensor.

    data:      torch.float8_e4m3fn, [M, K], row-major.
    scale_inv: torch.float32, one entry per block: [M, ceil(K/128)] for block (1, 128),
               [ceil(M/128), ceil(K/128)] for block (128, 128). Every entry is a power of two; dequantized
               value = float(data) * scale_inv of its block.
    block:     (1, 128) for activations/gradients, (128, 128) for weights.

    A column-wise (128x1) operand is stored as the (1, 128) tensor of its transpose (see scaling_aware_transpose).
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: Tuple[int, int] = ROWWISE_1X128

    def __post_init__(self) -> None:
        self.block = tuple(self.block)
        if self.block not in (ROWWISE_1X128, BLOCK_128X128):
            raise ValueError(f"Fp8Blockwise.block must be (1, 128) or (128, 128), got {self.block}")
        if self.data.dtype != FP8_DTYPE:
            raise TypeError(f"Fp8Blockwise.data must be torch.float8_e4m3fn, got {self.data.dtype}")
        if self.scale_inv.dtype != torch.float32:
            raise TypeError(f"Fp8Blockwise.scale_inv must be torch.float32, got {self.scale_inv.dtype}")
        if self.data.dim() != 2:
            raise ValueError(f"Fp8Blockwise.data must be 2-D [M, K], got shape {tuple(self.data.shape)}")
        expected = scale_shape(self.data.shape, self.block)
        if tuple(self.scale_inv.shape) != expected:
            raise ValueError(
                f"Fp8Blockwise.scale_inv has shape {tuple(self.scale_inv.shape)}, expected {expected} for data "
                f"{tuple(self.data.shape)} with block {self.block}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes of codes plus scales: what this tensor costs on the wire or in memory."""
        return self.data.numel() * self.data.element_size() + self.scale_inv.numel() * 4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table (index map, split sizes) -> device without synchronizing the stream: pinned staging and a
    non-blocking copy (a pageable .to(cuda) waits for the stream; the caching host allocator keeps the pinned block
    alive until the copy is done). Other devices get a plain .to()."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def scale_shape(data_shape, block) -> Tuple[int, int]:
    m, k = data_shape
    return (ceil_div(m, block[0]), ceil_div(k, block[1]))


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale (fp32) from a block amax (fp32), TE's rule with force_pow_2_scales=True, epsilon=0.

    scale = fl32(448 / amax) with its mantissa bits cleared; amax 0, inf or NaN -> 1; infinite scale -> 2^127.
    """
    amax = amax.to(torch.float32)
    scale = torch.full_like(amax, E4M3_MAX) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, SCALE_FOR_INF), scale)
    scale = (scale.view(torch.int32) & _EXP_MASK).view(torch.float32)
    bad_amax = (amax == 0) | torch.isinf(amax) | torch.isnan(amax)
    return torch.where(bad_amax, torch.ones_like(scale), scale)


def check_nonfinite_flag(flag, device, op: str) -> None:
    """The error for a bad `nonfinite_flag` argument of a quantizer: None, or a 1-element torch.int32 tensor on the
    data's device (a slot of ops.nonfinite's per-device buffer)."""
    if flag is None:
        return
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1:
        got = f"{flag.dtype} tensor of shape {tuple(flag.shape)}" if isinstance(flag, torch.Tensor) else type(flag).__name__
        raise TypeError(f"{op}: nonfinite_flag must be None or a 1-element torch.int32 tensor, got a {got}")
    if flag.device != torch.device(device):
        raise ValueError(f"{op}: nonfinite_flag is on {flag.device} but the data on {device}; use a flag on the data's device")


def mark_nonfinite(flag, amax: torch.Tensor) -> None:
    """flag |= 1 when any entry of `amax` (block amaxes, fp32, NaN-propagating as torch's amax is) is inf or NaN: in
    place and on the device, so a quantizer can raise the flag without a host sync. flag: None (no-op) or a 1-element
    int32 tensor. The block amax is what every quantizer computes anyway, so the spec checks it rather than making a
    second pass over the data."""
    if flag is not None:
        flag.bitwise_or_((~torch.isfinite(amax)).any().to(torch.int32))


def saturating_cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3 with round-to-nearest-even, saturating to ±448 (NaN stays NaN, ±inf -> ±448, -0 stays -0).

    torch's cast alone maps values past the top of the range to NaN (the fn format has no inf), so clamp first;
    clamp is exact on the values it leaves alone and keeps the sign of zero.
    """
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
