"""Paged attention: the model's `cache` object during one engine step, over block-paged K/V.

    meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, block_size)
    hidden = model.model(input_ids[None], meta.positions, PagedAttention(k_caches, v_caches, meta))

One engine step runs ONE flat row of N tokens: the scheduled tokens of R requests concatenated
(decodes first, then prefill chunks), each token at its own position. Every layer calls
`PagedAttention.attend(layer_idx, q, k, v)`, which writes the step's K/V into the paged cache at
`slot_mapping` and then attends each request's queries over that request's own context.

KV layout: per layer a tensor [num_blocks, block_size, num_kv_heads, head_dim], viewed flat as
[num_blocks * block_size, num_kv_heads * head_dim]; a "slot" is a row of the flat view (one
token's K or V for all heads). Token
position p of a request with block table bt lives in block bt[p // block_size]:

    block_size = 4, block_table = [7, 2, 9], num_computed = 5, 3 new tokens (positions 5, 6, 7)

    position p        0  1  2  3 | 4  5  6  7 | 8  9 10 11
    block bt[p // 4]  7  7  7  7 | 2  2  2  2 | 9  9  9  9
    offset p % 4      0  1  2  3 | 0  1  2  3 | 0  1  2  3
    slot              28 29 30 31| 8  9 10 11 | 36 37 38 39    slot = bt[p // bs] * bs + p % bs
                                     ^^^^^^^ slot_mapping of the new tokens = [9, 10, 11]

The N tokens of a step and their requests (query_start_loc has R + 1 entries):

    token index   0   1   2 | 3  4  5  6 | 7  8
    request       a   b   c | d (chunk)  | e (chunk)      a, b, c: decodes (one query token)
    query_start_loc = [0, 1, 2, 3, 7, 9]

Two attention paths, both reading K/V after this step's write:
- decodes (the leading `num_decodes` requests, one query token each): ONE padded SDPA call.
  Request i's context is gathered to length S = max seq_len, padded keys masked out:

      decode_blocks[i, b] = bt_i[b]          b < ceil(S / bs) (short tables padded with block 0)
      keys j = b * bs + offset, gathered a block at a time; decode_mask[i, j] = j < seq_len_i

  The H query heads of a decode are laid out as [H_kv, H / H_kv] "queries" per K/V head, so
  SDPA needs no K/V head repetition (query head h uses K/V head h // (H / H_kv), as in GQA).
  On CPU the same decodes go instead through the fused kernel of paged_kernel.py when it is
  built (`fused_decode`): it reads each context's blocks in place with an online softmax, with
  no gather copy and no padding; the gather path is its reference in the tests.
- prefill chunks: per request, `fastserve.model.llama.attention` over the gathered context with
  query offset seq_len - query_len (a chunk after a cached prefix). A request with no cached
  prefix attends to the step's own K/V directly (no gather).

All of it sits behind `paged_attention()`, the one function a fused kernel would replace.

What it does not know: which blocks are free (kv_cache.py), requests, sampling, or the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastserve.engine import paged_kernel
from fastserve.model.llama import attention


def slots_for_positions(block_table: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """Flat slots [...] of `positions` [...] given a block table [..., num_blocks] (int64).

    block_table's leading dims broadcast against positions' leading dims; see the module diagram.
    """
    blocks = torch.gather(block_table, -1, positions // block_size)
    return blocks * block_size + positions % block_size


@dataclass
class AttentionMetadata:
    """Where a step's tokens go and what each request attends to; built once per step."""

    slot_mapping: Tensor  # [N] int64: flat KV slot each scheduled token's K/V is written to
    positions: Tensor  # [N] int64: position of each scheduled token in its own sequence
    query_start_loc: list[int]  # [R + 1]: request r's tokens are [qsl[r], qsl[r + 1]) of the N
    seq_lens: list[int]  # [R]: context length of request r after this step (cached + new)
    block_tables: list[list[int]]  # [R]: device block ids of request r, in position order
    block_size: int  # tokens per block
    # Invariant: requests [0, num_decodes) have exactly one query token each, so their tokens are
    # [0, num_decodes) of the N. 0 when the batched decode path is off.
    num_decodes: int
    # [num_decodes, nb] int64 block ids of the decode contexts, nb = blocks of the longest one
    # (short tables padded with block 0); keys are gathered a whole block at a time
    decode_blocks: Tensor | None
    decode_mask: Tensor | None  # [num_decodes, 1, 1, nb * bs] bool: True where key j < seq_len
    decode_seq_lens: Tensor | None  # [num_decodes] int64: seq_lens of the decodes
    # per request r >= num_decodes: [ceil(seq_len / bs)] block ids of its whole context, or None
    # when the request has no cached prefix (seq_len == query_len: it attends to this step's K/V)
    context_blocks: list[Tensor | None]
    # decodes read K/V in place through the fused CPU kernel (paged_kernel.py) instead of the
    # gather + padded SDPA path
    fused_decode: bool = False

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        batch_decodes: bool = True,
        fused_decode: bool = False,
    ) -> AttentionMetadata:
        """Metadata for R requests computing `query_lens[r]` new tokens that end at `seq_lens[r]`.

        `batch_decodes=False` sends every request through the per-request path (the reference
        the batched decode path is tested against). `fused_decode=True` runs the batched
        decodes through the fused kernel (the caller checks `paged_kernel.supports`).
        """
        num_reqs = len(query_lens)
        if not (len(seq_lens) == len(block_tables) == num_reqs) or num_reqs == 0:
            raise ValueError(
                "need one query_len, seq_len and block table for each of >= 1 requests"
            )
        for r in range(num_reqs):
            if not 1 <= query_lens[r] <= seq_lens[r]:
                raise ValueError(
                    f"request {r}: need 1 <= query_len <= seq_len, got {query_lens[r]}, "
                    f"{seq_lens[r]}"
                )
            if len(block_tables[r]) * block_size < seq_lens[r]:
                raise ValueError(
                    f"request {r}: {len(block_tables[r])} blocks of {block_size} cannot hold "
                    f"{seq_lens[r]} tokens"
                )
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        # block tables padded with block 0 to a rectangle (pad entries are never read unmasked)
        width = max(len(bt) for bt in block_tables)
        bt_pad = torch.tensor(
            [bt + [0] * (width - len(bt)) for bt in block_tables], dtype=torch.long
        )

        # positions of request r's new tokens: seq_len - query_len .. seq_len - 1
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        starts = torch.tensor(seq_lens, dtype=torch.long) - q_lens
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
        first_token = torch.tensor(qsl[:-1], dtype=torch.long)
        positions = starts[req_of_token] + torch.arange(qsl[-1]) - first_token[req_of_token]
        slot_mapping = slots_for_positions(bt_pad[req_of_token], positions[:, None], block_size)

        num_decodes = 0
        if batch_decodes:
            while num_decodes < num_reqs and query_lens[num_decodes] == 1:
                num_decodes += 1
        decode_blocks = decode_mask = decode_seq_lens = None
        if num_decodes:
            nb = -(-max(seq_lens[:num_decodes]) // block_size)
            decode_blocks = bt_pad[:num_decodes, :nb].to(device)
            lens = torch.tensor(seq_lens[:num_decodes], dtype=torch.long)
            decode_seq_lens = lens.to(device)
            if not fused_decode:
                j = torch.arange(nb * block_size)
                decode_mask = (j[None, :] < lens[:, None])[:, None, None, :].to(device)
        context_blocks: list[Tensor | None] = []
        for r in range(num_decodes, num_reqs):
            if seq_lens[r] == query_lens[r]:
                context_blocks.append(None)
            else:
                nb = -(-seq_lens[r] // block_size)
                context_blocks.append(bt_pad[r, :nb].to(device))
        return cls(
            slot_mapping=slot_mapping[:, 0].to(device),
            positions=positions.to(device),
            query_start_loc=qsl,
            seq_lens=list(seq_lens),
            block_tables=[list(bt) for bt in block_tables],
            block_size=block_size,
            num_decodes=num_decodes,
            decode_blocks=decode_blocks,
            decode_mask=decode_mask,
            decode_seq_lens=decode_seq_lens,
            context_blocks=context_blocks,
            fused_decode=fused_decode and num_decodes > 0,
        )


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store k, v [1, H_kv, N, D] at flat slots [N] of the caches [num_blocks, bs, H_kv, D]."""
    n, width = slot_mapping.shape[0], k_cache.shape[2] * k_cache.shape[3]
    # 2-D [slots, H_kv * D] views: index ops on 2-D rows are ~10x faster on CPU than on 3-D
    k_cache.view(-1, width).index_copy_(0, slot_mapping, k[0].transpose(0, 1).reshape(n, width))
    v_cache.view(-1, width).index_copy_(0, slot_mapping, v[0].transpose(0, 1).reshape(n, width))


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata
) -> Tensor:
    """Attention of q [1, H, N, D] over each request's paged context; returns [1, H, N, D].

    k, v [1, H_kv, N, D] are this step's K/V, already written to k_cache/v_cache
    [num_blocks, bs, H_kv, D] at meta.slot_mapping (requests without a cached prefix read them
    directly). Causal by position within each request; requests never see each other.
    """
    _, num_heads, num_tokens, head_dim = q.shape
    num_blocks, bs, h_kv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    # 2-D [blocks, bs * H_kv * D] views: a gather copies whole blocks (16 rows per index: ~4x
    # faster on CPU than a gather per slot); rows are viewed back as [.., H_kv, D]
    k_blk = k_cache.view(num_blocks, bs * h_kv * head_dim)
    v_blk = v_cache.view(num_blocks, bs * h_kv * head_dim)
    nd = meta.num_decodes
    dec_out = None
    if nd and meta.fused_decode:  # K/V read in place, no gather
        qd = q[0, :, :nd].transpose(0, 1)  # [nd, H, D]
        od = paged_kernel.paged_decode_attention(
            qd, k_cache, v_cache, meta.decode_blocks, meta.decode_seq_lens
        )
        dec_out = od.transpose(0, 1)  # [H, nd, D]
        if nd == num_tokens:
            return dec_out.unsqueeze(0)
    elif nd:
        idx = meta.decode_blocks.reshape(-1)
        s = meta.decode_blocks.shape[1] * bs
        kd = k_blk.index_select(0, idx).view(nd, s, h_kv, head_dim).transpose(1, 2)
        vd = v_blk.index_select(0, idx).view(nd, s, h_kv, head_dim).transpose(1, 2)
        # query heads grouped per K/V head: [nd, H_kv, H / H_kv, D] (GQA without repeating K/V)
        qd = q[0, :, :nd].transpose(0, 1).reshape(nd, h_kv, num_heads // h_kv, head_dim)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask)
        dec_out = od.reshape(nd, num_heads, head_dim).transpose(0, 1)  # [H, nd, D]
        if nd == num_tokens:
            return dec_out.unsqueeze(0)
    out = torch.empty_like(q)
    if dec_out is not None:
        out[0, :, :nd] = dec_out
    qsl = meta.query_start_loc
    for i, blocks in enumerate(meta.context_blocks):
        r = nd + i
        lo, hi = qsl[r], qsl[r + 1]
        if blocks is None:  # no cached prefix: the context is exactly this step's tokens
            kr, vr = k[:, :, lo:hi], v[:, :, lo:hi]
        else:
            s, n = meta.seq_lens[r], blocks.shape[0] * bs
            kr = k_blk.index_select(0, blocks).view(n, h_kv, head_dim)[:s].transpose(0, 1)[None]
            vr = v_blk.index_select(0, blocks).view(n, h_kv, head_dim)[:s].transpose(0, 1)[None]
        out[:, :, lo:hi] = attention(q[:, :, lo:hi], kr, vr, q_offset=meta.seq_lens[r] - (hi - lo))
    return out


class PagedAttention:
    """The AttentionCache the model sees during one step: views the runner's KV tensors.

    Owns nothing: `k_caches[l]` / `v_caches[l]` are the runner's per-layer tensors
    [num_blocks, block_size, H_kv, D], written in place.
    """

    def __init__(self, k_caches: list[Tensor], v_caches: list[Tensor], meta: AttentionMetadata):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.meta = meta

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        return paged_attention(q, k, v, k_cache, v_cache, self.meta)

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: the scheduler advances each request's num_computed_tokens."""
