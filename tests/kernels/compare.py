"""Comparators for the GPU kernel tests: bitwise (first mismatching coordinate and both values in the message) and
E4M3 ulp steps (for kernels whose fp32 math is not reproducible bit for bit)."""

from __future__ import annotations

import torch


def assert_bitwise_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got, ref = got.detach().cpu(), ref.detach().cpu()
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} vs reference {ref.dtype}"
    if got.numel() == 0:
        return
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    g, r = got.contiguous().view(as_int), ref.contiguous().view(as_int)
    bad = (g != r).nonzero()
    if bad.numel():
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {got.numel()} elements differ; first at {first}: "
            f"{got[first].item()!r} (bits {int(g[first]) & 0xFFFFFFFF:#x}) vs reference {ref[first].item()!r} "
            f"(bits {int(r[first]) & 0xFFFFFFFF:#x})"
        )


def e4m3_signed_steps(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 codes -> int32 on a line where adjacent representable values differ by 1 (+0 and -0 are both 0)."""
    c = codes.detach().cpu().contiguous().view(torch.uint8).to(torch.int32)
    mag = c & 0x7F
    return torch.where(c >= 0x80, -mag, mag)


def e4m3_step_mismatch(got: torch.Tensor, ref: torch.Tensor, what: str, max_steps: int = 1) -> float:
    """Asserts every code is within max_steps E4M3 steps of the reference; returns the fraction that differ."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    if got.numel() == 0:
        return 0.0
    diff = (e4m3_signed_steps(got) - e4m3_signed_steps(ref)).abs()
    worst = int(diff.max())
    if worst > max_steps:
        first = tuple((diff == worst).nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: a code is {worst} E4M3 steps from the reference (limit {max_steps}) at {first}: "
            f"{int(got.cpu().view(torch.uint8)[first]):#04x} vs {int(ref.cpu().view(torch.uint8)[first]):#04x}"
        )
    return float((diff > 0).float().mean())
