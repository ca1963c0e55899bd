"""SparseGPT (Frantar & Alistarh 2023): prune with an OBS weight update, choosing the mask
adaptively one block of 128 columns at a time, on GPTQ's Hessian.

    acc = HessianAccumulator(in_features); acc.add(x)          # every calibration input
    res = sparsegpt_prune(w, acc.hessian(), 0.5)                # unstructured 50%
    res = sparsegpt_prune(w, acc.hessian(), 0.5, nm=(2, 4))     # 2:4
    res.weight, res.mask, res.error

The math, for W [out, in] and H = 2 X X^T / n (quant/gptq.py's accumulator and Cholesky):
  1. dead inputs (H_jj == 0) get H_jj = 1 (their weights are kept: they do not matter on the
     calibration data and may elsewhere); H += dampening_frac * mean(diag H) * I
  2. U = upper Cholesky factor of H^-1 (the rows of the OBS updates, as in GPTQ)
  3. per block of block_size columns [i1, i2), on the weights as updated so far:
       unstructured: score = w^2 / U_jj^2 over the block, the lowest k_b entries pruned, where
         k_b = floor(s * out * i2) - floor(s * out * i1), so the matrix prunes exactly
         floor(s * out * in) and each block its share (the adaptive mask: rows differ)
       N:M: at every M-th column the same score over the next M columns, per row, prunes the
         M - N lowest
     then column by column: q = w with the pruned entries 0, e = (w - q) / U_jj, the columns
     after it in the block -= e U_j,, and after the block the later columns get the block's
     errors in one matmul (GPTQ's lazy batch).
With sparsity 0 nothing is pruned, every error is 0 and W comes back unchanged.

What it does not know: quantization (a GPTQ modifier after it keeps the mask: quant/gptq.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fastserve.compress.modifier import LayerContext, check_float, check_int
from fastserve.compress.prune import apply_mask
from fastserve.compress.prune.masks import lowest, num_to_prune
from fastserve.compress.prune.owl import OWLPruneModifier
from fastserve.compress.quant.gptq import hessian_accumulator, inverse_cholesky, sequential_groups


@dataclass
class SparseGPTResult:
    weight: Tensor  # float32 [out, in]: pruned and updated
    mask: Tensor  # bool [out, in], True = pruned
    error: float  # tr(D H D^T) / tr(W H W^T), D = W - weight: relative output error on X


@torch.no_grad()
def sparsegpt_prune(
    w: Tensor,
    h: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
) -> SparseGPTResult:
    """Prune w [out, in] given the input Hessian h [in, in] (module docstring)."""
    w_orig = w.detach().float()
    w = w_orig.clone()
    h_orig = h.detach().float()
    h = h_orig.clone()
    num_rows, num_cols = w.shape
    if nm is not None and (block_size % nm[1] or num_cols % nm[1]):
        raise ValueError(
            f"block_size {block_size} and in_features {num_cols} must divide by {nm[1]}"
        )
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    hinv = inverse_cholesky(h, dampening_frac * float(torch.diag(h).mean()))

    mask = torch.zeros(num_rows, num_cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, num_cols, block_size):
        i2 = min(i1 + block_size, num_cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            k = num_to_prune(num_rows * i2, sparsity) - num_to_prune(num_rows * i1, sparsity)
            score = (w1.pow(2) / d.pow(2)[None, :]).reshape(1, -1)
            mask1 = lowest(score, k).reshape(w1.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                mask1[:, i : i + m] = lowest(score, m - n)
            wc = w1[:, i]
            q = wc.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (wc - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i : i + 1, i:]
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        mask[:, i1:i2] = mask1

    diff = w_orig - w
    num = float(torch.einsum("ij,jk,ik->", diff, h_orig, diff))
    den = float(torch.einsum("ij,jk,ik->", w_orig, h_orig, w_orig))
    return SparseGPTResult(weight=w, mask=mask, error=num / den if den > 0 else 0.0)


@dataclass
class SparseGPTModifier(OWLPruneModifier):
    """SparseGPT: OBS updates with an adaptive mask per block; optional OWL per-layer sparsities."""

    block_size: int = 128  # columns per mask selection / lazy batch update
    dampening_frac: float = 0.01  # added to H's diagonal, times its mean

    type: ClassVar[str] = "SparseGPT"

    def validate(self) -> None:
        super().validate()
        check_int(self.block_size, "block_size", 1)
        check_float(self.dampening_frac, "dampening_frac", 0.0, 1.0, hi_open=False)
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(
                f"block_size {self.block_size} must be a multiple of M = {nm[1]} "
                f"(mask_structure {self.mask_structure})"
            )

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        """True-sequential, as GPTQ: each linear group's Hessian on inputs produced by the already
        pruned groups before it; returns each linear's relative output error."""
        sparsity, errors = self.layer_sparsity(ctx.layer_idx), {}
        groups = sequential_groups(ctx.layer, ctx.run, list(ctx.targets), hessian_accumulator)
        for names, acc in groups:
            h = acc.hessian()
            for n in names:
                w = ctx.layer.get_submodule(n).weight
                try:
                    res = sparsegpt_prune(
                        w, h, sparsity, self.nm, self.block_size, self.dampening_frac
                    )
                except ValueError as e:
                    raise ValueError(f"SparseGPT on {n}: {e}") from e
                apply_mask(ctx, n, res.mask, self.mask_structure, weight=res.weight.to(w.dtype))
                errors[n] = res.error
        return errors
