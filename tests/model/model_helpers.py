"""Helpers shared by the model tests (a plain module: conftest names collide across test dirs)."""

from __future__ import annotations

import torch

from fastserve.model import LlamaForCausalLM, ModelConfig


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values (norm weights near 1) so a test can tell tensors apart."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if name.endswith("norm.weight"):
            p.copy_(1 + scale * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(scale * noise)
    return module


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random tiny model (vocab 128, hidden 64) with its weights randomized for testing."""
    config = ModelConfig.preset("tiny", vocab_size=128, max_position_embeddings=64, **overrides)
    return randomize_(LlamaForCausalLM(config), seed).eval()


# ---- HF oracle cases ----

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=128,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # wavelengths 6..2e4 cover all three llama3 regimes
}

# (HF config class, kwargs): each row exercises one architecture feature.
CASES = {
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha_tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "llama_rope_linear": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
        ),
    ),
    "llama_rope_llama3_head_dim": (
        "LlamaConfig",
        dict(
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_parameters=LLAMA3_ROPE
        ),
    ),
    "qwen2_bias_tied": (
        "Qwen2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral_no_window": (
        "MistralConfig",
        dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None),
    ),
}


def make_pair(hf, case: str, seed: int = 0):
    """An HF model with random weights and our model loaded from its config and state dict."""
    cls_name, kwargs = CASES[case]
    hf_config = getattr(hf, cls_name)(**COMMON, **kwargs)
    hf_model = hf.AutoModelForCausalLM.from_config(hf_config).eval()
    randomize_(hf_model, seed)
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    with torch.device("meta"):
        ours = LlamaForCausalLM(config)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    ours.load_state_dict(state, strict=True, assign=True)
    ours.tie_weights()
    return hf_model, ours.eval()
