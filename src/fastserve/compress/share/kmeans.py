"""K-means weight sharing (Han et al. 2016, "Deep Compression"): per tensor, the nonzero weights
are clustered in 1-D into 2^bits centroids and each is replaced by its nearest centroid.

    result = kmeans_1d(values, num_clusters=16)   # centroids [16], assignment [n], losses
    shared, result = share_weight(w, bits=4)      # zeros stay exact zeros, not a centroid

Initialisation is linear: 2^bits centroids evenly spaced over [min, max] of the nonzero weights
(the paper's best of forgy / density / linear: it keeps centroids for the few large weights,
which matter most). Lloyd's iterations in 1-D, on the values sorted once (float64):

    sorted values   v_0 <= v_1 <= ... <= v_(n-1)
    assignment      cluster j = sorted range [b_j, b_(j+1)),  b = searchsorted(v, midpoints of c)
    update          c_j = (S[b_(j+1)] - S[b_j]) / (b_(j+1) - b_j),   S = prefix sums of v

so an iteration costs O(k log n), not O(n k). An empty cluster keeps its centroid (the
centroids stay sorted); the loop stops when the boundaries repeat (converged: the next update
would change nothing) or after max_iter updates. Both steps are exact Lloyd steps, so the squared
error never increases. The final assignment is to the nearest of the float32-rounded centroids
(what is stored), a value on a midpoint going to the larger one. Deterministic: no random
initialisation, no restarts.

The paper then fine-tunes the centroids by gradient descent; this is one-shot (no retraining).

What it does not know: storage (fastserve.model.shared, records.py), how weights were pruned (a
pruned weight is just a zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.modifier import (
    LayerContext,
    LayerTarget,
    ModifierBase,
    ResolveState,
    Session,
    check_bool,
    check_int,
)
from fastserve.model.shared import MAX_BITS, mark_shared


@dataclass
class KMeansResult:
    """One tensor's clustering."""

    centroids: Tensor  # float64 [k], sorted, each exactly a float32 value
    assignment: Tensor  # int64 [n]: the centroid of each value, in the values' order
    num_iters: int  # centroid updates run
    converged: bool  # the boundaries stopped moving before max_iter
    init_loss: float  # sum of squared errors with the linear initial centroids
    loss: float  # sum of squared errors with the final centroids and assignment


def _nearest(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of the sorted `centroids` for each value (midpoint -> the larger)."""
    return torch.searchsorted((centroids[:-1] + centroids[1:]) / 2, values, right=True)


def _sq_error(values: Tensor, centroids: Tensor, assignment: Tensor) -> float:
    return float((values - centroids[assignment]).pow(2).sum())


def kmeans_1d(values: Tensor, num_clusters: int, max_iter: int = 300) -> KMeansResult:
    """Lloyd's k-means of a 1-D tensor (module docstring); `values` must not be empty."""
    v = values.detach().reshape(-1).double()
    if v.numel() == 0 or num_clusters < 1:
        raise ValueError("kmeans_1d needs at least one value and one cluster")
    s = torch.sort(v).values
    n = s.numel()
    prefix = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
    init = torch.linspace(float(s[0]), float(s[-1]), num_clusters, dtype=torch.float64)
    c = init.clone()

    def boundaries(c: Tensor) -> Tensor:  # [k + 1]: b_0 = 0, ..., b_k = n
        inner = torch.searchsorted(s, (c[:-1] + c[1:]) / 2)
        return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), n)])

    b = boundaries(c)
    num_iters, converged = 0, False
    for num_iters in range(1, max_iter + 1):  # noqa: B007 - num_iters is the result
        counts = b[1:] - b[:-1]
        sums = prefix[b[1:]] - prefix[b[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new_b = boundaries(c)
        if torch.equal(new_b, b):
            converged = True
            break
        b = new_b
    centroids = c.float().double()  # what gets stored; the assignment is nearest to these
    assignment = _nearest(v, centroids)
    return KMeansResult(
        centroids,
        assignment,
        num_iters,
        converged,
        init_loss=_sq_error(v, init, _nearest(v, init)),
        loss=_sq_error(v, centroids, assignment),
    )


def share_weight(
    weight: Tensor, bits: int, max_iter: int = 300
) -> tuple[Tensor, KMeansResult | None]:
    """`weight` with each nonzero replaced by its k-means centroid (2^bits of them, computed on
    the nonzeros only), zeros kept; same shape and dtype. The result is None without nonzeros."""
    kept = weight != 0
    if not bool(kept.any()):
        return weight.detach().clone(), None
    result = kmeans_1d(weight[kept], 2**bits, max_iter)
    shared = torch.zeros_like(weight)
    shared[kept] = result.centroids[result.assignment].to(weight.dtype)
    return shared, result


def embedding_names(model: nn.Module) -> list[str]:
    """The embedding and, when not tied to it, the head of a LlamaForCausalLM."""
    names = ["model.embed_tokens"]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        names.append("lm_head")
    return names


@dataclass
class KMeansModifier(ModifierBase):
    """Per-tensor k-means weight sharing of the nonzero weights (2^bits centroids each)."""

    bits: int = 4  # 2^bits centroids per tensor, in [1, 8]
    max_iter: int = 300  # Lloyd updates at most (each O(2^bits log n): ~35 us at 4 bits)
    # Also share model.embed_tokens and, when not tied to it, lm_head (one codebook each).
    include_embeddings: bool = False

    type: ClassVar[str] = "KMeans"
    shares: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    record_key: ClassVar[str | None] = None  # SharedLinear modules announce weight_sharing_config

    def validate(self) -> None:
        super().validate()
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
        check_int(self.max_iter, "max_iter", 0)
        check_bool(self.include_embeddings, "include_embeddings")

    def check_targets(
        self, targets: list[LayerTarget], where: str, state: ResolveState, index: int
    ) -> None:
        """Float targets (share after pruning, never after quantizing); no later modifier may
        touch them (Recipe.resolve checks state.shared_by)."""
        super().check_targets(targets, where, state, index)
        for t in targets:
            state.shared_by[t.name] = index

    def _share(self, root: nn.Module, name: str) -> None:
        module = root.get_submodule(name)
        shared, _ = share_weight(module.weight.detach(), self.bits, self.max_iter)
        module.weight.data.copy_(shared)
        mark_shared(root, name, self.bits)

    def initialize(self, session: Session, targets: list[LayerTarget]) -> None:
        """The embeddings first, so that calibration inputs come from the shared embedding."""
        if self.include_embeddings:
            with torch.no_grad():
                for name in embedding_names(session.model):
                    self._share(session.model, name)

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        with torch.no_grad():
            for name in ctx.targets:
                self._share(ctx.layer, name)
        return {}
