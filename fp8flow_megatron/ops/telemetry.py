"""FP8 health telemetry gathered along the dataflow, read by the trainer once per log interval.

Observing costs a pass over the tensor (and a host sync on GPU), so it runs only while `monitor.enabled` is set --
the trainer turns it on for the iterations it logs. A non-finite value reaching an FP8 quantizer is a reliability
event: while observing, it raises FloatingPointError naming the site instead of letting NaN/inf turn into codes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict

import torch

from ..numerics import Fp8Blockwise, fp8_health


class Fp8HealthMonitor:
    def __init__(self) -> None:
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self._sites: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._experts_seen = 0
        self._experts_empty = 0

    def observe(self, site: str, x: torch.Tensor, q: Fp8Blockwise) -> None:
        if not self.enabled:
            return
        h = fp8_health(x, q)
        if h["nonfinite"]:
            raise FloatingPointError(
                f"fp8flow: {h['nonfinite']} non-finite values reached the FP8 quantizer at '{site}' "
                f"(shape {tuple(x.shape)}). Check the loss scale / learning rate, or run with "
                f"--no-moe-fp8-flow to see whether the model diverges without FP8."
            )
        s = self._sites[site]
        s["nonzero"] += h["nonzero"]
        s["underflow"] += h["underflow_frac"] * h["nonzero"]
        s["numel"] += h["numel"]
        s["saturated"] += h["saturated_frac"] * h["numel"]

    def observe_tokens_per_expert(self, tokens_per_expert) -> None:
        if not self.enabled:
            return
        counts = torch.as_tensor(tokens_per_expert)
        self._experts_seen += counts.numel()
        self._experts_empty += int((counts == 0).sum())

    def summary(self) -> Dict[str, float]:
        """underflow_frac and saturated_frac pooled over all observed sites, per-site underflow, and the fraction of
        (layer, expert) slots that received no token ('dead experts')."""
        out: Dict[str, float] = {}
        nz = sum(s["nonzero"] for s in self._sites.values())
        n = sum(s["numel"] for s in self._sites.values())
        out["underflow_frac"] = sum(s["underflow"] for s in self._sites.values()) / nz if nz else 0.0
        out["saturated_frac"] = sum(s["saturated"] for s in self._sites.values()) / n if n else 0.0
        for site, s in self._sites.items():
            out[f"underflow_frac/{site}"] = s["underflow"] / s["nonzero"] if s["nonzero"] else 0.0
        out["dead_expert_frac"] = self._experts_empty / self._experts_seen if self._experts_seen else 0.0
        return out


monitor = Fp8HealthMonitor()
