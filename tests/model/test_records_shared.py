"""Deep Compression storage (model/shared.py, records.ShareRecord): the codec round-trips every
weight-shared tensor exactly (odd shapes, every width, pruned or dense, edge cases), codes close
to the streams' entropy, refuses corrupt parts by name; a model dir with weight-shared linears
and embeddings loads back bit for bit (also sharded and in bfloat16) and a corrupt one fails
with one CheckpointError naming the tensor."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastserve.errors import CheckpointError, ConfigError
from fastserve.model import load_model, save_model
from fastserve.model.shared import (
    DEEP_PARTS,
    PartError,
    SharedEmbedding,
    SharedLinear,
    deep_compress,
    deep_decompress,
    mark_shared,
    shared_modules,
)
from tiny_models import tiny_model, tiny_tokenizer


def _shared(shape, bits, sparsity=0.0, seed=0, dtype=torch.float32):
    """A tensor whose nonzeros take at most 2^bits values (a random codebook, random picks)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(2**bits, generator=g) * 0.1
    w = codebook[torch.randint(0, 2**bits, shape, generator=g)]
    w[torch.rand(shape, generator=g) < sparsity] = 0.0
    return w.to(dtype)


def _round_trip(w, bits):
    parts = deep_compress(w, bits)
    assert set(parts) == set(DEEP_PARTS)
    out = deep_decompress(parts, bits)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out, w.float())
    return parts


@pytest.mark.parametrize("shape", [(7, 13), (1, 5), (3,), (33, 17), (4, 1, 6), (0, 4)])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_random_shared_tensors_round_trip_exactly(shape, bits):
    _round_trip(_shared(shape, bits, sparsity=0.4, seed=bits), bits)
    _round_trip(_shared(shape, bits, seed=bits + 1), bits)  # dense: no pruned zeros


def test_edge_cases_round_trip():
    _round_trip(torch.zeros(5, 7), 4)  # all zero: empty codebook, no index stream
    one = torch.zeros(6, 9)
    one[4, 2] = -0.25
    _round_trip(one, 1)  # one nonzero
    single = torch.where(torch.rand(9, 11) < 0.5, 0.3, 0.0)
    parts = _round_trip(single, 4)  # a single distinct value: the index stream is empty
    assert parts["weight_codebook"].tolist() == [pytest.approx(0.3)]
    assert parts["weight_indices"].numel() == 0
    _round_trip(torch.full((3, 5), 2.0), 2)  # dense and single-valued: no stream at all
    _round_trip(_shared((32, 24), 4, sparsity=0.5, dtype=torch.bfloat16), 4)  # exact in fp32


def test_pruned_tensors_code_near_their_entropy():
    """Unstructured 50%: ~1 bit per position; 2:4: log2(6)/4 = 0.646 bits; indices at their
    empirical entropy (ANS with the tensor's own counts), never worse than raw bits."""
    w = _shared((256, 256), 4, seed=3)
    half = w.clone()
    half[torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.5] = 0.0
    two_four = w.clone().reshape(-1, 4)
    two_four.scatter_(1, two_four.abs().argsort(dim=1)[:, :2], 0.0)
    two_four = two_four.reshape(w.shape)
    for t, max_pos_bits in ((half, 1.0), (two_four, math.log2(6) / 4)):
        parts = _round_trip(t, 4)
        n = t.numel()
        counts = parts["weight_index_counts"].double()
        p = counts[counts > 0] / counts.sum()
        index_entropy = float(-(p * p.log2()).sum() * counts.sum())
        index_bits = 32 * parts["weight_indices"].numel()
        assert index_bits <= index_entropy + 64  # within two words of the entropy
        position_bits = 32 * parts["weight_positions"].numel()
        assert position_bits <= max_pos_bits * n * 1.002 + 64
    assert 32 * deep_compress(two_four, 4)["weight_positions"].numel() < 0.66 * two_four.numel()


def test_the_coded_words_are_pinned():
    """Stored archives must decode with later constriction versions: these words were written by
    constriction 0.5.0 (pyproject pins >=0.5,<0.6). If an upgrade changes them, the stream
    format changed: bump the format_version or keep the pin."""
    from fastserve.model.shared import decode_symbols, encode_symbols

    symbols = np.array([0, 1, 2, 3, 1, 1, 0, 2, 3, 3, 1, 0, 2, 1, 1, 0] * 4)
    counts = np.bincount(symbols, minlength=4)
    words = [3353935471, 2649058234, 3034314266, 3710238270, 16840]
    assert encode_symbols(symbols, counts).tolist() == words
    decoded = decode_symbols(np.array(words, dtype=np.uint32), counts, "weight_indices")
    assert decoded.tolist() == symbols.tolist()


