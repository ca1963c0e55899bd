"""Quantized linear layers: schemes, round-to-nearest math, int4 packing and `QuantLinear`.

    scheme = QuantScheme(bits=4, group_size=128)     # int4 weights, symmetric
    qlin = QuantLinear.from_linear(linear, scheme)   # RTN; GPTQ passes its own q/scale/zero
    y = qlin(x)                                      # kernels.quant_linear picks the path
    quantize_model(model, {"model.layers.0.mlp.up_proj": scheme})  # swap nn.Linears in place

Value ranges (q is what `quantize` returns, `w ~= (q - zero) * scale` per (row, group)):

    bits  symmetric (zero = 0)     asymmetric (integer zero in [0, 2^b - 1])
    8     q in [-128, 127] int8    q in [0, 255] uint8
    4     q in [-8, 7]     int8    q in [0, 15]  int8
    3     q in [-4, 3]     int8    q in [0, 7]   int8   (stored in the 4-bit container)

Symmetric scale = absmax / (2^(b-1) - 1), so -2^(b-1) is never produced by RTN (it may come from
GPTQ's error feedback, clamped). Asymmetric ranges always include 0 (min <= 0 <= max), so the zero
point is an integer inside [0, 2^b - 1]. Either way |w - dequantize(quantize(w))| <= scale / 2.

int4 packing (4- and 3-bit), two values per byte, columns 2j (low nibble) and 2j+1 (high nibble):

    q row:     q0   q1   q2   q3  ...           nibble = q + 8 (symmetric) | q (asymmetric)
    byte row: [q1|q0] [q3|q2] ...               byte = nibble(2j) | nibble(2j+1) << 4

The nibble is the unsigned code of torch's int4 CPU kernel (value = (code - 8) * scale + offset).

What this module does not know: how q/scale/zero were chosen beyond RTN (GPTQ, AWQ live in
fastserve.compress), which kernel runs a forward (fastserve.model.kernels, which takes tensors and
imports nothing from here), files (checkpoint.py, records.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from fastserve.model.kernels import quant_linear
from fastserve.model.kernels import quantize_activations as quantize_activations  # re-exported

SUPPORTED_BITS = (8, 4, 3)
SUPPORTED_ACT_BITS = (None, 8)


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weights (and optionally activations) are quantized."""

    bits: int = 8  # 8, 4 or 3 (3-bit values live in the 4-bit container)
    group_size: int | None = None  # None = one scale per output row; else groups of input columns
    symmetric: bool = True  # zero point 0 and signed q; else unsigned q with an integer zero point
    act_bits: int | None = None  # 8 = dynamic per-token int8 activations (W8A8); None = weight-only

    def validate(self, in_features: int | None = None) -> None:
        """ValueError naming the offending field; `in_features` also checks divisibility."""
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size <= 0
        ):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.act_bits not in SUPPORTED_ACT_BITS or isinstance(self.act_bits, bool):
            raise ValueError(f"act_bits must be 8 or None, got {self.act_bits!r}")
        if self.act_bits is not None and (
            self.bits != 8 or not self.symmetric or self.group_size is not None
        ):
            raise ValueError(
                "act_bits=8 (W8A8) needs bits=8, symmetric=True and group_size=None (per-channel)"
            )
        if in_features is not None:
            if self.group_size is not None and in_features % self.group_size:
                raise ValueError(
                    f"group_size {self.group_size} does not divide in_features {in_features}"
                )
            if self.bits < 8 and in_features % 2:
                raise ValueError(
                    f"{self.bits}-bit weights pack two per byte: in_features {in_features} "
                    "must be even"
                )

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def q_dtype(self) -> torch.dtype:
        """dtype of `quantize`'s output: uint8 only for asymmetric 8-bit (q up to 255)."""
        return torch.uint8 if (self.bits == 8 and not self.symmetric) else torch.int8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        """Inverse of to_dict; ValueError for unknown keys or invalid values."""
        if not isinstance(d, dict):
            raise ValueError(f"a quantization scheme must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown quantization scheme field(s) {unknown}; known: {sorted(known)}"
            )
        scheme = cls(**d)
        scheme.validate()
        return scheme


