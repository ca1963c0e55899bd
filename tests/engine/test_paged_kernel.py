"""The fused CPU paged-attention kernel against a float64 reference that gathers each context."""

from __future__ import annotations

import pytest
import torch

from fastserve.engine import paged_kernel


def test_kernel_builds_on_this_machine():
    # CI machines have g++ and ninja: a failed build would silently slow the engine down
    assert paged_kernel.available()


def _reference(q, k_cache, v_cache, block_tables, seq_lens):
    nd, h, d = q.shape
    bs, h_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(nd, h, d, dtype=torch.float64)
    for r in range(nd):
        n = int(seq_lens[r])
        blocks = block_tables[r, : -(-n // bs)]
        k = k_cache[blocks].reshape(-1, h_kv, d)[:n].double().repeat_interleave(h // h_kv, 1)
        v = v_cache[blocks].reshape(-1, h_kv, d)[:n].double().repeat_interleave(h // h_kv, 1)
        scores = torch.einsum("hd,nhd->hn", q[r].double(), k) * d**-0.5
        out[r] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
@pytest.mark.parametrize("h, h_kv, bs", [(8, 2, 16), (4, 4, 4), (6, 1, 8)])
def test_kernel_matches_float64_reference(dtype, atol, h, h_kv, bs):
    g = torch.Generator().manual_seed(h * 100 + h_kv * 10 + bs)
    pool, d, nd = 64, 16, 7
    k_cache = torch.randn(pool, bs, h_kv, d, generator=g).to(dtype)
    v_cache = torch.randn(pool, bs, h_kv, d, generator=g).to(dtype)
    # lengths from 1 token to several blocks, partial last blocks, tables padded with block 0
    seq_lens = torch.tensor([1, bs - 1, bs, bs + 1, 3 * bs + 2, 5 * bs, 2], dtype=torch.long)
    nb = int(-(-seq_lens.max() // bs))
    perm = torch.randperm(pool, generator=g)
    tables = torch.zeros(nd, nb, dtype=torch.long)
    used = 0
    for r in range(nd):
        need = int(-(-seq_lens[r] // bs))
        tables[r, :need] = perm[used : used + need]
        used += need
    q = torch.randn(nd, h, d, generator=g).to(dtype)
    out = paged_kernel.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens)
    assert out.dtype == dtype and out.shape == q.shape
    ref = _reference(q, k_cache, v_cache, tables, seq_lens)
    assert (out.double() - ref).abs().max().item() < atol


def test_kernel_rejects_bad_input():
    k = torch.zeros(4, 4, 2, 8)
    q = torch.zeros(2, 4, 8)
    tables = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="seq_len out of range"):
        paged_kernel.paged_decode_attention(q, k, k, tables, torch.tensor([3, 9]))
    with pytest.raises(RuntimeError, match="block id out of range"):
        bad = torch.tensor([[0, 0], [7, 0]])
        paged_kernel.paged_decode_attention(q, k, k, bad, torch.tensor([3, 3]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        paged_kernel.paged_decode_attention(q.double(), k, k, tables, torch.tensor([3, 3]))
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        paged_kernel.paged_decode_attention(
            torch.zeros(2, 3, 8), k, k, tables, torch.tensor([1, 1])
        )
