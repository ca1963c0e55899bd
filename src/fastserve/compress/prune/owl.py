"""OWL (Yin et al. 2023): outlier-weighted layer-wise sparsity. Layers with more activation
outliers keep more weights; the sparsities average to the target.

    ratios = layer_outlier_ratios(session, targets, m=5.0)   # one dense pass, {layer: D_l}
    sparsities = owl_sparsities([ratios[l] for l in layers], target=0.5, lmbda=0.08)

Per decoder layer l, with A = |W| * ||X||_2 (Wanda's score) over all its target linears:
    D_l = #{A > m * mean(A)} / #A                       the layer outlier distribution
    r_l = (D_l - min D) / (max D - min D) * 2 lmbda     in [0, 2 lmbda] (0 when all are equal)
    density_l = r_l - mean(r) + 1 - target,  sparsity_l = 1 - density_l
so sparsity_l lies in [target - 2 lmbda, target + 2 lmbda] and the mean is exactly the target
(validated: 2 lmbda <= target and target + 2 lmbda < 1, so no clamping is ever needed). The
defaults m = 5, lmbda = 0.08 are llm-compressor's (`owl_m`, `owl_lmbda`).

The ratios are measured on the dense model before any layer is pruned (one extra calibration
pass over all layers), as in the paper.

What it does not know: the pruning itself (wanda.py, sparsegpt.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastserve.compress.calibration import LayerWalker, capture_inputs
from fastserve.compress.modifier import LayerTarget, Session, check_float
from fastserve.compress.prune import PruneModifier

PROFILES = (None, "owl")


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """D = fraction of the scores (all linears of a layer together) above m times their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], target: float, lmbda: float) -> list[float]:
    """Per-layer sparsities from outlier ratios (module docstring); mean == target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min()) if len(ratios) else 0.0
    r = (r - r.min()) / spread * (2 * lmbda) if spread > 0 else torch.zeros_like(r)
    density = r - r.mean() + (1.0 - target)
    return [float(1.0 - d) for d in density]


@torch.no_grad()
def layer_outlier_ratios(
    session: Session, targets: list[LayerTarget], m: float
) -> dict[int, float]:
    """{layer index: D_l} for every layer holding a target, on the model as it is (dense)."""
    from fastserve.compress.prune.wanda import SquaredNormAccumulator, wanda_scores

    model = session.model
    by_layer: dict[int, list[LayerTarget]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_idx, []).append(t)
    walker = LayerWalker(model, session.input_ids, device=session.device)
    ratios = {}
    for idx in range(max(by_layer) + 1):
        layer = walker.layer(idx)
        if idx in by_layer:
            names = [t.local_name for t in by_layer[idx]]
            modules = {n: layer.get_submodule(n) for n in names}
            accs = {n: SquaredNormAccumulator.for_linear(mod) for n, mod in modules.items()}
            with capture_inputs(modules, lambda n, args, accs=accs: accs[n].add(args[0])):
                walker.run_all(layer)
            scores = [wanda_scores(modules[n].weight, accs[n].sum) for n in names]
            ratios[idx] = outlier_ratio(scores, m)
        if idx < max(by_layer):
            walker.advance(layer)
        model.model.layers[idx] = layer.to("cpu")
    return ratios


@dataclass
class OWLPruneModifier(PruneModifier):
    """A data-aware pruning modifier whose per-layer sparsity may follow OWL."""

    sparsity_profile: str | None = None  # None: the same sparsity in every layer; "owl"
    owl_m: float = 5.0  # outlier threshold: A > owl_m * mean(A)
    owl_lmbda: float = 0.08  # half-width of the per-layer sparsity range around the target

    def validate(self) -> None:
        super().validate()
        if self.sparsity_profile not in PROFILES:
            raise ValueError(
                f"sparsity_profile must be null or 'owl', got {self.sparsity_profile!r}"
            )
        if self.sparsity_profile is None:
            return
        if self.nm is not None:
            raise ValueError("sparsity_profile owl needs mask_structure unstructured")
        check_float(self.owl_m, "owl_m", 0.0, float("inf"))
        check_float(self.owl_lmbda, "owl_lmbda", 0.0, 0.5)
        s = self.target_sparsity
        if 2 * self.owl_lmbda > s or s + 2 * self.owl_lmbda >= 1:
            raise ValueError(
                f"owl_lmbda {self.owl_lmbda}: OWL sparsities span sparsity +- 2 * owl_lmbda, "
                f"which must stay in [0, 1) for sparsity {s}"
            )

    def initialize(self, session: Session, targets: list[LayerTarget]) -> None:
        self._layer_sparsity: dict[int, float] = {}
        if self.sparsity_profile == "owl":
            ratios = layer_outlier_ratios(session, targets, self.owl_m)
            layers = sorted(ratios)
            values = owl_sparsities(
                [ratios[i] for i in layers], self.target_sparsity, self.owl_lmbda
            )
            self._layer_sparsity = dict(zip(layers, values))

    def layer_sparsities(self) -> dict[int, float]:
        """The per-layer sparsities of the last run (empty without OWL)."""
        return dict(getattr(self, "_layer_sparsity", {}))

    def layer_sparsity(self, layer_idx: int) -> float:
        return getattr(self, "_layer_sparsity", {}).get(layer_idx, self.target_sparsity)
