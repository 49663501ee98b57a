"""FP8 health telemetry gathered along the dataflow, read by the trainer once per log interval.

Observing costs passes over the tensors (and host syncs on GPU), so it runs only while `monitor.enabled` is set -- the
trainer turns it on for the iterations it logs; on every other iteration each hook is one attribute test and nothing
touches the device. Non-finite values are not this module's business: the non-finite guard (ops/nonfinite.py) sees
them at every quantizer on every iteration and stops the run at the end of the step, on every rank together; the
statistics here count finite values only.

What is recorded, per MoE layer (sites are named "layer{N}/{site}"; a site without a layer prefix is pooled only):
  FP8 quantization sites (FP8-Flow): tokens (cast #1, before dispatch), combine_grad (cast #2), swiglu_out (the fc2
      input), dswiglu_out (the fc1 output gradient): underflow fraction (finite nonzero inputs coded 0), saturation
      fraction (codes at +-448), and the range of the power-of-two block scales (log2 of scale_inv).
  Routing (every mode, through megatron's router; see megatron/telemetry.py): tokens per expert summed over the
      iteration's micro-batches -> dead-expert fraction and load imbalance (max / mean tokens per expert), and the L2
      norm of the router logits' gradient over the iteration.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Optional

import torch

from ..numerics import Fp8Blockwise, fp8_health


def split_site(site: str):
    """'layer3/tokens' -> ('layer3', 'tokens'); 'tokens' -> (None, 'tokens')."""
    layer, _, name = site.rpartition("/")
    return (layer or None), name


class Fp8HealthMonitor:
    def __init__(self) -> None:
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self._sites: Dict[str, Dict[str, float]] = defaultdict(
            lambda: {"nonzero": 0.0, "underflow": 0.0, "numel": 0.0, "saturated": 0.0, "exp_min": math.inf,
                     "exp_max": -math.inf}
        )
        # layer -> tokens per expert (device tensor, summed over micro-batches) / sum of squared logits-grad norms
        self._tokens_per_expert: Dict[str, torch.Tensor] = {}
        self._router_grad_sq: Dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- FP8 sites
    def observe(self, site: str, x: torch.Tensor, q: Fp8Blockwise) -> None:
        """x: the high-precision tensor [M, K] that was quantized into q (same shape)."""
        if not self.enabled:
            return
        # An inf or NaN is left to the non-finite guard, which raises at the end of the step on every rank together:
        # raising here, inside one rank's forward or backward, would leave its peers waiting in the next collective.
        h = fp8_health(x, q)
        s = self._sites[site]
        s["nonzero"] += h["nonzero"]
        s["underflow"] += h["underflow_frac"] * h["nonzero"]
        s["numel"] += h["numel"]
        s["saturated"] += h["saturated_frac"] * h["numel"]
        # power-of-two scales: log2(scale_inv) is the block exponent; 0 (an all-zero block) carries none
        for key, value, pick in (("exp_min", h["scale_inv_min"], min), ("exp_max", h["scale_inv_max"], max)):
            if value > 0 and math.isfinite(value):
                s[key] = pick(s[key], math.log2(value))

    # ------------------------------------------------------------------------------------------------ routing
    def observe_routing(self, layer: str, tokens_per_expert: torch.Tensor) -> None:
        """tokens_per_expert: [num_experts] counts of one micro-batch's routing (any device; no sync here)."""
        if not self.enabled:
            return
        counts = tokens_per_expert.detach().to(torch.float64)
        prev = self._tokens_per_expert.get(layer)
        self._tokens_per_expert[layer] = counts if prev is None else prev + counts

    def observe_router_grad(self, layer: str, grad_logits: torch.Tensor) -> None:
        """grad_logits: the gradient of one micro-batch's router logits [tokens, num_experts] (no sync here)."""
        if not self.enabled:
            return
        sq = grad_logits.detach().to(torch.float32).square().sum().to(torch.float64)
        prev = self._router_grad_sq.get(layer)
        self._router_grad_sq[layer] = sq if prev is None else prev + sq

    # ------------------------------------------------------------------------------------------------ summary
    def summary(self, group: Optional["torch.distributed.ProcessGroup"] = None) -> Dict[str, float]:
        """The logged iteration's statistics as a flat dict of Python floats (host syncs happen here).

        group: the data-parallel group; when given (and torch.distributed is initialized), tokens per expert and
        router-gradient norms are summed over it, so every rank reports the global batch's routing. All ranks must
        then call summary() together.

        Pooled keys: underflow_frac, saturated_frac (over all FP8 sites), dead_expert_frac (over all (layer, expert)
        slots), load_imbalance (max over layers of max/mean tokens per expert), router_grad_norm (L2 over layers).
        Per site: underflow_frac/{site}, saturated_frac/{site}, scale_exp_min/{site}, scale_exp_max/{site} for the
        site pooled over layers, and the same with "{layer}/{site}" per layer. Per layer: {layer}/dead_expert_frac,
        {layer}/load_imbalance, {layer}/router_grad_norm.
        """
        out: Dict[str, float] = {}
        self._summarize_sites(out)
        self._summarize_routing(out, group)
        return out

    def _summarize_sites(self, out: Dict[str, float]) -> None:
        pooled: Dict[str, Dict[str, float]] = {}
        for site, s in self._sites.items():
            _, name = split_site(site)
            p = pooled.setdefault(name, {"nonzero": 0.0, "underflow": 0.0, "numel": 0.0, "saturated": 0.0,
                                         "exp_min": math.inf, "exp_max": -math.inf})
            for k in ("nonzero", "underflow", "numel", "saturated"):
                p[k] += s[k]
            p["exp_min"], p["exp_max"] = min(p["exp_min"], s["exp_min"]), max(p["exp_max"], s["exp_max"])
        per_layer = {site: s for site, s in self._sites.items() if split_site(site)[0]}
        for table in (pooled, per_layer):
            for site, s in table.items():
                out[f"underflow_frac/{site}"] = s["underflow"] / s["nonzero"] if s["nonzero"] else 0.0
                out[f"saturated_frac/{site}"] = s["saturated"] / s["numel"] if s["numel"] else 0.0
                if math.isfinite(s["exp_min"]):
                    out[f"scale_exp_min/{site}"] = s["exp_min"]
                    out[f"scale_exp_max/{site}"] = s["exp_max"]
        nz = sum(s["nonzero"] for s in pooled.values())
        n = sum(s["numel"] for s in pooled.values())
        out["underflow_frac"] = sum(s["underflow"] for s in pooled.values()) / nz if nz else 0.0
        out["saturated_frac"] = sum(s["saturated"] for s in pooled.values()) / n if n else 0.0

    def _summarize_routing(self, out: Dict[str, float], group) -> None:
        layers = sorted(self._tokens_per_expert, key=_layer_order)
        seen, empty, imbalance = 0, 0, []
        if layers:
            stacked = torch.stack([self._tokens_per_expert[k] for k in layers])  # [layers, experts]
            grad_layers = sorted(self._router_grad_sq, key=_layer_order)
            grads = torch.stack([self._router_grad_sq[k] for k in grad_layers]) if grad_layers else None
            if group is not None and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stacked, group=group)
                if grads is not None:
                    torch.distributed.all_reduce(grads, group=group)
            stacked = stacked.cpu()
            for layer, counts in zip(layers, stacked):
                dead = int((counts == 0).sum())
                mean = float(counts.mean())
                out[f"{layer}/dead_expert_frac"] = dead / counts.numel()
                out[f"{layer}/load_imbalance"] = float(counts.max()) / mean if mean > 0 else 0.0
                seen, empty = seen + counts.numel(), empty + dead
                imbalance.append(out[f"{layer}/load_imbalance"])
            if grads is not None:
                grads = grads.cpu()
                for layer, sq in zip(grad_layers, grads):
                    out[f"{layer}/router_grad_norm"] = math.sqrt(float(sq))
                out["router_grad_norm"] = math.sqrt(float(grads.sum()))
        out["dead_expert_frac"] = empty / seen if seen else 0.0
        if imbalance:
            out["load_imbalance"] = max(imbalance)


def _layer_order(layer: str):
    digits = "".join(c for c in layer if c.isdigit())
    return (int(digits) if digits else -1, layer)


monitor = Fp8HealthMonitor()
