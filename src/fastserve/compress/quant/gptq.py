"""GPTQ (Frantar et al., 2022): round one column at a time, push its error onto the columns not
yet rounded through the inverse Hessian of the layer's inputs.

    acc = HessianAccumulator(in_features)
    acc.add(x)                                   # every calibration input [..., in_features]
    res = gptq_quantize(w, acc.hessian(), QuantScheme(bits=4, group_size=128))
    layer = QuantLinear.from_linear(linear, scheme, res.scale, res.zero, res.q)

The math, for W [out, in] and H = 2 X X^T / n (X: the layer's inputs, one column per token):
  1. dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0; H += 0.01 * mean(diag H) * I
  2. act_order: permute columns by decreasing H_jj (the most "active" inputs are rounded first,
     while many columns remain to absorb their error)
  3. U = upper Cholesky factor of H^-1; for each column j: q_j = round(w_j), e_j = (w_j - q_j) /
     U_jj, w_k -= e_j U_jk for k > j. Lazy batching: inside a block of 128 columns the update is
     applied column by column; the columns after the block get the block's accumulated error in
     one matmul (same result, far fewer memory passes).
  4. groups: without act_order a group's scale/zero are computed when its first column is
     reached, from the error-updated weights (the GPTQ reference). With act_order they are
     computed up front on the original column order ("static groups"), so every group still
     covers contiguous input columns and the stored weights need no permutation at load time.

  5. pruned (a mask from an earlier pruning modifier): a pruned weight is rounded to the zero
     code (it dequantizes to exactly 0) and its whole value becomes error pushed onto the later
     columns, as in SparseGPT's joint sparsify + quantize, so GPTQ never refills the mask.

`sequential_groups` is the true-sequential calibration of a decoder layer (one pass per linear
group, each on inputs produced by the already compressed groups before it); SparseGPT and Wanda
share it and the Hessian accumulation. `GPTQModifier` is the recipe modifier.

What it does not know: which layers to visit or how inputs are captured (the compressor does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.modifier import LayerContext, check_bool, check_float, check_int
from fastserve.compress.quant import QuantModifier, group_of
from fastserve.model.quantized import (
    QuantLinear,
    QuantScheme,
    compute_qparams,
    dequantize,
    quantize,
    replace_linear,
)


class HessianAccumulator:
    """Running sum of x^T x over calibration tokens; hessian() = 2 X X^T / n (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.num_tokens += x.shape[0]

    def hessian(self) -> Tensor:
        if self.num_tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.num_tokens)


@dataclass
class GPTQResult:
    q: Tensor  # [out, in] integer values in the scheme's range, original column order
    scale: Tensor  # float32 [out, n_groups]
    zero: Tensor | None  # int32 [out, n_groups]; None when symmetric
    error: float  # tr(D H D^T) / tr(W H W^T), D = W - dequantized: relative output error on X


def sequential_groups(
    layer: nn.Module,
    run: Callable[[], None],
    names: list[str],
    make_acc: Callable[[nn.Linear], Any],
) -> Iterator[tuple[list[str], Any]]:
    """For each linear group of `layer` holding one of `names` (layer-relative), in the order the
    layer computes them (q/k/v, o, gate/up, down): one calibration pass with a hook feeding the
    group's shared input to `acc = make_acc(first linear)` (anything with `add(x)`), then yield
    (the group's linears among `names`, acc). The caller compresses them before the next pass."""
    for group in dict.fromkeys(group_of(n) for n in names):
        members = [n for n in group.linears if n in names]
        first = layer.get_submodule(members[0])
        acc = make_acc(first)
        handle = first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
        try:
            run()
        finally:
            handle.remove()
        yield members, acc


def hessian_accumulator(linear: nn.Linear) -> HessianAccumulator:
    return HessianAccumulator(linear.in_features, device=linear.weight.device)


def inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (h + damp * I)^-1; the damping grows x10 until h is positive
    definite (at most 4 times)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(5):
        low, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10.0
    raise ValueError("the Hessian is not positive definite even after dampening x10^4")


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    h: Tensor,
    scheme: QuantScheme,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = True,
    pruned: Tensor | None = None,
) -> GPTQResult:
    """Quantize w [out, in] given the input Hessian h [in, in] (see the module docstring);
    `pruned` bool [out, in] marks weights to hold at zero (step 5)."""
    scheme.validate(w.shape[1])
    w_orig = w.detach().float()
    w = w_orig.clone()
    h_orig = h.detach().float()
    h = h_orig.clone()
    num_rows, num_cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = scheme.group_size
    col_scheme = dataclasses.replace(scheme, group_size=None)  # one column: one "group"
    n_groups = scheme.num_groups(num_cols)
    scale = torch.zeros(num_rows, n_groups, dtype=torch.float32, device=w.device)
    zero = None if scheme.symmetric else torch.zeros_like(scale, dtype=torch.int32)
    static = g is None or act_order
    if static:  # all qparams from the (dead-zeroed) original weights, original column order
        s, z = compute_qparams(w, scheme)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)

    perm = torch.arange(num_cols, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        pruned = None if pruned is None else pruned[:, perm]
    group_of_col = perm // g if g is not None else torch.zeros_like(perm)

    hinv = inverse_cholesky(h, dampening_frac * float(torch.diag(h).mean()))
    q_perm = torch.zeros(num_rows, num_cols, dtype=torch.int16, device=w.device)
    for i1 in range(0, num_cols, block_size):
        i2 = min(i1 + block_size, num_cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(group_of_col[col])
            if not static and col % g == 0:  # first column of a group: qparams from W as it is
                ahead = w1[:, i : i + g]
                if ahead.shape[1] < g:  # the group runs past the block: add its pending update
                    end = i2 + g - ahead.shape[1]
                    rest = w[:, i2:end] - err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
                    ahead = torch.cat((ahead, rest), dim=1)
                if pruned is not None:  # the group's range from the weights it keeps
                    ahead = ahead.masked_fill(pruned[:, col : col + ahead.shape[1]], 0.0)
                s, z = compute_qparams(ahead, col_scheme)
                scale[:, gi] = s[:, 0]
                if zero is not None:
                    zero[:, gi] = z[:, 0]
            s_col = scale[:, gi : gi + 1]
            z_col = None if zero is None else zero[:, gi : gi + 1]
            wc = w1[:, i : i + 1]
            qc = quantize(wc, s_col, z_col, col_scheme)
            if pruned is not None:  # pruned: the zero code, so the weight stays exactly 0
                zero_code = 0 if z_col is None else z_col.to(qc.dtype)
                qc = torch.where(pruned[:, col : col + 1], zero_code, qc)
            q_perm[:, col] = qc[:, 0].to(torch.int16)
            e = (wc - dequantize(qc, s_col, z_col, col_scheme)) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    q = torch.empty_like(q_perm)
    q[:, perm] = q_perm
    q = q.to(scheme.q_dtype)
    d = w_orig - dequantize(q, scale, zero, scheme)
    num = float(torch.einsum("ij,jk,ik->", d, h_orig, d))
    den = float(torch.einsum("ij,jk,ik->", w_orig, h_orig, w_orig))
    return GPTQResult(q=q, scale=scale, zero=zero, error=num / den if den > 0 else 0.0)


@dataclass
class GPTQModifier(QuantModifier):
    """GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian error feedback."""

    block_size: int = 128  # columns per lazy batch update
    dampening_frac: float = 0.01  # added to H's diagonal, times its mean
    act_order: bool = True  # quantize columns by decreasing H diagonal (static groups)

    type: ClassVar[str] = "GPTQ"

    def validate(self) -> None:
        super().validate()
        check_int(self.block_size, "block_size", 1)
        check_float(self.dampening_frac, "dampening_frac", 0.0, 1.0, hi_open=False)
        check_bool(self.act_order, "act_order")

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        """True-sequential GPTQ: group by group (q/k/v, o, gate/up, down), each group's Hessian
        taken on inputs produced by the already quantized groups before it; the linears of a
        group share it, each quantized with its own scheme. A pruned linear keeps its zeros."""
        errors = {}
        layer = ctx.layer
        for names, acc in sequential_groups(layer, ctx.run, list(ctx.targets), hessian_accumulator):
            h = acc.hessian()
            for n in names:
                linear, scheme = layer.get_submodule(n), ctx.targets[n].scheme
                pruned = linear.weight == 0 if ctx.full_name(n) in ctx.session.sparse else None
                try:
                    res = gptq_quantize(
                        linear.weight,
                        h,
                        scheme,
                        self.block_size,
                        self.dampening_frac,
                        self.act_order,
                        pruned=pruned,
                    )
                except ValueError as e:
                    raise ValueError(f"GPTQ on {n}: {e}") from e
                new = QuantLinear.from_linear(linear, scheme, res.scale, res.zero, res.q)
                replace_linear(layer, n, new)
                errors[n] = res.error
        return errors
