"""Compressed model dirs: save -> load gives identical logits, the files hold packed int tensors,
the generate path and the engine serve them unchanged, and broken dirs fail with CheckpointError."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastserve.errors import CheckpointError, ConfigError
from fastserve.generate import generate
from fastserve.model import (
    LlamaForCausalLM,
    ModelConfig,
    QuantLinear,
    QuantScheme,
    load_model,
    quantization_modules,
    quantize_model,
    save_model,
)
from fastserve.model.kernels import select_path
from tiny_models import tiny_model, tiny_tokenizer

W4 = QuantScheme(bits=4, group_size=32)
W3A = QuantScheme(bits=3, group_size=32, symmetric=False)
W8 = QuantScheme(bits=8)
W8A8 = QuantScheme(bits=8, act_bits=8)
W4C = QuantScheme(bits=4, symmetric=False)  # per-channel
W8G = QuantScheme(bits=8, group_size=32)  # served by the dequant fallback

SCHEMES = {
    "model.layers.0.self_attn.q_proj": W4,
    "model.layers.0.self_attn.k_proj": W4,
    "model.layers.0.self_attn.v_proj": W4,
    "model.layers.0.self_attn.o_proj": W8,
    "model.layers.0.mlp.gate_proj": W8A8,
    "model.layers.0.mlp.up_proj": W8A8,
    "model.layers.0.mlp.down_proj": W3A,
    "model.layers.1.self_attn.q_proj": W4C,
    "model.layers.1.self_attn.k_proj": W8G,
    "model.layers.1.self_attn.v_proj": W4C,
    "model.layers.1.self_attn.o_proj": W4,
    "model.layers.1.mlp.gate_proj": W4,
    "model.layers.1.mlp.up_proj": W4,
    "model.layers.1.mlp.down_proj": W4C,
}
EXTRA = {"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["lm_head"], "recipe": "test"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(in-memory quantized model, its saved dir) for a ~100K-param model with a tokenizer."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    quantize_model(model, SCHEMES)
    model.eval()
    path = tmp_path_factory.mktemp("quant") / "model"
    save_model(model, path, tokenizer=tokenizer, quantization_config=EXTRA)
    return model, path


def _ids(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (2, n), generator=g)


def test_the_test_model_exercises_every_path(quantized):
    """Decode (1 row) and the 40-row forwards below between them run every kernel path."""
    model, _ = quantized
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    paths = {select_path(m, torch.zeros(rows, m.in_features)) for m in layers for rows in (1, 40)}
    assert paths == {"int4pack", "int8pack", "int8x2", "int_mm", "dequant"}


def test_save_load_gives_identical_logits(quantized):
    model, path = quantized
    loaded = load_model(path)
    assert quantization_modules(loaded) == SCHEMES
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            ref = model.get_submodule(name)
            assert torch.equal(m.weight_packed, ref.weight_packed)
            assert torch.equal(m.weight_scale, ref.weight_scale)


def test_dir_holds_packed_tensors_and_the_config(quantized):
    model, path = quantized
    tensors = load_file(str(path / "model.safetensors"))
    hidden, inter = 64, 128
    p = "model.layers.0."
    expect = {
        p + "self_attn.q_proj.weight_packed": (torch.uint8, (64, hidden // 2)),
        p + "self_attn.q_proj.weight_scale": (torch.float32, (64, hidden // 32)),
        p + "self_attn.o_proj.weight_packed": (torch.int8, (hidden, 64)),
        p + "self_attn.o_proj.weight_scale": (torch.float32, (hidden, 1)),
        p + "mlp.gate_proj.weight_packed": (torch.int8, (inter, hidden)),
        p + "mlp.down_proj.weight_packed": (torch.uint8, (hidden, inter // 2)),
        p + "mlp.down_proj.weight_zero_point": (torch.uint8, (hidden, inter // 32)),
        "model.layers.1.self_attn.q_proj.weight_zero_point": (torch.uint8, (64, 1)),
        "model.layers.1.self_attn.k_proj.weight_scale": (torch.float32, (32, 2)),
        "model.embed_tokens.weight": (torch.float32, (300, hidden)),
        "lm_head.weight": (torch.float32, (300, hidden)),
    }
    for name, (dtype, shape) in expect.items():
        assert tensors[name].dtype == dtype and tuple(tensors[name].shape) == shape, name
    assert not any(n.endswith("proj.weight") for n in tensors)  # no dense copy of a quantized layer
    assert not any(n.startswith(p + "self_attn.q_proj.weight_zero") for n in tensors)  # symmetric
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fastserve" and qc["format_version"] == 1
    assert {k: qc[k] for k in EXTRA} == EXTRA
    assert qc["modules"] == {name: s.to_dict() for name, s in SCHEMES.items()}
    # the compressed file is smaller than the dense one would be
    dense_proj_bytes = sum(
        m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, QuantLinear)
    )
    quant_bytes = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert quant_bytes < dense_proj_bytes / 3


def test_load_in_bfloat16_keeps_the_quantized_tensors(quantized):
    model, path = quantized
    loaded = load_model(path, dtype="bfloat16")
    m = loaded.model.layers[0].self_attn.q_proj
    assert m.weight_scale.dtype == torch.float32 and m.weight_packed.dtype == torch.uint8
    assert loaded.dtype == torch.bfloat16 and m.dtype == torch.bfloat16
    ids = _ids()
    with torch.no_grad():
        a, b = loaded(ids), model(ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@torch.no_grad()
def _no_cache_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_generate_on_a_loaded_dir_equals_the_in_memory_reference(quantized):
    model, path = quantized
    loaded = load_model(path)
    prompt = _ids(7, seed=3)[0].tolist()
    out = generate(loaded, prompt, max_new_tokens=16)
    assert out == _no_cache_greedy(model, prompt, 16)


def test_cli_generate_serves_a_compressed_dir(quantized, capsys):
    from fastserve.cli import main

    _, path = quantized
    assert (
        main(["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens", "5"])
        == 0
    )
    assert "the cat" in capsys.readouterr().out


@pytest.mark.slow
def test_engine_serves_a_compressed_dir(quantized):
    from fastserve.engine import LLM, SamplingParams

    model, path = quantized
    llm = LLM(str(path))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 20))] for _ in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _no_cache_greedy(model, prompt, 12)


# ---- errors --------------------------------------------------------------------------------------


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"
CONFIG_EDITS = {
    "foreign method": (
        lambda c: c["quantization_config"].update(quant_method="gptq"),
        "quant_method 'gptq'",
    ),
    "future version": (
        lambda c: c["quantization_config"].update(format_version=2),
        "format_version 2",
    ),
    "no modules": (lambda c: c["quantization_config"].update(modules={}), "lists no modules"),
    "bad bits": (
        lambda c: c["quantization_config"]["modules"][Q].update(bits=5),
        f"'{Q}'.*bits must be one of",
    ),
    "not a linear": (
        lambda c: c["quantization_config"]["modules"].update({"model.norm": W8.to_dict()}),
        "'model.norm' .* is not a linear layer",
    ),
    "scheme mismatch": (  # files hold int4 groups of 32, config says 8-bit per-channel
        lambda c: c["quantization_config"]["modules"].update({Q: W8.to_dict()}),
        f"tensor '{Q}.weight_packed' .* has shape",
    ),
    "dense layer listed": (  # a module listed as quantized whose file tensors are dense
        lambda c: c["quantization_config"]["modules"].update({"lm_head": W8.to_dict()}),
        "lm_head stays dense",
    ),
    "group does not divide": (
        lambda c: c["quantization_config"]["modules"][Q].update(group_size=48),
        "does not divide in_features",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_bad_quantization_config(case, quantized, tmp_path):
    edit, message = CONFIG_EDITS[case]
    path = _copy(quantized[1], tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


TENSOR_EDITS = {
    "int widened": (
        lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"].to(torch.int32)}),
        "dtype int32, expected uint8",
    ),
    "scale downcast": (
        lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].half()}),
        "dtype float16, expected float32",
    ),
    "missing scale": (lambda t: t.pop(f"{Q}.weight_scale"), "weight_scale' is missing"),
    "dense weight instead": (
        lambda t: t.update({f"{Q}.weight": torch.zeros(64, 64)}),
        f"unexpected tensor '{Q}.weight'",
    ),
    "zero point out of range": (
        lambda t: t["model.layers.0.mlp.down_proj.weight_zero_point"].fill_(9),
        "weight_zero_point exceeds 7",
    ),
    "nan scale": (lambda t: t[f"{Q}.weight_scale"].fill_(float("nan")), "non-finite"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_bad_quantized_tensors(case, quantized, tmp_path):
    edit, message = TENSOR_EDITS[case]
    path = _copy(quantized[1], tmp_path)
    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_save_errors_leave_nothing_on_disk(quantized, tmp_path):
    model, _ = quantized
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="must not set"):
        save_model(model, out, quantization_config={"modules": {}})
    dense = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=64, num_hidden_layers=1))
    with pytest.raises(ConfigError, match="no QuantLinear"):
        save_model(dense, out, quantization_config={"method": "rtn"})
    assert not out.exists()


def test_a_dense_dir_has_no_quantization_config(tmp_path):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=64, num_hidden_layers=1))
    save_model(model, tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert quantization_modules(load_model(tmp_path / "dense")) == {}
