"""One-shot weight pruning: modifiers that zero weights of decoder linears.

masks.py      exact-count masks from scores (per row, per matrix, N:M)
magnitude.py  |W| (per linear or global), no data
wanda.py      |W| * ||X||_2 per output row (Sun et al. 2023)
sparsegpt.py  OBS weight update with an adaptive mask per 128-column block (Frantar & Alistarh
              2023), on GPTQ's Hessian and layer-by-layer calibration
owl.py        outlier-weighted layer-wise sparsity (Yin et al. 2023) for Wanda and SparseGPT
structured.py whole MLP channels, KV groups and layers by calibration importance (Minitron,
              ShortGPT): a smaller dense model; shrink.py holds its counts and tensor surgery

This file holds what the zeroing modifiers share: `PruneModifier` (sparsity, mask_structure and
the resolve-time checks), the bookkeeping of what was pruned (`Session.sparse`: later modifiers
keep the zeros), the check that they were kept, and the sparsity_config summary.

Conventions: `sparsity` is the fraction of weights zeroed in each comparison group (a row for
Wanda, a 128-column block for SparseGPT, the matrix for magnitude), exactly floor(sparsity * n);
`mask_structure` "N:M" keeps at most N nonzero weights in every group of M consecutive input
columns (2:4 and 4:8 are 50% sparse).

What it does not know: how a sparse model is stored (fastserve.model.records / sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from fastserve.compress.modifier import (
    SPARSE_RECORD,
    LayerContext,
    LayerTarget,
    ModifierBase,
    ResolveState,
    Session,
    check_float,
)
from fastserve.errors import ConfigError
from fastserve.model.quantized import QuantLinear
from fastserve.model.sparse import UNSTRUCTURED, parse_structure, structure_sparsity


@dataclass
class PruneModifier(ModifierBase):
    """A modifier that zeroes weights: how many, and in what pattern."""

    # Fraction of weights zeroed per comparison group, in [0, 1). With an N:M structure it must be
    # 1 - N/M (or null, which means that).
    sparsity: float | None = 0.5
    mask_structure: str = UNSTRUCTURED  # "unstructured" or "N:M" (at most N nonzero per M)

    prunes: ClassVar[bool] = True
    record_key: ClassVar[str] = SPARSE_RECORD

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_structure(self.mask_structure)

    @property
    def target_sparsity(self) -> float:
        """The sparsity asked for (an N:M structure's when `sparsity` is null)."""
        implied = structure_sparsity(self.mask_structure)
        return implied if self.sparsity is None else self.sparsity

    def layer_sparsity(self, layer_idx: int) -> float:
        """The sparsity of decoder layer `layer_idx` (uniform; OWL overrides it)."""
        return self.target_sparsity

    def validate(self) -> None:
        super().validate()
        if isinstance(self.mask_structure, int) and not isinstance(self.mask_structure, bool):
            raise ValueError(  # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
                f"mask_structure must be a string such as '2:4', got the number "
                f'{self.mask_structure} (quote N:M in YAML: mask_structure: "2:4")'
            )
        nm = self.nm  # ValueError naming mask_structure
        if self.sparsity is None and nm is None:
            raise ValueError("sparsity must be a number in [0.0, 1.0), got None")
        if self.sparsity is not None:
            check_float(self.sparsity, "sparsity", 0.0, 1.0)
        implied = structure_sparsity(self.mask_structure)
        if (
            implied is not None
            and self.sparsity is not None
            and abs(self.sparsity - implied) > 1e-9
        ):
            raise ValueError(
                f"sparsity {self.sparsity} does not match mask_structure {self.mask_structure} "
                f"(which zeroes {implied:g} of the weights): set sparsity to {implied:g} or null"
            )

    def check_targets(
        self, targets: list[LayerTarget], where: str, state: ResolveState, index: int
    ) -> None:
        """Float targets (prune before quantizing), in_features a multiple of M, pruned once."""
        super().check_targets(targets, where, state, index)
        nm = self.nm
        for t in targets:
            if nm is not None and t.in_features % nm[1]:
                raise ConfigError(
                    f"{where}: {t.name}: mask_structure {self.mask_structure} needs in_features "
                    f"divisible by {nm[1]}, got {t.in_features}"
                )
            if t.name in state.pruned_by:
                raise ConfigError(
                    f"{where}: {t.name} is already pruned by modifier {state.pruned_by[t.name] + 1}"
                )
            state.pruned_by[t.name] = index

    def finalize(self, session: Session, targets: list[LayerTarget]) -> None:
        check_masks_kept(session, [t.name for t in targets])


def apply_mask(
    ctx: LayerContext, name: str, mask: Tensor, structure: str, weight: Tensor | None = None
) -> None:
    """Zero the pruned weights of linear `name` (layer-relative; `weight`: the updated weight to
    store first, as SparseGPT's) and record it in the session as pruned with `structure`."""
    linear = ctx.layer.get_submodule(name)
    if weight is not None:
        linear.weight.data.copy_(weight)
    linear.weight.data.masked_fill_(mask, 0.0)
    full = ctx.full_name(name)
    ctx.session.sparse[full] = structure
    ctx.session.num_pruned[full] = int(mask.sum())


def _final_weight(module: nn.Module) -> Tensor:
    return module.dequantize() if isinstance(module, QuantLinear) else module.weight.detach()


def check_masks_kept(session: Session, names: list[str]) -> None:
    """RuntimeError when a later modifier refilled weights a pruning modifier zeroed (GPTQ holds
    them at the zero code, RTN and AWQ keep 0 exactly: this guards that invariant)."""
    for name in names:
        w = _final_weight(session.model.get_submodule(name))
        zeros = int((w == 0).sum())
        if zeros < session.num_pruned.get(name, 0):
            raise RuntimeError(
                f"{name}: {session.num_pruned[name]} weights were pruned but only {zeros} are "
                "still zero after the recipe's later modifiers"
            )


def sparsity_summary(modifiers: list[Any], session: Session, recipe_name: str) -> dict[str, Any]:
    """The compressor's side of config.json's sparsity_config: method, recipe, and the pruned
    modules with their structure (save_model measures and stores the rest)."""
    return {
        "method": "+".join(m.type.lower() for m in modifiers),
        "recipe": recipe_name,
        "modules": {name: {"structure": s} for name, s in session.sparse.items()},
    }
