"""ModelRunner: owns the KV tensors and runs one engine step of the model over paged attention.

    runner = ModelRunner(model, num_blocks=512, block_size=16, num_host_blocks=256)
    out = runner.execute(RunnerBatch(requests=[RunnerRequest("a", ids, 0, len(ids), [3, 7])]))
    out.logits["a"]                      # [V] float32: logits of the last scheduled token of "a"
    cost = runner.profile()              # CostEstimate, timed on this machine (call before serving)

A step (`execute`):
  1. swap copies between the device pool and the host tier (all reads before all writes, so a
     block freed by one copy and reused by another in the same step is safe);
  2. one flat row of N tokens: the scheduled tokens of every request, decodes first, each at its
     own position (see attention.py for the slot arithmetic);
  3. the decoder stack (`model.model`) with `PagedAttention` as its cache;
  4. the LM head on the selected rows only: the last scheduled token of each request that samples,
     plus the scheduled rows of requests that asked for prompt logits (from prompt_logits_from).

    requests (batch order)   a: last prompt chunk (3 tokens)   b: decode   c: decode
    flat row (runner order)  [ b | c | a0 a1 a2 ]     decodes first: one batched SDPA call
    hidden rows -> lm_head   [ b   c          a2 ]     only rows that sample (or prompt logits)

KV memory: per layer K and V tensors [num_blocks, block_size, num_kv_heads, head_dim] in the
model's dtype on the device, and the same with num_host_blocks in host memory (pinned on CUDA).
Both start zeroed: a padded (masked) key must never hold NaN, since 0 * NaN is NaN.

What it does not know: which blocks are free or cached (kv_cache.py), scheduling, sampling,
request state. Its input is a runner-owned `RunnerBatch`; the engine builds it from the
scheduler's output.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastserve.engine import paged_kernel
from fastserve.engine.attention import AttentionMetadata, PagedAttention
from fastserve.errors import ConfigError
from fastserve.model.config import ModelConfig
from fastserve.model.llama import LlamaForCausalLM


@dataclass
class RunnerRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]  # all tokens so far (prompt + output); length >= computed + new
    num_computed_tokens: int  # tokens whose K/V is already in the blocks of block_table
    num_new_tokens: int  # tokens computed this step: token_ids[computed : computed + new]
    block_table: list[int]  # device blocks holding positions [0, computed + new), in order
    wants_logits: bool = True  # return the logits of the last scheduled token (it samples)
    # return the logits of the scheduled positions from max(computed, prompt_logits_from) on
    # (row i: position max(computed, prompt_logits_from) + i, predicting the token after it), so
    # the engine can collect prompt logprobs chunk by chunk, never twice
    wants_prompt_logits: bool = False
    prompt_logits_from: int = 0


@dataclass
class RunnerBatch:
    """Everything one step runs; built by the engine from the scheduler's output."""

    requests: list[RunnerRequest]  # batch order (outputs are keyed by request_id)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)


@dataclass
class ModelRunnerOutput:
    """Logits of one step, float32 on the runner's device."""

    logits: dict[str, Tensor]  # [V] per request with wants_logits (rows of sample_logits)
    # [rows, V] per request with wants_prompt_logits (rows: see RunnerRequest.prompt_logits_from)
    prompt_logits: dict[str, Tensor]
    sample_request_ids: list[str]  # requests with wants_logits, in batch order
    sample_logits: Tensor  # [len(sample_request_ids), V]: the same rows stacked, for the sampler


@dataclass
class CostEstimate:
    """Measured step costs, for the scheduler's cost model (skip-join MLFQ quanta)."""

    prefill_s_per_token: float  # median over prefill sizes of time / tokens
    decode_s_per_step: float  # median over decode batch sizes of one decode step's time
    prefill_s_by_tokens: dict[int, float] = field(default_factory=dict)  # size -> median time
    decode_s_by_batch: dict[int, float] = field(default_factory=dict)  # batch -> median step time
    context_len: int = 64  # context of each decode row in decode_s_by_batch
    # context length -> median time of a step of 8 decodes over contexts that long
    decode8_s_by_context: dict[int, float] = field(default_factory=dict)

    def prefill_s(self, num_tokens: int) -> float:
        return self.prefill_s_per_token * num_tokens