# ---- round-to-nearest math -----------------------------------------------------------------------


def _group_width(in_features: int, num_groups: int) -> int:
    if num_groups <= 0 or in_features % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {in_features} input columns")
    return in_features // num_groups


def _expand(t: Tensor, in_features: int) -> Tensor:
    """[out, n_groups] -> [out, in] (each group's value repeated over its columns)."""
    return t.repeat_interleave(_group_width(in_features, t.shape[1]), dim=1)


def compute_qparams(w: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Min/max (RTN) scale and zero point for w [out, in] per (row, group).

    Returns scale float32 [out, n_groups] (never 0: an all-zero group gets scale 1) and zero int32
    [out, n_groups], or None when symmetric. Works on any column slice whose width is a multiple
    of group_size (GPTQ calls it on one group's columns); per-channel schemes give n_groups = 1.
    """
    scheme.validate()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    g = in_features if scheme.group_size is None else scheme.group_size
    if in_features % g:
        raise ValueError(f"group_size {g} does not divide the {in_features} columns given")
    wg = w.detach().float().reshape(out_features, in_features // g, g)
    if scheme.symmetric:
        scale = wg.abs().amax(dim=-1) / scheme.qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, scheme.qmax).to(torch.int32)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """q = clamp(round(w / scale) + zero) as `scheme.q_dtype` [out, in]."""
    in_features = w.shape[-1]
    q = torch.round(w.detach().float() / _expand(scale.float(), in_features))
    if zero is not None:
        q = q + _expand(zero.float(), in_features)
    return q.clamp(scheme.qmin, scheme.qmax).to(scheme.q_dtype)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """(q - zero) * scale as float32 [out, in]."""
    out_features, in_features = q.shape
    n_groups = scale.shape[1]
    g = _group_width(in_features, n_groups)
    w = q.float().reshape(out_features, n_groups, g)  # groups broadcast, no expanded copies
    if zero is not None:
        w = w - zero.float().unsqueeze(-1)
    return (w * scale.float().unsqueeze(-1)).reshape(out_features, in_features)


def fake_quantize(
    w: Tensor, scheme: QuantScheme, scale: Tensor | None = None, zero: Tensor | None = None
) -> Tensor:
    """dequantize(quantize(w)) in w.dtype; RTN qparams unless `scale` (and `zero`) are given."""
    if scale is None:
        scale, zero = compute_qparams(w, scheme)
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme).to(w.dtype)


# ---- int4 packing --------------------------------------------------------------------------------


def pack_int4(q: Tensor, symmetric: bool | None = None) -> Tensor:
    """int values [out, in] of a 4/3-bit scheme -> uint8 [out, in // 2] (layout: module docstring).

    Symmetric values must lie in [-8, 7], asymmetric ones in [0, 15]. `symmetric` None infers it
    from the sign of the values (any negative -> symmetric), which is only safe for symmetric q
    known to contain a negative; callers that know the scheme pass it.
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor [out, in], got shape {tuple(q.shape)}")
    if q.shape[1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[1]}")
    if q.dtype.is_floating_point:
        raise ValueError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    qi = q.to(torch.int16)
    if symmetric is None:
        symmetric = bool((qi < 0).any())
    lo, hi = (-8, 7) if symmetric else (0, 15)
    if qi.numel() and (int(qi.min()) < lo or int(qi.max()) > hi):
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(
            f"{kind} int4 values must lie in [{lo}, {hi}], got [{int(qi.min())}, {int(qi.max())}]"
        )
    codes = (qi + 8) if symmetric else qi
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: Tensor, symmetric: bool) -> Tensor:
    """uint8 [out, in // 2] -> int8 values [out, in] (the inverse of pack_int4)."""
    if p.dtype != torch.uint8 or p.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2-D uint8 tensor, got {p.dtype} {tuple(p.shape)}")
    codes = _unpack_nibbles(p).view(torch.int8)  # codes <= 15: same bits as int8
    return codes - 8 if symmetric else codes


def unpack_int4_codes(p: Tensor) -> Tensor:
    """uint8 [out, in // 2] -> the unsigned nibble codes [out, in] as int32 (kernel layout)."""
    return _unpack_nibbles(p).to(torch.int32)


def _unpack_nibbles(p: Tensor) -> Tensor:
    codes = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.uint8, device=p.device)
    codes[:, 0::2] = p & 0xF
    codes[:, 1::2] = p >> 4
    return codes


# ---- QuantLinear ---------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear holding quantized weights (compressed-tensors buffer names).

    Buffers, all persistent (the safetensors names under the module prefix):
      weight_packed      int8 [out, in] (8-bit; uint8 when asymmetric) | uint8 [out, in // 2]
                         (4/3-bit, two per byte)
      weight_scale       float32 [out, n_groups] (kept float32 whatever the model dtype)
      weight_zero_point  uint8 [out, n_groups] (asymmetric only; the integer zero point)
      bias               [out] in the activation dtype (only when the float layer had one)
    `dtype` is the activation/output dtype. Kernel-layout copies of the weight are cached in
    `_kernel_cache` (not in the state dict) and dropped on `.to()` / load_state_dict.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        scheme.validate(in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        n_groups = scheme.num_groups(in_features)
        if scheme.bits == 8:
            packed = torch.zeros(out_features, in_features, dtype=scheme.q_dtype, device=device)
        else:
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight_packed", packed)
        self.register_buffer(
            "weight_scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device)
        )
        zero = None
        if not scheme.symmetric:
            zero = torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device)
        self.register_buffer("weight_zero_point", zero)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.register_buffer("bias", b)
        self._dtype = dtype
        self._kernel_cache: dict[Any, Any] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the bias's when present, else the one given at construction."""
        return self.bias.dtype if self.bias is not None else self._dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        scale: Tensor | None = None,
        zero: Tensor | None = None,
        q: Tensor | None = None,
    ) -> QuantLinear:
        """Quantize `linear`'s weight: RTN when only the float linear is given; GPTQ/AWQ pass their
        own scale/zero (then q = quantize(weight, scale, zero)) or all of q/scale/zero."""
        w = linear.weight.detach()
        out_features, in_features = w.shape
        if q is not None and scale is None:
            raise ValueError("from_linear: q was given without its scale")
        if scale is None:
            scale, zero = compute_qparams(w, scheme)
        if q is None:
            q = quantize(w, scale, zero, scheme)
        layer = cls(
            in_features,
            out_features,
            scheme,
            bias=linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        layer.set_quantized(q, scale, zero)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def set_quantized(self, q: Tensor, scale: Tensor, zero: Tensor | None) -> None:
        """Store q [out, in] (values in the scheme's range), scale and zero [out, n_groups]."""
        s = self.scheme
        n_groups = s.num_groups(self.in_features)
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"q has shape {tuple(q.shape)}, expected {self.shape}")
        if tuple(scale.shape) != (self.out_features, n_groups):
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, expected {(self.out_features, n_groups)}"
            )
        if (zero is None) != s.symmetric:
            raise ValueError("zero must be None exactly when the scheme is symmetric")
        if q.numel() and (int(q.min()) < s.qmin or int(q.max()) > s.qmax):
            raise ValueError(f"q values must lie in [{s.qmin}, {s.qmax}] for {s}")
        packed = q.to(s.q_dtype) if s.bits == 8 else pack_int4(q, s.symmetric)
        self.weight_packed.copy_(packed)
        self.weight_scale.copy_(scale.float())
        if zero is not None:
            if tuple(zero.shape) != (self.out_features, n_groups):
                raise ValueError(f"zero has shape {tuple(zero.shape)}, expected like scale")
            if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > s.qmax):
                raise ValueError(f"zero points must lie in [0, {s.qmax}]")
            self.weight_zero_point.copy_(zero.to(torch.uint8))
        self._kernel_cache.clear()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def q_values(self) -> Tensor:
        """The stored q [out, in] (unpacked), as quantize() returned them."""
        if self.scheme.bits == 8:
            return self.weight_packed
        return unpack_int4(self.weight_packed, self.scheme.symmetric)

    def zero_point(self) -> Tensor | None:
        """The zero points as int32 (None when symmetric)."""
        zp = self.weight_zero_point
        return None if zp is None else zp.to(torch.int32)

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] this layer computes with (the reference path)."""
        return dequantize(self.q_values(), self.weight_scale, self.zero_point(), self.scheme)

    def int4_codes(self) -> Tensor:
        """The unsigned nibble codes [out, in] as int32 (4/3-bit layers; the int4 kernel input)."""
        return unpack_int4_codes(self.weight_packed)

    def forward(self, x: Tensor) -> Tensor:
        return quant_linear(x, self)

    def check_tensors(self) -> None:
        """ValueError when the stored tensors are out of the scheme's range (a corrupted or
        mismatched file): non-finite or non-positive scales, zero points or 3-bit codes too big."""
        s = self.scheme
        scale = self.weight_scale
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError("weight_scale holds non-finite or non-positive values")
        zp = self.weight_zero_point
        if zp is not None and zp.numel() and int(zp.max()) > s.qmax:
            raise ValueError(f"weight_zero_point exceeds {s.qmax} for {s.bits}-bit weights")
        if s.bits == 3:
            q = self.q_values()
            if q.numel() and (int(q.min()) < s.qmin or int(q.max()) > s.qmax):
                raise ValueError(f"weight_packed holds values outside [{s.qmin}, {s.qmax}]")

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight tensors (packed values, scales, zero points)."""
        ts = [self.weight_packed, self.weight_scale, self.weight_zero_point]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        """Keep the stored int and float32 tensors exactly through .to(dtype) / .half() (only the
        bias follows a float cast); device moves apply to all; the kernel cache is dropped."""
        self._kernel_cache.clear()
        fixed = {
            name: self._buffers.pop(name)
            for name in ("weight_packed", "weight_scale", "weight_zero_point")
            if self._buffers.get(name) is not None
        }
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in fixed.items():
                self._buffers[name] = t
        if not fixed:
            return self
        probe = fn(torch.zeros(0, dtype=self._dtype, device=self.weight_scale.device))
        for name, t in fixed.items():
            if t.device != probe.device:
                self._buffers[name] = (
                    torch.empty_like(t, device=probe.device) if t.is_meta else t.to(probe.device)
                )
        self._dtype = self.bias.dtype if self.bias is not None else probe.dtype
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        s = self.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, act_bits={s.act_bits}, "
            f"bias={self.bias is not None}"
        )


