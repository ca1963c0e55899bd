"""generate(): cached greedy == naive no-cache loop == HF generate; sampling filters; limits."""

from __future__ import annotations

import pytest
import torch
from model_helpers import tiny_model

from fastserve.errors import ConfigError, FastServeError
from fastserve.generate import generate, generate_output, sample_next_token
from fastserve.model import save_model

PROMPT = [5, 17, 99, 3, 42, 8]


def naive_greedy(model, prompt, n, eos=None):
    """Full forward over the whole sequence for every new token: no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(token)
            if token == eos:
                break
    return seq[len(prompt) :]


def test_greedy_equals_naive_loop():
    model = tiny_model(seed=4)
    expected = naive_greedy(model, PROMPT, 25)
    assert len(set(expected)) > 3  # not a degenerate constant sequence
    out = generate_output(model, PROMPT, 25)
    assert out.token_ids == expected and out.finish_reason == "length"


def test_greedy_equals_hf_generate(hf, tmp_path):
    model = tiny_model(seed=4)
    save_model(model, tmp_path / "m")
    hf_model = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([PROMPT])
    hf_out = hf_model.generate(
        ids, do_sample=False, max_new_tokens=25, eos_token_id=None, pad_token_id=0
    )
    assert generate(model, PROMPT, 25) == hf_out[0, len(PROMPT) :].tolist()

    # With an eos both stop at its first occurrence, eos included.
    eos = naive_greedy(model, PROMPT, 25)[10]
    hf_out = hf_model.generate(
        ids, do_sample=False, max_new_tokens=25, eos_token_id=eos, pad_token_id=0
    )
    out = generate_output(model, PROMPT, 25, eos_token_id=eos)
    assert out.finish_reason == "eos" and out.token_ids[-1] == eos
    assert out.token_ids == naive_greedy(model, PROMPT, 25, eos=eos)
    assert out.token_ids == hf_out[0, len(PROMPT) :].tolist()


def test_context_limit_stops_cleanly():
    model = tiny_model(seed=4)  # max_position_embeddings 64
    prompt = list(range(60))
    out = generate_output(model, prompt, 10)
    assert out.finish_reason == "context" and len(out.token_ids) == 4
    assert "context of 64" in out.message
    assert out.token_ids == naive_greedy(model, prompt, 4)
    assert generate_output(model, list(range(64)), 5).token_ids == []
    assert generate_output(model, list(range(70)), 5).finish_reason == "context"
    assert generate_output(model, prompt, 4).finish_reason == "length"
    assert generate(model, prompt, 0) == []


def test_sampling_is_seeded_and_restores_mode():
    model = tiny_model(seed=4).train()
    a = generate(model, PROMPT, 20, temperature=1.0, seed=1)
    assert a == generate(model, PROMPT, 20, temperature=1.0, seed=1)
    assert a != generate(model, PROMPT, 20, temperature=1.0, seed=2)
    assert model.training
    greedy = generate(model, PROMPT, 20)
    assert generate(model, PROMPT, 20, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, PROMPT, 20, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_sample_next_token_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next_token(logits, 1.0, generator=g, **kw).tolist())

    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert support(top_p=0.5) == {0}
    assert support(top_p=0.81) == {0, 1, 2}
    assert support() == {0, 1, 2, 3}
    freq = torch.bincount(sample_next_token(logits, 1.0, generator=g), minlength=4) / 4000
    assert max_abs(freq, probs) < 0.03
    # Temperature 0.5 squares the probabilities (renormalised).
    freq = torch.bincount(sample_next_token(logits, 0.5, generator=g), minlength=4) / 4000
    assert max_abs(freq, probs**2 / (probs**2).sum()) < 0.03
    assert sample_next_token(logits[:2], 0.0).tolist() == [0, 0]


def max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (dict(input_ids=[]), FastServeError, "at least one token"),
        (dict(temperature=-1.0), ConfigError, "temperature"),
        (dict(top_k=0), ConfigError, "top_k"),
        (dict(top_p=0.0), ConfigError, "top_p"),
        (dict(max_new_tokens=-1), ConfigError, "max_new_tokens"),
    ],
)
def test_generate_errors(kwargs, error, needle):
    args = {"input_ids": PROMPT, "max_new_tokens": 5, **kwargs}
    with pytest.raises(error, match=needle):
        generate(tiny_model(), **args)
