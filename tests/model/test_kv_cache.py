"""KV cache and attention: cached forwards equal the full forward; attention equals a float64
reference; init is seeded and scaled as documented."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import max_diff, random_ids, tiny_model

from fastserve.model import KVCache, LlamaForCausalLM, ModelConfig
from fastserve.model import llama as llama_module
from fastserve.model.llama import attention


def reference_attention(q, k, v, q_offset):
    """Float64 softmax attention with explicit causal positions and repeated K/V heads."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    q_pos = torch.arange(q_offset, q_offset + q.shape[2])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[2])[None, :] > q_pos, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("gqa_native", [True, False])
@pytest.mark.parametrize(("t", "offset"), [(9, 0), (1, 8), (4, 5)])
def test_attention_matches_reference(monkeypatch, gqa_native, t, offset):
    monkeypatch.setattr(llama_module, "_SDPA_HAS_GQA", gqa_native and llama_module._SDPA_HAS_GQA)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, t, 16, generator=g)
    k = torch.randn(2, 2, offset + t, 16, generator=g)
    v = torch.randn(2, 2, offset + t, 16, generator=g)
    assert (
        max_diff(attention(q, k, v, q_offset=offset), reference_attention(q, k, v, offset)) < 1e-5
    )


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_key_value_heads=4), dict(attention_bias=True, tie_word_embeddings=True)],
)
def test_cached_forward_equals_full_forward(overrides):
    model = tiny_model(seed=1, **overrides)
    ids = random_ids(128, batch=2, length=30)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=30)
        parts = [model(ids[:, :7], cache)]  # prefill
        parts += [model(ids[:, i : i + 1], cache) for i in range(7, 12)]  # decode steps
        parts.append(model(ids[:, 12:20], cache))  # a chunk after a cached prefix
        parts.append(model(ids[:, 20:], cache))
    assert cache.seq_len == 30
    assert max_diff(torch.cat(parts, dim=1), full) <= 1e-4


def test_cache_allocation_and_overflow():
    model = tiny_model().to(torch.bfloat16)
    cache = model.new_cache(batch_size=3, max_len=10)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 10, 16)
    assert cache.k[0].dtype == torch.bfloat16 and cache.max_len == 10
    with torch.no_grad():
        logits = model(random_ids(128, 3, 8), cache)
    assert logits.dtype == torch.float32 and cache.seq_len == 8
    with pytest.raises(ValueError, match="overflow"), torch.no_grad():
        model(random_ids(128, 3, 3), cache)
    cache.reset()
    assert cache.seq_len == 0
    assert isinstance(KVCache.allocate(1, 1, 1, 4, 2), KVCache)


def test_init_weights_seeded_and_scaled():
    config = ModelConfig.preset(
        "tiny", vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=8
    )
    a, b = LlamaForCausalLM(config), LlamaForCausalLM(config)
    a.init_weights(seed=7)
    b.init_weights(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.init_weights(seed=8)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    layer = a.model.layers[3]
    std = config.initializer_range
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # 1/sqrt(16)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    biased = LlamaForCausalLM(ModelConfig.preset("tiny", attention_bias=True))
    assert torch.count_nonzero(biased.model.layers[0].self_attn.k_proj.bias) == 0


def test_explicit_positions_and_custom_cache_protocol():
    """A cache object only needs attend/advance; explicit positions place tokens anywhere."""
    import torch

    from fastserve.model import LlamaForCausalLM, ModelConfig
    from fastserve.model.llama import attention

    model = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=97, num_hidden_layers=2)).eval()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)

        class Recorder:  # a contiguous cache written against the protocol alone
            def __init__(self):
                self.kv, self.calls = {}, 0

            def attend(self, layer_idx, q, k, v):
                old_k, old_v = self.kv.get(layer_idx, (k[:, :, :0], v[:, :, :0]))
                k_all, v_all = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
                self.kv[layer_idx] = (k_all, v_all)
                return attention(q, k_all, v_all, q_offset=old_k.shape[2])

            def advance(self, n):
                self.calls += 1

        cache = Recorder()
        first = model(ids[:, :5], cache, positions=torch.arange(0, 5))
        rest = model(ids[:, 5:], cache, positions=torch.arange(5, 9))
    assert cache.calls == 2
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
    # explicit default positions are the same as none
    torch.testing.assert_close(model(ids, positions=torch.arange(9)), full)