# ---- model surgery -------------------------------------------------------------------------------


def replace_linear(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Set the submodule at dotted `name` (e.g. "model.layers.0.mlp.up_proj") to `new_module`."""
    if name == "lm_head" and isinstance(new_module, QuantLinear):
        # LlamaForCausalLM reads its dtype and device from lm_head.weight.
        raise ValueError("lm_head stays dense: it cannot be replaced by a QuantLinear")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError as e:
        raise ValueError(f"no module named {name!r} in the model") from e
    if not hasattr(parent, child) or not isinstance(getattr(parent, child), nn.Module):
        raise ValueError(f"no module named {name!r} in the model")
    setattr(parent, child, new_module)


def quantize_model(model: nn.Module, schemes: dict[str, QuantScheme]) -> None:
    """Replace the named nn.Linear modules (full dotted names) by RTN QuantLinears, in place.

    A weight shared with another module (a tied lm_head) cannot be quantized on its own: ValueError.
    """
    shared = _shared_weight_ids(model)
    for name, scheme in schemes.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"no module named {name!r} in the model") from e
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name!r} is a {type(linear).__name__}, not an nn.Linear")
        if id(linear.weight) in shared:
            raise ValueError(
                f"{name!r} shares its weight with another module (tied); not quantized"
            )
        try:
            scheme.validate(linear.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        replace_linear(model, name, QuantLinear.from_linear(linear, scheme))


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def quantization_modules(model: nn.Module) -> dict[str, QuantScheme]:
    """{dotted name: scheme} for every QuantLinear in the model, in module order."""
    return {name: m.scheme for name, m in model.named_modules() if isinstance(m, QuantLinear)}
