"""Paged attention: slot arithmetic by hand, both attention paths against a naive float64 loop."""

from __future__ import annotations

import pytest
import torch
from h3_helpers import reference_attention

from fastserve.engine.attention import AttentionMetadata, PagedAttention


def test_slot_mapping_hand_computed():
    # block_size 4. b: decode at position 2 in block 3. a: positions 5..7 with table [7, 2, 9]
    # (the module docstring's example). c: fresh prefill of 6 tokens in blocks [0, 5].
    meta = AttentionMetadata.build(
        query_lens=[1, 3, 6], seq_lens=[3, 8, 6], block_tables=[[3], [7, 2, 9], [0, 5]],
        block_size=4,
    )  # fmt: skip
    assert meta.slot_mapping.tolist() == [14, 9, 10, 11, 0, 1, 2, 3, 20, 21]
    assert meta.positions.tolist() == [2, 5, 6, 7, 0, 1, 2, 3, 4, 5]
    assert meta.query_start_loc == [0, 1, 4, 10]
    assert meta.num_decodes == 1
    assert meta.decode_blocks.tolist() == [[3]]
    assert meta.decode_mask.flatten().tolist() == [True, True, True, False]
    assert meta.context_blocks[0].tolist() == [7, 2]  # positions 0..7: two whole blocks
    assert meta.context_blocks[1] is None  # no cached prefix: attends to the step's own K/V


def test_decode_blocks_padded_and_masked():
    meta = AttentionMetadata.build([1, 1], [3, 6], [[3], [1, 4]], block_size=4)
    # row 0 past its table reads the pad block 0; those keys are masked out
    assert meta.decode_blocks.tolist() == [[3, 0], [1, 4]]
    assert meta.decode_mask[:, 0, 0].tolist() == [
        [True] * 3 + [False] * 5,
        [True] * 6 + [False] * 2,
    ]
    off = AttentionMetadata.build([1, 1], [3, 6], [[3], [1, 4]], 4, batch_decodes=False)
    assert off.num_decodes == 0 and off.decode_blocks is None and len(off.context_blocks) == 2


def test_build_rejects_short_block_table():
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([2], [9], [[0, 1]], block_size=4)


def _case(dtype: torch.dtype, seed: int = 0):
    """Random caches, shuffled block tables, and one step mixing decodes and prefill chunks."""
    g = torch.Generator().manual_seed(seed)
    num_blocks, bs, h, h_kv, d = 24, 4, 4, 2, 8
    caches = [torch.randn(num_blocks, bs, h_kv, d, generator=g).to(dtype) for _ in range(2)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    # (num_computed, num_new): three decodes of different lengths, a chunk after a prefix, a
    # fresh prefill, and a decode placed after the chunks (it goes through the per-request path)
    shapes = [(6, 1), (0, 1), (12, 1), (5, 4), (0, 7), (9, 1)]
    tables = []
    for c, n in shapes:
        nb = -(-(c + n) // bs)
        tables.append([perm.pop() for _ in range(nb)])
    n_tok = sum(n for _, n in shapes)
    q = torch.randn(1, h, n_tok, d, generator=g).to(dtype)
    k = torch.randn(1, h_kv, n_tok, d, generator=g).to(dtype)
    v = torch.randn(1, h_kv, n_tok, d, generator=g).to(dtype)
    return caches, shapes, tables, bs, q, k, v


def _run(caches, shapes, tables, bs, q, k, v, batch_decodes, fused=False):
    kc, vc = caches[0].clone(), caches[1].clone()
    meta = AttentionMetadata.build(
        [n for _, n in shapes],
        [c + n for c, n in shapes],
        tables,
        bs,
        batch_decodes=batch_decodes,
        fused_decode=fused,
    )
    out = PagedAttention([kc], [vc], meta).attend(0, q, k, v)
    return out, kc, vc, meta


def _reference(caches, shapes, tables, bs, q, k, v):
    """Per request: context = old cache content at positions < computed, then the new K/V."""
    out = torch.zeros(q.shape[1:], dtype=torch.float64)
    lo = 0
    for (c, n), bt in zip(shapes, tables):
        pos = torch.arange(c)
        slots = torch.tensor(bt)[pos // bs] * bs + pos % bs
        k_old = caches[0].view(-1, *caches[0].shape[2:])[slots].transpose(0, 1)
        v_old = caches[1].view(-1, *caches[1].shape[2:])[slots].transpose(0, 1)
        kr = torch.cat([k_old, k[0, :, lo : lo + n]], dim=1)
        vr = torch.cat([v_old, v[0, :, lo : lo + n]], dim=1)
        out[:, lo : lo + n] = reference_attention(q[0, :, lo : lo + n], kr, vr, c)
        lo += n
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paged_attention_matches_naive_reference(dtype, atol):
    case = _case(dtype)
    ref = _reference(*case)
    batched, kc, vc, meta = _run(*case, batch_decodes=True)
    single, _, _, _ = _run(*case, batch_decodes=False)
    fused, _, _, fmeta = _run(*case, batch_decodes=True, fused=True)
    assert meta.num_decodes == 3 and fmeta.fused_decode and not meta.fused_decode
    assert (batched[0].double() - ref).abs().max().item() < atol
    assert (single[0].double() - ref).abs().max().item() < atol
    assert (fused[0].double() - ref).abs().max().item() < atol
    # the batched decode paths are the per-request path, up to float rounding
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (batched.float() - single.float()).abs().max().item() < tol
    assert (fused.float() - single.float()).abs().max().item() < tol
    # the step's K/V landed at slot_mapping, nothing else changed
    k, v = case[5], case[6]
    flat_k, flat_v = kc.view(-1, 2, 8), vc.view(-1, 2, 8)
    assert torch.equal(flat_k[meta.slot_mapping], k[0].transpose(0, 1))
    assert torch.equal(flat_v[meta.slot_mapping], v[0].transpose(0, 1))
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[meta.slot_mapping] = False
    assert torch.equal(flat_k[untouched], case[0][0].view(-1, 2, 8)[untouched])
