"""Llama-family decoder (Llama, Mistral without sliding window, Qwen2) in plain PyTorch.

    model = LlamaForCausalLM(ModelConfig.preset("tiny"))
    logits = model(input_ids)                        # [B, T, V] float32, causal over 0..T-1
    cache = model.new_cache(batch_size=1, max_len=64)
    logits = model(prompt_ids, cache)                # prefill; cache.seq_len == T afterwards
    logits = model(next_ids, cache)                  # decode, positions continue at cache.seq_len

Parameter names are exactly HF's (`model.layers.0.self_attn.q_proj.weight`, ...), so HF state
dicts load without renaming. Numerics follow HF: RMSNorm and RoPE's cos/sin in float32, then cast
to the activation dtype. All attention math is in `attention()`, the one function the serving
engine swaps for paged attention.

What it does not know: file formats (see checkpoint.py), sampling (see fastserve.generate),
padding or per-sequence positions (every row of a batch sits at the same positions), paged KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastserve.model.config import ModelConfig

# torch >= 2.5 broadcasts K/V heads over query groups inside SDPA (no repeated copy of the cache).
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


# ---- KV cache ------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Contiguous per-layer K/V buffers for one batch of sequences that advance in lockstep.

    Invariant: between forwards, positions [0, seq_len) of every layer hold valid K/V and
    positions >= seq_len are garbage. A forward writes its T tokens at [seq_len, seq_len + T) in
    every layer, then the model advances seq_len by T once.
    """

    k: list[Tensor]  # per layer [batch, num_kv_heads, max_len, head_dim]
    v: list[Tensor]  # same shape as k
    seq_len: int = 0  # tokens already cached (= position of the next token)

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k=k, v=v)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer_idx: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write T tokens' K/V [B, n_kv, T, D] at seq_len; return views over [0, seq_len + T)."""
        end = self.seq_len + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {end} tokens do not fit in max_len {self.max_len}"
            )
        self.k[layer_idx][:, :, self.seq_len : end] = k_new
        self.v[layer_idx][:, :, self.seq_len : end] = v_new
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The AttentionCache protocol: store this forward's K/V, attend over the whole cache."""
        offset = self.seq_len
        k_all, v_all = self.update(layer_idx, k, v)
        return attention(q, k_all, v_all, q_offset=offset)

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens

    def reset(self) -> None:
        self.seq_len = 0


class AttentionCache(Protocol):
    """What a layer needs from a KV cache: KVCache here, the engine's paged cache elsewhere."""

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store k, v [B, H_kv, T, D] (rotated) for this layer; return attention output
        [B, H, T, D] of q over the cached context, causal by position."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after all layers, with T."""
        ...


# ---- math ----------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """Causal scaled-dot-product attention with grouped K/V heads.

    q: [B, H, T, D] for positions q_offset .. q_offset+T-1; k, v: [B, H_kv, S, D] for positions
    0 .. S-1 with S == q_offset + T (H a multiple of H_kv). Query i sees keys j <= q_offset + i.
    Returns [B, H, T, D]. The mask for q_offset=4, T=3 (x = attended):

        key pos    0 1 2 3 4 5 6
        query 4    x x x x x . .
        query 5    x x x x x x .
        query 6    x x x x x x x
    """
    t, s = q.shape[2], k.shape[2]
    assert s == q_offset + t, f"keys cover {s} positions, queries end at {q_offset + t}"
    mask = None
    if t > 1 and t != s:  # chunk after a cached prefix: SDPA's is_causal would align top-left
        q_pos = torch.arange(q_offset, s, device=q.device)[:, None]
        mask = torch.arange(s, device=q.device)[None, :] <= q_pos
    is_causal = t > 1 and t == s  # t == 1 sees every cached key: no mask needed
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
        )
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with linear or llama3 scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim] for integer positions [T], computed in float32 then cast."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by position (HF's rotate_half layout: pairs are (i, i + D/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- modules -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v)
        else:  # the cache stores K/V its own way (contiguous, paged) and attends over them
            out = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the LM head (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor, cache: AttentionCache | None) -> Tensor:
        x = self.embed_tokens(input_ids)
        # inv_freq is recomputed per forward (a few tiny ops) rather than kept as a buffer, so that
        # model.to(bfloat16) cannot round it and meta-device construction needs no re-init.
        inv_freq = rope_inv_freq(self.config, device=input_ids.device)
        cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head; `state_dict()` keys are HF's LlamaForCausalLM keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights(seed=0)

    def tie_weights(self) -> None:
        """When tied, make `lm_head.weight is model.embed_tokens.weight` (again after loads)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: Tensor,
        cache: AttentionCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, V] in float32 for input_ids [B, T].

        Without a cache the tokens sit at positions 0..T-1. With a KVCache they continue at
        cache.seq_len, attend over everything cached, and cache.seq_len advances by T. The serving
        engine passes its paged cache and explicit `positions` [T] (one row holding the tokens of
        many requests, each at its own position; the cache knows which token belongs to whom).
        """
        if positions is None:
            start = cache.seq_len if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        hidden = self.model(input_ids, positions, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.lm_head(hidden).float()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache on the model's device and dtype for `max_len` positions."""
        c = self.config
        return KVCache.allocate(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, initializer_range) weights; o_proj and down_proj (the residual projections)
        scaled by 1/sqrt(2 * num_layers) (GPT-2); norms one, biases zero. Draws on a CPU generator,
        so the result is the same on every device."""
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():  # tied lm_head is listed once, as embed_tokens
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); `exclude_embeddings` drops embed_tokens
        (as HF does; an untied lm_head still counts)."""
        skip = {id(self.model.embed_tokens.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)
