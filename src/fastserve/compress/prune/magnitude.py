"""Magnitude pruning: zero the weights of smallest |w|, per linear or over all targets at once.

    mask = magnitude_mask(w, 0.5)                          # floor(0.5 * numel) smallest |w|
    mask = magnitude_mask(w, 0.5, nm=(2, 4))               # 2 kept in every 4 input columns
    masks = global_magnitude_masks({"a": w1, "b": w2}, 0.5)   # one threshold for all

The baseline of the pruning papers (Llama-2-7B at 50%: wikitext-2 ppl 5.12 dense, 14.89
magnitude, 6.51 SparseGPT, 6.42 Wanda): no data, no weight update. `scope: global` ranks every
target of the recipe together (exactly floor(s * total) weights, ties to the earlier linear and
index), so layers with small weights lose more.

What it does not know: activations (wanda.py, sparsegpt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastserve.compress.modifier import LayerContext, LayerTarget, Session
from fastserve.compress.prune import PruneModifier, apply_mask
from fastserve.compress.prune.masks import num_to_prune, structured_mask

SCOPES = ("layer", "global")


def magnitude_mask(w: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Pruned weights of w [out, in]: per matrix (unstructured) or per N:M group."""
    return structured_mask(w.detach().abs().float(), sparsity, nm, per_row=False)


def global_magnitude_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One ranking of |w| over every weight given: exactly floor(sparsity * total) pruned."""
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights.values()])
    k = num_to_prune(flat.numel(), sparsity)
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        threshold = torch.kthvalue(flat, k).values
        pruned = flat < threshold
        ties = torch.nonzero(flat == threshold).reshape(-1)
        pruned[ties[: k - int(pruned.sum())]] = True
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = pruned[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


@dataclass
class MagnitudeModifier(PruneModifier):
    """Zero the smallest |w| of each target (scope layer) or of all targets together (global)."""

    scope: str = "layer"  # "layer": each linear on its own; "global": one ranking (unstructured)

    type: ClassVar[str] = "Magnitude"
    needs_data: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope global ranks unstructured sparsity; N:M groups are local")

    def initialize(self, session: Session, targets: list[LayerTarget]) -> None:
        self._global_masks: dict[str, Tensor] = {}
        if self.scope == "global":
            weights = {t.name: session.model.get_submodule(t.name).weight for t in targets}
            self._global_masks = global_magnitude_masks(weights, self.target_sparsity)

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        for name, t in ctx.targets.items():
            w = ctx.layer.get_submodule(name).weight
            if self.scope == "global":
                mask = self._global_masks.pop(t.name).to(w.device)
            else:
                mask = magnitude_mask(w, self.target_sparsity, self.nm)
            apply_mask(ctx, name, mask, self.mask_structure)
        return {}