def test_what_is_not_weight_shared_is_refused():
    with pytest.raises(ValueError, match="17 distinct nonzero values do not fit 16"):
        deep_compress(torch.arange(1, 18, dtype=torch.float32), 4)
    with pytest.raises(ValueError, match="non-finite"):
        deep_compress(torch.tensor([1.0, float("nan")]), 4)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits must be in"):
            deep_compress(torch.ones(3), bits)


def _corrupt(parts, part, edit):
    parts = {k: v.clone() for k, v in parts.items()}
    edit(parts)
    with pytest.raises(PartError) as info:
        deep_decompress(parts, 4)
    assert info.value.part == part, str(info.value)


def _flip(words):
    words[len(words) // 2] ^= 0x5A5A5A5A


def test_corrupt_parts_are_named():
    parts = deep_compress(_shared((64, 48), 4, sparsity=0.5), 4)
    pos, idx = parts["weight_positions"].numpy(), parts["weight_indices"].numpy()
    assert pos.size > 4 and idx.size > 4
    _corrupt(parts, "weight_indices", lambda p: _flip(p["weight_indices"].numpy()))
    _corrupt(parts, "weight_positions", lambda p: _flip(p["weight_positions"].numpy()))
    cut = torch.from_numpy(pos[:-3].copy())
    _corrupt(parts, "weight_positions", lambda p: p.update(weight_positions=cut))
    _corrupt(parts, "weight_indices", lambda p: p.update(weight_indices=p["weight_indices"][3:]))
    _corrupt(
        parts, "weight_codebook", lambda p: p.update(weight_codebook=p["weight_codebook"].flip(0))
    )
    _corrupt(parts, "weight_codebook", lambda p: p["weight_codebook"].__setitem__(0, 0.0))
    _corrupt(parts, "weight_codebook", lambda p: p.update(weight_codebook=torch.zeros(17)))
    _corrupt(parts, "weight_index_counts", lambda p: p["weight_index_counts"].__setitem__(0, 0))
    as_int32 = parts["weight_position_counts"].to(torch.int32)
    _corrupt(parts, "weight_position_counts", lambda p: p.update(weight_position_counts=as_int32))
    _corrupt(parts, "weight_shape", lambda p: p.update(weight_shape=torch.tensor([64, -48])))
    grown = torch.tensor([64, 49])  # a consistent stream cannot fill a larger shape
    _corrupt(parts, "weight_position_counts", lambda p: p.update(weight_shape=grown))
    _corrupt(parts, "weight_indices", lambda p: p.pop("weight_indices"))
    empty = deep_compress(torch.zeros(4, 4), 4)  # no information: a stored word is corrupt
    extra = torch.ones(1, dtype=torch.uint32)
    _corrupt(empty, "weight_positions", lambda p: p.update(weight_positions=extra))


def test_padding_bits_past_the_end_are_refused():
    w = torch.zeros(1, 5)
    w[0, 4] = 0.5
    parts = deep_compress(w, 1)  # symbols: 0b0000, 0b0001; the second one padded
    counts = parts["weight_position_counts"].clone()
    counts[1], counts[3] = 0, 1  # claim 0b0011 (weight 5 set: past the end) instead
    parts["weight_position_counts"] = counts
    parts["weight_positions"] = torch.from_numpy(_encode([0, 3], counts.numpy()))
    with pytest.raises(PartError, match="past the end"):
        deep_decompress(parts, 1)


def _encode(symbols, counts):
    from fastserve.model.shared import encode_symbols

    return encode_symbols(np.array(symbols), counts.astype(np.int64))


# ---- model dirs ----------------------------------------------------------------------------------

P = "model.layers.0."
PRUNED = [P + "mlp.up_proj", P + "self_attn.q_proj"]
DENSE = [P + "mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def _share_rounding(w, bits):
    """Round to 2^bits evenly spaced levels over [min, max] (a stand-in for k-means)."""
    levels = torch.linspace(float(w.min()), float(w.max()), 2**bits)
    nearest = (w.reshape(-1, 1) - levels).abs().argmin(dim=1)
    return torch.where(w == 0, 0.0, levels[nearest].reshape(w.shape))


def _shared_model():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for name in PRUNED:
            w = model.get_submodule(name).weight
            w.masked_fill_(w.abs() < w.abs().median(), 0.0)
        for name, bits in [*[(n, 4) for n in PRUNED + DENSE], ("model.embed_tokens", 3)]:
            w = model.get_submodule(name).weight
            w.copy_(_share_rounding(w, bits))
            mark_shared(model, name, bits)
        model.lm_head.weight.copy_(_share_rounding(model.lm_head.weight, 5))
        mark_shared(model, "lm_head", 5)
    sc = {"method": "test", "modules": {n: {"structure": "unstructured"} for n in PRUNED}}
    return model.eval(), tokenizer, sc


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    model, tokenizer, sc = _shared_model()
    path = tmp_path_factory.mktemp("shared") / "model"
    save_model(model, path, tokenizer=tokenizer, sparsity_config=sc)
    return model, path


def _assert_same(loaded, model):
    state = loaded.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name


def test_save_load_is_exact_and_the_records_describe_it(shared):
    model, path = shared
    assert isinstance(model.model.embed_tokens, SharedEmbedding)
    assert isinstance(model.lm_head, SharedLinear)
    assert shared_modules(model)["lm_head"] == 5
    loaded = load_model(path)
    _assert_same(loaded, model)
    assert type(loaded.get_submodule(PRUNED[0])) is torch.nn.Linear  # plain modules at load
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    config = json.loads((path / "config.json").read_text())
    wsc = config["weight_sharing_config"]
    assert wsc["format"] == "deep-compression" and wsc["format_version"] == 1
    assert wsc["bits"] == [3, 4, 5] and wsc["modules"]["model.embed_tokens"] == {"bits": 3}
    assert set(wsc["modules"]) == {*PRUNED, *DENSE, "model.embed_tokens", "lm_head"}
    sparse = config["sparsity_config"]["modules"]
    assert {m["format"] for m in sparse.values()} == {"dense"}  # stored by the shared record
    stored = load_file(str(path / "model.safetensors"))
    assert f"{PRUNED[0]}.weight" not in stored and "lm_head.weight" not in stored
    assert stored[f"{PRUNED[0]}.weight_indices"].dtype == torch.uint32
    with torch.no_grad():
        ids = torch.tensor([[5, 17, 42, 8]])
        assert torch.equal(loaded(ids), model(ids))


def test_sharded_and_bfloat16_dirs_load_exactly(shared, tmp_path):
    model, _ = shared
    save_model(model, tmp_path / "sharded", max_shard_size_bytes=4096)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    _assert_same(load_model(tmp_path / "sharded"), model)
    half = _shared_model()[0].to(torch.bfloat16)
    save_model(half, tmp_path / "bf16")
    loaded = load_model(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    _assert_same(loaded, half)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["weight_sharing_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


M = PRUNED[0]
CORRUPTIONS = {
    "format": (lambda c: c.update(format="dc"), None, "format 'dc'"),
    "version": (lambda c: c.update(format_version=2), None, "format_version 2"),
    "bits": (lambda c: c["modules"][M].update(bits=0), None, f"'{M}' .* needs bits in"),
    "not a linear": (
        lambda c: c["modules"].update({"model.norm": {"bits": 4}}),
        None,
        "'model.norm' .* is not a float linear or embedding",
    ),
    "fewer bits": (
        lambda c: c["modules"][M].update(bits=2),
        None,
        f"'{M}.weight_codebook' .* more than 2\\^2",
    ),
    "flipped word": (
        None,
        lambda t: _flip(t[f"{M}.weight_indices"].numpy()),
        f"'{M}.weight_indices' .*corrupt or truncated",
    ),
    "truncated": (
        None,
        lambda t: t.update({f"{M}.weight_positions": t[f"{M}.weight_positions"][:-2].clone()}),
        f"'{M}.weight_positions' .*corrupt or truncated",
    ),
    "missing part": (
        None,
        lambda t: t.pop(f"{M}.weight_codebook"),
        f"'{M}.weight_codebook' is missing",
    ),
    "dense copy": (
        None,
        lambda t: t.update({f"{M}.weight": torch.zeros(128, 64)}),
        f"unexpected tensor '{M}.weight'",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_shared_dirs_fail_clearly(case, shared, tmp_path):
    config_edit, tensor_edit, message = CORRUPTIONS[case]
    path = _copy(shared[1], tmp_path)
    if config_edit:
        _edit_config(path, config_edit)
    if tensor_edit:
        _edit_tensors(path, tensor_edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_a_weight_that_is_no_longer_shared_is_not_saved(tmp_path):
    model = _shared_model()[0]
    with torch.no_grad():
        model.get_submodule(DENSE[0]).weight.add_(torch.randn(64, 128) * 1e-3)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"'{DENSE[0]}': .* do not fit 16 centroids"):
        save_model(model, out)
    assert not out.exists() and not list(tmp_path.iterdir())
