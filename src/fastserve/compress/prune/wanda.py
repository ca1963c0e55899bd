"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

    acc = SquaredNormAccumulator(in_features); acc.add(x)      # every calibration input
    mask = wanda_mask(w, acc.sum, 0.5)                          # floor(0.5 * in) per row
    mask = wanda_mask(w, acc.sum, 0.5, nm=(2, 4))               # N:M groups of input columns

||X_j||_2 is the norm of input channel j over all calibration tokens, so a small weight on a
large-activation channel survives where magnitude pruning would drop it. No weight update. The
statistics come from GPTQ's true-sequential layer walk (`quant.gptq.sequential_groups`): each
linear group's inputs are produced by the already pruned groups before it.

What it does not know: the OWL allocation (owl.py), how layers are walked (the compressor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.modifier import LayerContext
from fastserve.compress.prune import apply_mask
from fastserve.compress.prune.masks import structured_mask
from fastserve.compress.prune.owl import OWLPruneModifier
from fastserve.compress.quant.gptq import sequential_groups


class SquaredNormAccumulator:
    """Running sum over calibration tokens of x_j^2 per input channel (float64)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)

    @classmethod
    def for_linear(cls, linear: nn.Linear) -> SquaredNormAccumulator:
        return cls(linear.in_features, device=linear.weight.device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        self.sum += x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)


def wanda_scores(w: Tensor, sq_norm: Tensor) -> Tensor:
    """|W| * ||X_j||_2 [out, in] from the per-channel sums of squares [in]."""
    return w.detach().abs().double() * sq_norm.sqrt()[None, :]


def wanda_mask(
    w: Tensor, sq_norm: Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> Tensor:
    """Pruned weights of w [out, in]: per output row (unstructured) or per N:M group."""
    return structured_mask(wanda_scores(w, sq_norm), sparsity, nm, per_row=True)


@dataclass
class WandaModifier(OWLPruneModifier):
    """Wanda: |W| * ||X||_2 per output row; optional OWL per-layer sparsities."""

    type: ClassVar[str] = "Wanda"

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        sparsity = self.layer_sparsity(ctx.layer_idx)
        groups = sequential_groups(
            ctx.layer, ctx.run, list(ctx.targets), SquaredNormAccumulator.for_linear
        )
        for names, acc in groups:
            for n in names:
                w = ctx.layer.get_submodule(n).weight
                apply_mask(ctx, n, wanda_mask(w, acc.sum, sparsity, self.nm), self.mask_structure)
        return {}
