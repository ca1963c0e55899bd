"""Deep Compression: k-means weight sharing against brute-force references (nearest centroids,
Lloyd's steps, losses), the `deep-compression` preset end to end (a dir that loads bit for bit,
is much smaller than the bitmask dir of the same weights, and serves the in-memory model's
greedy tokens through generate and the engine), dense sharing with the embedding and head, bad
recipes failing before anything is written, and the CLI once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from compress_helpers import assert_served_like, run_cli

from fastserve.compress import Recipe, compress, compress_model
from fastserve.compress.share import kmeans_1d, share_weight
from fastserve.errors import ConfigError
from fastserve.model import load_model, save_model
from fastserve.model.shared import SharedEmbedding, SharedLinear

MAX_TOKENS = 12
EXAMPLES = Path(__file__).parents[2] / "examples" / "recipes"


def _values(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed, like trained weights (Student-t, 4 degrees of freedom)."""
    torch.manual_seed(seed)
    return (torch.distributions.StudentT(4.0).sample((n,)) * 0.02).float()


def _distances(v: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (v.double()[:, None] - centroids.double()[None, :]).abs()


def _naive_lloyd(v: torch.Tensor, k: int, num_iters: int) -> torch.Tensor:
    """The textbook algorithm: O(n k) nearest assignment, then means (empty clusters stay)."""
    v = v.double()
    c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    for _ in range(num_iters):
        a = _distances(v, c).argmin(dim=1)
        c = torch.stack([v[a == j].mean() if (a == j).any() else c[j] for j in range(k)])
    return c


def test_kmeans_equals_the_textbook_lloyd_and_assigns_nearest():
    v = _values()
    for num_iters in (1, 6):
        r = kmeans_1d(v, 16, max_iter=num_iters)
        assert r.num_iters == num_iters and not r.converged
        torch.testing.assert_close(r.centroids, _naive_lloyd(v, 16, num_iters), rtol=0, atol=1e-8)
    r = kmeans_1d(v, 16, max_iter=1000)
    assert r.converged and r.num_iters < 1000
    assert torch.equal(r.centroids, r.centroids.float().double())  # float32 values, stored as is
    assert bool((r.centroids[1:] > r.centroids[:-1]).all())
    d = _distances(v, r.centroids)
    chosen = d.gather(1, r.assignment[:, None]).squeeze(1)
    assert torch.equal(chosen, d.min(dim=1).values)  # every value at its nearest centroid
    assert r.loss == pytest.approx(float(d.min(dim=1).values.pow(2).sum()), rel=1e-12)
    init = torch.linspace(float(v.min()), float(v.max()), 16, dtype=torch.float64)
    init_loss = float(_distances(v, init).min(dim=1).values.pow(2).sum())
    assert r.init_loss == pytest.approx(init_loss, rel=1e-12)
    assert r.loss < 0.8 * r.init_loss  # Lloyd improves on the linear initialisation
    for j in torch.unique(r.assignment):  # a fixed point: each centroid is its members' mean
        members = v.double()[r.assignment == j]
        assert float(r.centroids[j]) == pytest.approx(float(members.mean()), abs=1e-8)


def test_share_weight_keeps_zeros_and_is_deterministic():
    w = _values(64 * 48, seed=1).reshape(64, 48)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.5] = 0.0
    for bits in (1, 3, 4, 8):
        shared, r = share_weight(w, bits)
        assert shared.shape == w.shape and shared.dtype == w.dtype
        assert torch.equal(shared[w == 0], torch.zeros(int((w == 0).sum())))
        nonzero = shared[w != 0]
        assert torch.unique(nonzero).numel() <= 2**bits and bool((nonzero != 0).all())
        nearest = _distances(w[w != 0], r.centroids).argmin(dim=1)
        assert torch.equal(nonzero.double(), r.centroids[nearest])  # zeros are no centroid
        assert torch.equal(share_weight(w, bits)[0], shared)
    few = torch.tensor([[0.0, 0.5, -0.25], [0.5, 0.0, 0.125]])  # 3 values <= 4 centroids
    shared, r = share_weight(few, 2)
    assert torch.equal(shared, few) and r.loss == 0.0
    zeros, r = share_weight(torch.zeros(3, 4), 4)
    assert r is None and torch.equal(zeros, torch.zeros(3, 4))


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_deep_compression_preset_end_to_end(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "dc"
    result = compress(compress_model_dir, "deep-compression", calib_file, out, 16, 64)
    model = result.model
    assert len(result.layer_errors) == 2 and all(0 <= e < 1.0 for e in result.layer_errors)
    config = json.loads((out / "config.json").read_text())
    wsc, sc = config["weight_sharing_config"], config["sparsity_config"]
    assert wsc["format"] == "deep-compression" and wsc["bits"] == 4
    assert len(wsc["modules"]) == 14 + 2  # every decoder linear, the embedding and the head
    assert sc["global_sparsity"] == 0.5 and sc["method"] == "sparsegpt"
    assert {m["format"] for m in sc["modules"].values()} == {"dense"}  # stored by the archive
    for name in wsc["modules"]:
        w = model.get_submodule(name).weight
        assert torch.unique(w[w != 0]).numel() <= 16, name
    assert isinstance(model.lm_head, SharedLinear)
    assert isinstance(model.model.embed_tokens, SharedEmbedding)
    saved = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert saved.to_dict() == Recipe.preset("deep-compression").to_dict()
    assert Recipe.load(EXAMPLES / "deep-compression.yaml").modifiers == saved.modifiers

    loaded = load_model(out)  # decoded at load: plain modules, the shared weights bit for bit
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    state = loaded.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name
    # The same weights in the sparse-bitmask format (what the sparse50 presets write) and the
    # float32 source: the archive is ~6x smaller than the first and ~9.5x than the second.
    plain = tmp_path / "bitmask"
    modules = {n: {"structure": "unstructured"} for n in sc["modules"]}
    save_model(loaded, plain, sparsity_config={"modules": modules})
    assert _weights_bytes(out) < 0.2 * _weights_bytes(plain)
    assert _weights_bytes(out) < 0.12 * _weights_bytes(compress_model_dir)
    assert_served_like(out, model, MAX_TOKENS, loaded=loaded)


def test_dense_sharing_with_embeddings_needs_no_data(compress_model_dir, tmp_path):
    recipe = Recipe.from_dict(
        {"modifiers": [{"type": "KMeans", "bits": 3, "include_embeddings": True}]}
    )
    result = compress(compress_model_dir, recipe, None, tmp_path / "km")
    assert result.num_samples == 0 and "sparsity_config" not in result.records
    config = json.loads((tmp_path / "km" / "config.json").read_text())
    assert "sparsity_config" not in config and config["weight_sharing_config"]["bits"] == 3
    loaded = load_model(tmp_path / "km")
    state = loaded.state_dict()
    for name, t in result.model.state_dict().items():
        assert torch.equal(state[name], t), name
    w = loaded.lm_head.weight
    assert bool((w != 0).all()) and torch.unique(w).numel() <= 8


def test_tied_embedding_is_shared_once(tmp_path):
    from compress_helpers import tiny_config

    from fastserve.model import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config().replace(tie_word_embeddings=True))
    model.init_weights(seed=3)
    recipe = {"modifiers": [{"type": "KMeans", "include_embeddings": True, "targets": ["q_proj"]}]}
    compress_model(model, Recipe.from_dict(recipe), None)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.embed_tokens, SharedEmbedding)
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.unique(model.lm_head.weight).numel() <= 16
    save_model(model, tmp_path / "tied")  # stored once, as the embedding; tied again at load
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    assert "lm_head" not in config["weight_sharing_config"]["modules"]
    loaded = load_model(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def _bad(recipe, out, match, model_dir, calib):
    with pytest.raises(ConfigError, match=match):
        compress(model_dir, recipe, calib, out, num_samples=4, seq_len=16)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_bad_recipes_fail_before_writing(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    recipe = tmp_path / "r.yaml"
    cases = {
        "  - type: KMeans\n    bits: 0\n": r"bits must be an integer in \[1, 8\], got 0",
        "  - type: KMeans\n    bits: 9\n": r"bits must be an integer in \[1, 8\], got 9",
        "  - type: KMeans\n    centroids: 16\n": "unknown parameter.*centroids",
        "  - type: KMeans\n    max_iter: -1\n": "max_iter must be an integer >= 0",
        "  - type: KMeans\n    include_embeddings: 1\n": "include_embeddings must be true or false",
        "  - type: KMeans\n  - type: GPTQ\n    bits: 4\n": "weight-shared by modifier 1",
        "  - type: KMeans\n  - type: Wanda\n": "weight-shared by modifier 1",
        "  - type: KMeans\n  - type: KMeans\n    targets: [up_proj]\n": "weight-shared by",
        "  - type: RTN\n  - type: KMeans\n": "is quantized by modifier 1",
    }
    for body, match in cases.items():
        recipe.write_text("modifiers:\n" + body)
        _bad(recipe, out, match, compress_model_dir, calib_file)
    _bad("deep-compression", out, "needs calibration data", compress_model_dir, None)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_compress_deep_compression_then_generate(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "cli-dc"

    proc = run_cli(
        *("compress", str(compress_model_dir), "--recipe", "deep-compression"),
        *("--calib", str(calib_file), "--out", str(out), "--num-samples", "8", "--seq-len", "32"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "weight_sharing_config" in (out / "config.json").read_text()
    proc = run_cli("generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat")
    bad = tmp_path / "bad.yaml"
    bad.write_text("modifiers:\n  - type: KMeans\n    bits: 9\n")
    proc = run_cli(
        "compress", str(compress_model_dir), "--recipe", str(bad), "--out", str(out) + "2"
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bits must be an integer in [1, 8], got 9" in proc.stderr
    assert not Path(str(out) + "2").exists()
