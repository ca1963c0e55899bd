"""Sparse checkpoints: the bitmask format (compressed-tensors' sparse-bitmask layout), exact round
trips through save_model / load_model (sharded, bf16, combined with quantized linears), the size
they save, and one CheckpointError / ConfigError per corruption, naming the module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastserve.errors import CheckpointError, ConfigError
from fastserve.model import QuantScheme, load_model, quantize_model, save_model
from fastserve.model.checkpoint import INDEX_FILE, read_records
from fastserve.model.quantized import QuantLinear
from fastserve.model.sparse import (
    bitmask_compress,
    bitmask_decompress,
    nm_violations,
    pack_bitmask,
    parse_structure,
    unpack_bitmask,
)
from tiny_models import tiny_model, tiny_tokenizer

P = "model.layers.0."
NM_MODULES = [P + "mlp.up_proj", P + "self_attn.q_proj", "model.layers.1.mlp.down_proj"]
UNSTRUCTURED = [P + "mlp.gate_proj", "model.layers.1.self_attn.o_proj"]
QUANTIZED = "model.layers.1.mlp.up_proj"  # pruned 2:4, then int8: stored as a QuantLinear


def _prune_2of4(w: torch.Tensor) -> None:
    """Zero the 2 smallest |w| of every 4 input columns, in place."""
    g = w.data.reshape(-1, 4)
    idx = g.abs().argsort(dim=1)[:, :2]
    g.scatter_(1, idx, 0.0)


def _prune_half_rows(w: torch.Tensor) -> None:
    k = w.shape[1] // 2
    idx = w.data.abs().argsort(dim=1)[:, :k]
    w.data.scatter_(1, idx, 0.0)


def _sparse_model():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for name in [*NM_MODULES, QUANTIZED]:
            _prune_2of4(model.get_submodule(name).weight)
        for name in UNSTRUCTURED:
            _prune_half_rows(model.get_submodule(name).weight)
    quantize_model(model, {QUANTIZED: QuantScheme(bits=8)})
    modules = {n: {"structure": "2:4"} for n in [*NM_MODULES, QUANTIZED]}
    modules.update({n: {"structure": "unstructured"} for n in UNSTRUCTURED})
    return model.eval(), tokenizer, {"method": "test", "recipe": "t", "modules": modules}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    model, tokenizer, sc = _sparse_model()
    path = tmp_path_factory.mktemp("sparse") / "model"
    save_model(model, path, tokenizer=tokenizer, sparsity_config=sc)
    return model, path, sc


def test_bitmask_layout_is_little_endian_packbits():
    kept = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_bitmask(kept)
    assert bits.dtype == torch.uint8 and bits.shape == (5, 2)
    assert np.array_equal(bits.numpy(), np.packbits(kept.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(bits, 13), kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_round_trip_is_exact(dtype):
    w = torch.randn(7, 20, generator=torch.Generator().manual_seed(1)).to(dtype)
    w[w.abs() < 0.7] = 0
    w[3] = 0  # an empty row
    parts = bitmask_compress(w)
    assert parts["compressed"].numel() == int((w != 0).sum()) and parts["compressed"].dtype == dtype
    assert parts["shape"].tolist() == [7, 20] and parts["row_offsets"].dtype == torch.int64
    assert torch.equal(bitmask_decompress(**parts), w)


def test_structure_parsing_and_nm_check():
    assert parse_structure("unstructured") is None and parse_structure("4:8") == (4, 8)
    for bad in ("4:2", "2:2", "0:4", "2/4", "a:b", 24):
        with pytest.raises(ValueError, match="mask_structure"):
            parse_structure(bad)
    kept = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert nm_violations(kept, 2, 4) == 1 and nm_violations(kept, 3, 4) == 0


def test_save_load_is_exact_and_the_config_describes_it(sparse):
    model, path, _ = sparse
    loaded = load_model(path)
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, ref[name]), name
    assert isinstance(loaded.get_submodule(QUANTIZED), QuantLinear)
    assert type(loaded.get_submodule(NM_MODULES[0])) is torch.nn.Linear
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    sc = json.loads((path / "config.json").read_text())["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["format_version"] == 1
    assert sc["sparsity_structure"] == ["2:4", "unstructured"] and sc["method"] == "test"
    assert sc["modules"][QUANTIZED]["format"] == "dense"
    assert sc["modules"][NM_MODULES[0]] == {
        "format": "sparse-bitmask",
        "structure": "2:4",
        "sparsity": 0.5,
    }
    assert abs(sc["global_sparsity"] - 0.5) < 0.01
    assert list(read_records(path)) == ["quantization_config", "sparsity_config"]


def test_files_hold_bitmasks_and_shrink(sparse, tmp_path):
    model, path, _ = sparse
    tensors = load_file(str(path / "model.safetensors"))
    name = NM_MODULES[0]
    assert f"{name}.weight" not in tensors and f"{QUANTIZED}.weight_packed" in tensors
    out, inp = model.get_submodule(name).weight.shape
    assert tensors[f"{name}.compressed"].shape == (out * inp // 2,)
    assert tensors[f"{name}.bitmask"].shape == (out, inp // 8)
    dense_bytes = out * inp * 4
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name))
    # 4 bytes per kept weight, 1 bit per weight, an int64 offset per row, the shape
    assert stored == 4 * (out * inp // 2) + out * inp // 8 + 8 * out + 16
    assert stored < 0.6 * dense_bytes
    dense_model = tiny_model(tiny_tokenizer())
    save_model(dense_model, tmp_path / "dense")
    sparse_size = (path / "model.safetensors").stat().st_size
    assert sparse_size < (tmp_path / "dense" / "model.safetensors").stat().st_size


def test_sharded_bf16_and_quantized_records(tmp_path):
    model, tokenizer, sc = _sparse_model()
    save_model(model, tmp_path / "m", sparsity_config=sc, max_shard_size_bytes=40_000)
    weight_map = json.loads((tmp_path / "m" / INDEX_FILE).read_text())["weight_map"]
    shards_of = {}
    for name, f in weight_map.items():
        if name.endswith((".compressed", ".bitmask", ".row_offsets", ".shape")):
            shards_of.setdefault(name.rpartition(".")[0], set()).add(f)
    assert any(len(files) > 1 for files in shards_of.values())  # one weight's parts, two shards
    loaded = load_model(tmp_path / "m")
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    bf16 = load_model(tmp_path / "m", dtype="bfloat16")
    w = bf16.get_submodule(NM_MODULES[0]).weight
    assert w.dtype == torch.bfloat16 and nm_violations(w != 0, 2, 4) == 0


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["sparsity_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _flip_bit(t):
    t[f"{NM_MODULES[0]}.bitmask"][0, 0] ^= 1


M, U = NM_MODULES[0], UNSTRUCTURED[0]
CORRUPTIONS = {
    "format": (lambda c: c.update(format="sparse-24"), None, "format 'sparse-24'"),
    "version": (lambda c: c.update(format_version=9), None, "format_version 9"),
    "no modules": (lambda c: c.update(modules={}), None, "lists no modules"),
    "bad entry": (lambda c: c["modules"][M].update(structure="5:4"), None, f"'{M}'.*structure"),
    "not a linear": (
        lambda c: c["modules"].update({"model.norm": c["modules"][M]}),
        None,
        "'model.norm' .* is not a float linear",
    ),
    "structure lie": (
        lambda c: c["modules"][U].update(structure="2:4"),
        None,
        f"'{U}' .* breaks its 2:4 structure",
    ),
    "flipped bit": (None, _flip_bit, f"'{M}' .* bitmask marks"),
    "missing part": (None, lambda t: t.pop(f"{M}.row_offsets"), f"'{M}.row_offsets' is missing"),
    "dense copy": (
        None,
        lambda t: t.update({f"{M}.weight": torch.zeros(128, 64)}),
        f"unexpected tensor '{M}.weight'",
    ),
    "bad offsets": (None, lambda t: t[f"{M}.row_offsets"].add_(1), "row_offsets do not match"),
}


def test_a_part_stored_twice_fails(sparse, tmp_path):
    path = _copy(sparse[1], tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    extra = {f"{M}.bitmask": tensors[f"{M}.bitmask"]}
    save_file(extra, str(path / "extra.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(tensors, "model.safetensors")}}
    index["weight_map"]["zz"] = "extra.safetensors"  # a second shard repeating one part
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{M}.bitmask' appears twice"):
        load_model(path)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_sparse_dirs_fail_clearly(case, sparse, tmp_path):
    config_edit, tensor_edit, message = CORRUPTIONS[case]
    path = _copy(sparse[1], tmp_path)
    if config_edit:
        _edit_config(path, config_edit)
    if tensor_edit:
        _edit_tensors(path, tensor_edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_save_errors_leave_nothing_on_disk(sparse, tmp_path):
    model, _, sc = sparse
    out = tmp_path / "out"
    broken = {**sc, "modules": {**sc["modules"], U: {"structure": "2:4"}}}
    with pytest.raises(ConfigError, match=f"'{U}' does not have its 2:4 pattern"):
        save_model(model, out, sparsity_config=broken)
    with pytest.raises(ConfigError, match="must not set"):
        save_model(model, out, sparsity_config={**sc, "format": "x"})
    with pytest.raises(ConfigError, match="'lm_head' is not a decoder linear"):
        save_model(model, out, sparsity_config={"modules": {"lm_head": {"structure": "2:4"}}})
    with pytest.raises(ConfigError, match="mask_structure"):
        save_model(model, out, sparsity_config={"modules": {M: {"structure": "4:2"}}})
    with pytest.raises(ConfigError, match="name its pruned modules"):
        save_model(model, out, sparsity_config={"method": "x"})
    assert not out.exists()