class ModelRunner:
    """Owns the device and host KV tensors; turns a RunnerBatch into logits."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int = 16,
        num_host_blocks: int = 0,
        device: torch.device | str | None = None,
        batch_decodes: bool = True,  # False: every request on the per-request attention path
        fused_attention: bool = True,  # decodes through the fused CPU kernel when it is built
    ) -> None:
        if num_blocks < 1 or block_size < 1 or num_host_blocks < 0:
            per_block = self.kv_bytes_per_block(model.config, max(block_size, 1), model.dtype)
            raise ConfigError(
                f"the KV cache needs num_blocks >= 1 (one block is {per_block} bytes), "
                f"block_size >= 1 and num_host_blocks >= 0; got {num_blocks}, {block_size}, "
                f"{num_host_blocks}"
            )
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.config: ModelConfig = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self.batch_decodes = batch_decodes
        self.fused_decode = (
            fused_attention
            and batch_decodes
            and self.device.type == "cpu"
            and model.dtype in paged_kernel.DTYPES
            and paged_kernel.available()
        )
        c, dtype = self.config, model.dtype
        shape = (block_size, c.num_key_value_heads, c.head_dim)
        dev = dict(dtype=dtype, device=self.device)
        self.k_caches = [torch.zeros(num_blocks, *shape, **dev) for _ in range(c.num_hidden_layers)]
        self.v_caches = [torch.zeros(num_blocks, *shape, **dev) for _ in range(c.num_hidden_layers)]
        host = dict(dtype=dtype, device="cpu", pin_memory=self.device.type == "cuda")
        n_host = num_host_blocks
        self.host_k_caches = [torch.zeros(n_host, *shape, **host) for _ in self.k_caches]
        self.host_v_caches = [torch.zeros(n_host, *shape, **host) for _ in self.v_caches]

    # ---- memory --------------------------------------------------------------------------------

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of K and V, all layers, for one block of `block_size` tokens."""
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * elem

    @staticmethod
    def num_blocks_for_memory(
        config: ModelConfig, block_size: int, memory_bytes: int, dtype: torch.dtype
    ) -> int:
        """How many whole blocks fit in `memory_bytes` (K and V of every layer); 0 when not one
        does (the caller decides: the device pool needs >= 1 block, the host tier may be empty)."""
        per_block = ModelRunner.kv_bytes_per_block(config, block_size, dtype)
        return max(0, int(memory_bytes) // per_block)

    # ---- swap ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device -> host) blocks for swap_out and (host -> device) blocks for swap_in.

        Every source is read before any destination is written (per layer), so the result is the
        same as copying from the pre-step state whatever order the KV manager reused blocks in.
        """
        if not swap_out and not swap_in:
            return
        d_out = torch.tensor([d for d, _ in swap_out], dtype=torch.long, device=self.device)
        h_out = torch.tensor([h for _, h in swap_out], dtype=torch.long)
        h_in = torch.tensor([h for h, _ in swap_in], dtype=torch.long)
        d_in = torch.tensor([d for _, d in swap_in], dtype=torch.long, device=self.device)
        for dev_caches, host_caches in (
            (self.k_caches, self.host_k_caches),
            (self.v_caches, self.host_v_caches),
        ):
            for dev, host in zip(dev_caches, host_caches):
                out_blocks = dev.index_select(0, d_out).to("cpu")
                in_blocks = host.index_select(0, h_in).to(self.device)
                host.index_copy_(0, h_out, out_blocks)
                dev.index_copy_(0, d_in, in_blocks)

    # ---- one step ------------------------------------------------------------------------------

    def _check(self, r: RunnerRequest) -> None:
        end = r.num_computed_tokens + r.num_new_tokens
        if r.num_new_tokens < 1 or r.num_computed_tokens < 0 or end > len(r.token_ids):
            raise ValueError(
                f"request {r.request_id}: cannot compute {r.num_new_tokens} tokens after "
                f"{r.num_computed_tokens} of {len(r.token_ids)}"
            )
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"request {r.request_id}: {end} tokens exceed the model's context of "
                f"{self.config.max_position_embeddings}"
            )

    @torch.inference_mode()
    def execute(self, batch: RunnerBatch) -> ModelRunnerOutput:
        """Swap copies, then one forward over all scheduled tokens; see the module docstring."""
        self.swap(batch.swap_out, batch.swap_in)
        reqs = batch.requests
        vocab = self.config.vocab_size
        if not reqs:
            empty = torch.empty(0, vocab, device=self.device)
            return ModelRunnerOutput({}, {}, [], empty)
        for r in reqs:
            self._check(r)
        # decodes first (stable), so the batched decode path sees them as one leading group
        order = sorted(range(len(reqs)), key=lambda i: reqs[i].num_new_tokens != 1)
        ids: list[int] = []
        for i in order:
            r = reqs[i]
            ids.extend(
                r.token_ids[r.num_computed_tokens : r.num_computed_tokens + r.num_new_tokens]
            )
        meta = AttentionMetadata.build(
            query_lens=[reqs[i].num_new_tokens for i in order],
            seq_lens=[reqs[i].num_computed_tokens + reqs[i].num_new_tokens for i in order],
            block_tables=[reqs[i].block_table for i in order],
            block_size=self.block_size,
            device=self.device,
            batch_decodes=self.batch_decodes,
            fused_decode=self.fused_decode,
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        cache = PagedAttention(self.k_caches, self.v_caches, meta)
        hidden = self.model.model(input_ids, meta.positions, cache)[0]  # [N, hidden]

        # rows of `hidden` to put through the LM head: sampling rows first, then prompt rows
        slot_of = {i: k for k, i in enumerate(order)}  # batch index -> index in runner order
        qsl = meta.query_start_loc
        rows: list[int] = []
        sample_ids: list[str] = []
        for i, r in enumerate(reqs):
            if r.wants_logits:
                rows.append(qsl[slot_of[i] + 1] - 1)
                sample_ids.append(r.request_id)
        prompt_spans: list[tuple[str, int, int]] = []
        for i, r in enumerate(reqs):
            if r.wants_prompt_logits:
                lo, hi = qsl[slot_of[i]], qsl[slot_of[i] + 1]
                lo += min(max(0, r.prompt_logits_from - r.num_computed_tokens), hi - lo)
                prompt_spans.append((r.request_id, len(rows), len(rows) + hi - lo))
                rows.extend(range(lo, hi))
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits = self.model.lm_head(hidden.index_select(0, index)).float()
        else:
            logits = torch.empty(0, vocab, device=self.device)
        sample_logits = logits[: len(sample_ids)]
        return ModelRunnerOutput(
            logits={rid: sample_logits[k] for k, rid in enumerate(sample_ids)},
            prompt_logits={rid: logits[lo:hi] for rid, lo, hi in prompt_spans},
            sample_request_ids=sample_ids,
            sample_logits=sample_logits,
        )

    # ---- cost profiling ------------------------------------------------------------------------

    def _time(self, batch: RunnerBatch, repeats: int) -> float:
        """Median wall time of `execute(batch)` over `repeats` runs after one warm-up."""
        times = []
        for k in range(repeats + 1):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.execute(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if k:  # the first run is the warm-up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def profile(
        self,
        prefill_sizes: tuple[int, ...] = (32, 128, 256),
        decode_batch_sizes: tuple[int, ...] = (1, 8, 32),
        context_len: int = 64,
        long_context_len: int | None = None,
        repeats: int = 3,
    ) -> CostEstimate:
        """Time prefills of a few sizes, decode steps at a few batch sizes (contexts of
        `context_len`) and, when `long_context_len` is given, a batch of 8 decodes over contexts
        that long (what attention over long contexts adds per context token: the simulator's
        cost model needs it, the scheduler's does not, so engine start-up skips it).

        Writes garbage K/V into the pool's blocks: call it before serving. Sizes are capped by
        the model's context and the block pool.
        """
        capacity = min(self.num_blocks * self.block_size, self.config.max_position_embeddings)
        sizes = sorted({min(n, capacity) for n in prefill_sizes})
        table = list(range(self.num_blocks))
        prefill_s: dict[int, float] = {}
        for n in sizes:
            req = RunnerRequest("profile", [0] * n, 0, n, table[: -(-n // self.block_size)])
            prefill_s[n] = self._time(RunnerBatch([req]), repeats)

        def decode_batch(b: int, ctx: int) -> RunnerBatch:
            # row k takes the next nbr blocks of the pool, wrapping around (rows may share
            # blocks when the pool is small: only the time matters)
            nbr = -(-ctx // self.block_size)
            tables = [[(k * nbr + j) % self.num_blocks for j in range(nbr)] for k in range(b)]
            reqs = [RunnerRequest(f"p{k}", [0] * ctx, ctx - 1, 1, tables[k]) for k in range(b)]
            return RunnerBatch(reqs)

        ctx = max(1, min(context_len, capacity))
        decode_s = {b: self._time(decode_batch(b, ctx), repeats) for b in decode_batch_sizes}
        long_s = {}
        if long_context_len is not None:
            long_ctx = max(1, min(long_context_len, capacity))
            long_s[long_ctx] = self._time(decode_batch(8, long_ctx), repeats)
        return CostEstimate(
            context_len=ctx,
            decode8_s_by_context=long_s,
            prefill_s_per_token=statistics.median(t / n for n, t in prefill_s.items()),
            decode_s_per_step=statistics.median(decode_s.values()),
            prefill_s_by_tokens=prefill_s,
            decode_s_by_batch=decode_s,
        )
