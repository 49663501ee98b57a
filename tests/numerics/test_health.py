import math

import pytest
import torch

from fp8flow_megatron.numerics import fp8_health, quantize_1x128


def test_health_counts_underflow_saturation_and_nonfinite():
    x = torch.zeros(4, 128)
    x[0, 0] = 1000.0
    x[0, 1:11] = 1e-6  # 10 values that underflow next to a large amax
    x[1, :] = 1.0
    x[2, 3] = float("nan")
    x[3, 4] = float("inf")
    q = quantize_1x128(x)
    h = fp8_health(x, q)
    assert h["nonfinite"] == 2 and h["numel"] == 512
    assert h["nonzero"] == 1 + 10 + 128
    assert h["underflow_frac"] == pytest.approx(10 / 139)
    # row 0: 1000 -> scale 0.25 -> 250 (not max); row 1: all 1.0 -> scale 256 -> 256; row 3: inf saturates but is
    # not finite, so it is counted as nonfinite, not as saturated
    assert h["saturated_frac"] == 0.0 and h["clipped_frac"] == 0.0
    assert h["scale_inv_min"] == pytest.approx(1 / 256) and h["scale_inv_max"] == 4.0


def test_health_saturated_and_empty():
    x = torch.full((1, 128), 448.0)
    h = fp8_health(x, quantize_1x128(x))
    assert h["saturated_frac"] == 1.0 and h["underflow_frac"] == 0.0
    e = torch.zeros(0, 128)
    he = fp8_health(e, quantize_1x128(e))
    assert he["numel"] == 0 and math.isnan(he["scale_inv_min"])
    with pytest.raises(ValueError, match="differ in shape"):
        fp8_health(torch.zeros(2, 128), quantize_1x128(torch.zeros(1, 128)))
