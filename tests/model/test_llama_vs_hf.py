"""Logits of LlamaForCausalLM against HF transformers (eager attention) on identical weights."""

from __future__ import annotations

import pytest
import torch
from model_helpers import CASES, LLAMA3_ROPE, make_pair, max_diff, random_ids


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(hf, case):
    hf_model, ours = make_pair(hf, case)
    ids = random_ids(128, batch=2, length=40)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # weights are random enough for the logits to differ
    assert max_diff(got, expected) <= 1e-4


def test_state_dict_names_match_hf(hf):
    for case in CASES:
        hf_model, ours = make_pair(hf, case)
        hf_keys = {k for k in hf_model.state_dict() if "rotary_emb" not in k}
        assert set(ours.state_dict()) == hf_keys, case
        if ours.config.tie_word_embeddings:
            assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_config_read_from_v5_dict(hf):
    _, ours = make_pair(hf, "llama_rope_llama3_head_dim")
    c = ours.config
    assert c.head_dim == 32 and c.rope_theta == 500000.0
    assert c.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    _, qwen = make_pair(hf, "qwen2_bias_tied")
    assert qwen.config.attention_bias and qwen.config.tie_word_embeddings
