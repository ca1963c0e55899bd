"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up
before rounding (and the activations down, folded into the op before them), then clip and RTN.

    scales = awq_scale_layer(layer, run, targets, scheme, num_grid=20)   # function-preserving
    awq_quantize_layer(layer, run, targets, scheme, clip=True)           # clip search + RTN

`scheme` is one QuantScheme or {target: scheme} (a recipe's group size may fall back per linear,
e.g. down_proj's in_features differs from gate/up's); each linear is fake-quantized and clipped
with its own scheme, also inside a group's joint scale search.

Scale search, per linear group of the layer (q/k/v after input_layernorm; o after v, under
grouped-query attention with the scales of the o channels that read one v channel tied by
`tie_gqa`; gate/up after post_attention_layernorm; down after up), with x the group's
calibration input, m_j = mean |x_j| and (duo scaling, the default of AutoAWQ and llm-compressor)
w_j = the mean over the group's rows of |W_rj| / max |W_r,group(j)|:
    for alpha in 0, 1/20, ..., 19/20:  t = m^alpha / (w^(1 - alpha) + 1e-4)   (t = m^alpha without
                                       duo scaling);  s = t / sqrt(max(t) min(t))
        W' = Q(W s) / s for the group's quantized linears      (Q = RTN of the scheme)
        loss = || module(x; W') - module(x; W) ||^2    module = the attention, the MLP, o or down
    keep the best s (s = 1 is tried first, so the search never does worse than plain RTN on x)
    and fold it: prev op's output channels / s, the group's columns * s.
Clip search, per quantized linear except q/k (attention scores are sensitive to their clipping):
for each (row, group) keep the clipping range with the least error of that group's partial output
on up to clip_max_tokens calibration tokens. Symmetric schemes try [-c, c] for c = max |w| *
(1 - i / clip_grid), i < max_shrink * clip_grid (AutoAWQ's search). Asymmetric schemes shrink the
two ends separately, [lo * (1 - j / clip_grid), hi * (1 - i / clip_grid)] over the same i, j grid
(lo = min(min w, 0), hi = max(max w, 0): the quantizer's range, which holds 0): their zero point
lets a group's range be lopsided, and a shared c clips only its larger side.

What it does not know: recipes, the layer walk (it gets `run()`, one calibration pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.calibration import capture_inputs
from fastserve.compress.modifier import LayerContext, check_bool, check_float, check_int
from fastserve.compress.quant import (
    LAYER_GROUPS,
    LinearGroup,
    QuantModifier,
    Schemes,
    can_fold,
    fold_scales,
    scheme_of,
    tie_gqa,
)
from fastserve.model.quantized import QuantLinear, QuantScheme, fake_quantize, replace_linear

_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def _capture(layer: nn.Module, run: Callable[[], None], name: str) -> list[tuple]:
    """The positional arguments of every forward of submodule `name` during one pass."""
    calls: list[tuple] = []
    with capture_inputs({name: layer.get_submodule(name)}, lambda _n, args: calls.append(args)):
        run()
    return calls


@torch.no_grad()
def awq_scale_layer(
    layer: nn.Module,
    run: Callable[[], None],
    targets: list[str],
    scheme: Schemes,
    num_grid: int = 20,
    duo_scaling: bool = True,
) -> dict[str, Tensor]:
    """Search and fold AWQ scales for every group of `layer` holding a target (module
    docstring); weights stay float. Returns {group prev: s} for the groups scaled."""
    result = {}
    for group in LAYER_GROUPS:
        quantized = [n for n in group.linears if n in targets]
        if not quantized or not can_fold(layer, group):
            continue
        module = layer.get_submodule(group.inspect)
        calls = _capture(layer, run, group.inspect)  # after the previous groups were folded
        x_abs_sum, count = None, 0
        for args in calls:
            x = args[0].reshape(-1, args[0].shape[-1])
            part = x.abs().double().sum(dim=0)
            x_abs_sum = part if x_abs_sum is None else x_abs_sum + part
            count += x.shape[0]
        x_mean = tie_gqa(layer, group, (x_abs_sum / count).float())
        y_ref = [module(*args) for args in calls]
        linears = [layer.get_submodule(n) for n in quantized]
        schemes = [scheme_of(scheme, n) for n in quantized]
        originals = [lin.weight.detach().clone() for lin in linears]
        w_mean = _weight_mean(layer, group, originals, schemes) if duo_scaling else None

        best_loss, best_s = float("inf"), torch.ones_like(x_mean)
        for s in _candidates(x_mean, w_mean, num_grid):
            for lin, w, sch in zip(linears, originals, schemes):
                sw = s.to(w.dtype)[None, :]
                lin.weight.copy_(fake_quantize(w * sw, sch) / sw)
            loss = sum(float((module(*a) - y).double().pow(2).sum()) for a, y in zip(calls, y_ref))
            if loss < best_loss:
                best_loss, best_s = loss, s
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
        fold_scales(layer, group, best_s)
        result[group.prev] = best_s
    return result


def _candidates(x_mean: Tensor, w_mean: Tensor | None, num_grid: int) -> Iterator[Tensor]:
    """The scales tried: s = 1 (plain RTN) first, then one per alpha of the grid."""
    yield torch.ones_like(x_mean)
    for i in range(1 if w_mean is None else 0, num_grid):  # without duo, alpha = 0 is s = 1
        alpha = i / num_grid
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


def _weight_mean(
    layer: nn.Module, group: LinearGroup, weights: list[Tensor], schemes: list[QuantScheme]
) -> Tensor:
    """Per input channel: the mean over the group's rows of |W| relative to its (row, group)
    max, the weight side of duo scaling (tied like x_mean under grouped-query attention)."""
    rel = []
    for w, sch in zip(weights, schemes):
        g = sch.group_size or w.shape[1]
        a = w.abs().float().reshape(-1, g)
        rel.append((a / (a.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape))
    return tie_gqa(layer, group, torch.cat(rel).mean(dim=0))


def _evenly(x: Tensor, max_tokens: int) -> Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= max_tokens:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).round().long()
    return x[idx]


@torch.no_grad()
def clip_weight(
    w: Tensor,
    x: Tensor,
    scheme: QuantScheme,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 64,
) -> Tensor:
    """w [out, in] clamped per (row, group) to the range whose fake-quantized group gives the
    least squared error of x_g @ w_g^T over the tokens x [n, in] (module docstring: symmetric
    schemes shrink [-max|w|, max|w|], asymmetric ones each end of [min w, max w] on its own)."""
    out_features, in_features = w.shape
    g = scheme.group_size or in_features
    n_groups = in_features // g
    xg = x.float().reshape(-1, n_groups, g)  # [n, G, g]
    steps = [1 - i / clip_grid for i in range(max(1, int(max_shrink * clip_grid)))]
    result = w.detach().clone()
    for r0 in range(0, out_features, rows_per_chunk):
        wr = w[r0 : r0 + rows_per_chunk].float()  # [R, in]
        wg = wr.reshape(-1, n_groups, g)  # [R, G, g]
        ref = torch.einsum("ngk,rgk->nrg", xg, wg)
        if scheme.symmetric:
            hi0 = wg.abs().amax(dim=-1, keepdim=True)  # [R, G, 1]
            ranges = [(hi0 * f, -hi0 * f) for f in steps]
        else:
            # the quantizer's range always holds 0 (compute_qparams): shrink its ends toward it
            hi0 = wg.amax(dim=-1, keepdim=True).clamp(min=0.0)
            lo0 = wg.amin(dim=-1, keepdim=True).clamp(max=0.0)
            ranges = [(hi0 * f, lo0 * e) for f in steps for e in steps]
        best_err = torch.full(hi0.shape[:2], float("inf"), device=w.device)
        best_hi, best_lo = ranges[0]
        for hi, lo in ranges:
            wc = torch.maximum(torch.minimum(wg, hi), lo).reshape(wr.shape)
            wq = fake_quantize(wc, scheme).reshape(wg.shape)
            err = (torch.einsum("ngk,rgk->nrg", xg, wq) - ref).pow(2).mean(dim=0)  # [R, G]
            better = (err < best_err)[..., None]
            best_err = torch.where(better[..., 0], err, best_err)
            best_hi, best_lo = torch.where(better, hi, best_hi), torch.where(better, lo, best_lo)
        clipped = torch.maximum(torch.minimum(wg, best_hi), best_lo).reshape(wr.shape)
        result[r0 : r0 + rows_per_chunk] = clipped.to(w.dtype)
    return result


@torch.no_grad()
def awq_quantize_layer(
    layer: nn.Module,
    run: Callable[[], None],
    targets: list[str],
    scheme: Schemes,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    clip_max_tokens: int = 4096,
) -> None:
    """Clip-search (optional) then RTN every target of `layer` (after awq_scale_layer)."""
    to_clip = [n for n in targets if n not in _NO_CLIP] if clip else []
    if to_clip:
        inputs: dict[str, Tensor] = {}

        def keep(n: str, args: tuple) -> None:  # a strided subsample, at most 2x the cap in memory
            x = args[0].reshape(-1, args[0].shape[-1])
            x = torch.cat((inputs[n], x)) if n in inputs else x
            while x.shape[0] > 2 * clip_max_tokens:
                x = x[::2]
            inputs[n] = x

        modules = {n: layer.get_submodule(n) for n in to_clip}
        with capture_inputs(modules, keep):
            run()
        for n in to_clip:
            x = _evenly(inputs[n], clip_max_tokens)
            lin = modules[n]
            sch = scheme_of(scheme, n)
            lin.weight.copy_(clip_weight(lin.weight, x, sch, clip_grid, max_shrink))
    for n in targets:
        qlin = QuantLinear.from_linear(layer.get_submodule(n), scheme_of(scheme, n))
        replace_linear(layer, n, qlin)


@dataclass
class AWQModifier(QuantModifier):
    """AWQ (Lin et al. 2023): activation-aware per-channel scales, clipping search, then RTN."""

    num_grid: int = 20  # alpha = i / num_grid for i < num_grid: the scale exponent grid
    duo_scaling: bool = True  # s = mean|x|^alpha / mean|w|^(1-alpha) (False: mean|x|^alpha)
    clip: bool = True  # search a per-(row, group) clipping ratio by output error
    clip_grid: int = 20  # clipping ratios 1 - i / clip_grid ...
    max_shrink: float = 0.5  # ... down to 1 - max_shrink
    clip_max_tokens: int = 4096  # calibration tokens (evenly spaced) used by the clip search

    type: ClassVar[str] = "AWQ"

    def validate(self) -> None:
        super().validate()
        check_int(self.num_grid, "num_grid", 1)
        check_bool(self.duo_scaling, "duo_scaling")
        check_bool(self.clip, "clip")
        check_int(self.clip_grid, "clip_grid", 1)
        check_float(self.max_shrink, "max_shrink", 0.0, 1.0)
        check_int(self.clip_max_tokens, "clip_max_tokens", 1)

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        """Scales folded and clipping searched on the float weights (a pruned weight stays 0:
        scaling and clamping to a range holding 0 keep it), then RTN."""
        names, schemes = list(ctx.targets), ctx.schemes
        awq_scale_layer(ctx.layer, ctx.run, names, schemes, self.num_grid, self.duo_scaling)
        awq_quantize_layer(
            ctx.layer,
            ctx.run,
            names,
            schemes,
            self.clip,
            self.clip_grid,
            self.max_shrink,
            self.clip_max_tokens,
        )
        return {}
