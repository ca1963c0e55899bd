"""ModelRunner: paged multi-step logits equal the plain full forward; swaps copy KV exactly."""

from __future__ import annotations

import random

import pytest
import torch
from h3_helpers import tiny_model

from fastserve.engine.runner import ModelRunner, RunnerBatch, RunnerRequest
from fastserve.errors import ConfigError
from fastserve.model import ModelConfig

BLOCK_SIZE = 4


@torch.no_grad()
def _full_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids]))[0]  # [T, V], no cache, positions 0..T-1


class _Sim:
    """A minimal engine: chunked prefill, then decodes, blocks drawn from a shuffled free list."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], seed: int):
        self.runner, self.rng = runner, random.Random(seed)
        self.free = list(range(runner.num_blocks))
        self.rng.shuffle(self.free)
        self.tokens = {f"r{i}": list(p) for i, p in enumerate(prompts)}
        self.prompt_len = {rid: len(t) for rid, t in self.tokens.items()}
        self.computed = dict.fromkeys(self.tokens, 0)
        self.tables: dict[str, list[int]] = {rid: [] for rid in self.tokens}

    def step(self, active: list[str], max_chunk: int, prompt_logits: set[str]):
        reqs = []
        for rid in active:
            c, total = self.computed[rid], len(self.tokens[rid])
            n = min(total - c, self.rng.randint(1, max_chunk))
            while len(self.tables[rid]) * BLOCK_SIZE < c + n:
                self.tables[rid].append(self.free.pop())
            reqs.append(
                RunnerRequest(
                    rid, list(self.tokens[rid]), c, n, list(self.tables[rid]),
                    wants_logits=c + n == total, wants_prompt_logits=rid in prompt_logits,
                )
            )  # fmt: skip
        self.rng.shuffle(reqs)
        out = self.runner.execute(RunnerBatch(reqs))
        for r in reqs:
            self.computed[r.request_id] += r.num_new_tokens
        return reqs, out

    def append_token(self, rid: str) -> None:
        self.tokens[rid].append(self.rng.randrange(self.runner.config.vocab_size))


def _run_steps(model, batch_decodes: bool, seed: int = 0, check=None, fused: bool = True):
    """Four requests (one joins late), chunked prefill then decodes; `check` sees every step."""
    runner = ModelRunner(
        model,
        num_blocks=48,
        block_size=BLOCK_SIZE,
        batch_decodes=batch_decodes,
        fused_attention=fused,
    )
    assert runner.fused_decode == (fused and batch_decodes)
    g = random.Random(seed)
    prompts = [[g.randrange(128) for _ in range(n)] for n in (13, 7, 1, 20)]
    sim = _Sim(runner, prompts, seed)
    outputs = []
    for step in range(14):
        active = [rid for rid in sim.tokens if rid != "r3" or step >= 2]
        reqs, out = sim.step(active, max_chunk=6, prompt_logits={"r1"})
        outputs.append(out)
        if check is not None:
            check(sim, reqs, out)
        for r in reqs:
            if r.wants_logits:
                sim.append_token(r.request_id)
    return outputs, sim


def _check_against_full(model, atol):
    counts = {"logits": 0, "prompt": 0, "decode_batches": 0}

    def check(sim, reqs, out):
        assert set(out.logits) == {r.request_id for r in reqs if r.wants_logits}
        assert out.sample_request_ids == [r.request_id for r in reqs if r.wants_logits]
        counts["decode_batches"] += sum(r.num_new_tokens == 1 for r in reqs) > 1
        for r in reqs:
            end = r.num_computed_tokens + r.num_new_tokens
            full = _full_logits(model, r.token_ids[:end]).float()
            if r.wants_logits:
                assert out.logits[r.request_id].dtype == torch.float32
                assert (out.logits[r.request_id] - full[-1]).abs().max().item() < atol
                counts["logits"] += 1
            if r.wants_prompt_logits:
                rows = full[r.num_computed_tokens : end]
                assert (out.prompt_logits[r.request_id] - rows).abs().max().item() < atol
                counts["prompt"] += 1

    return check, counts


def test_paged_steps_match_full_forward_fp32():
    model = tiny_model()
    check, counts = _check_against_full(model, atol=1e-5)
    _, sim = _run_steps(model, batch_decodes=True, check=check)
    assert counts["logits"] >= 30 and counts["prompt"] >= 10 and counts["decode_batches"] >= 5
    assert all(len(t) > sim.prompt_len[rid] + 3 for rid, t in sim.tokens.items())


def test_paged_steps_bf16_close_to_full_forward():
    model = tiny_model(dtype=torch.bfloat16)
    # bf16 keeps ~3 significant digits; logits here reach ~3 (measured max diff ~0.016)
    check, counts = _check_against_full(model, atol=0.06)
    _run_steps(model, batch_decodes=True, check=check)
    assert counts["logits"] >= 30


@pytest.mark.parametrize("fused", [True, False])
def test_batched_decode_path_equals_per_request_path(fused):
    model = tiny_model(seed=1)
    batched, _ = _run_steps(model, batch_decodes=True, seed=3, fused=fused)
    single, _ = _run_steps(model, batch_decodes=False, seed=3)
    for a, b in zip(batched, single):
        assert a.sample_request_ids == b.sample_request_ids
        assert (a.sample_logits - b.sample_logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_out_and_in_round_trips_exactly(dtype):
    runner = ModelRunner(tiny_model(dtype=dtype), num_blocks=8, block_size=4, num_host_blocks=4)
    g = torch.Generator().manual_seed(0)
    for t in runner.k_caches + runner.v_caches:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    before = [t.clone() for t in runner.k_caches + runner.v_caches]
    runner.execute(RunnerBatch([], swap_out=[(3, 1), (5, 0)]))
    host = runner.host_k_caches + runner.host_v_caches
    for b, h in zip(before, host):
        assert torch.equal(h[1], b[3]) and torch.equal(h[0], b[5])
    for t in runner.k_caches + runner.v_caches:
        t[3] = 0
        t[5] = 0
    runner.execute(RunnerBatch([], swap_in=[(1, 6), (0, 2)]))
    for b, t in zip(before, runner.k_caches + runner.v_caches):
        assert torch.equal(t[6], b[3]) and torch.equal(t[2], b[5])


def test_swap_reads_every_source_before_writing():
    # The KV manager may free a block by one copy and reuse it by another in the same step:
    # device block 2 goes out to host 0 while host 0's old content comes in to device block 2.
    runner = ModelRunner(tiny_model(), num_blocks=4, block_size=4, num_host_blocks=2)
    runner.k_caches[0][2].fill_(1.0)
    runner.host_k_caches[0][0].fill_(7.0)
    runner.swap(swap_out=[(2, 0)], swap_in=[(0, 2)])
    assert (runner.host_k_caches[0][0] == 1.0).all() and (runner.k_caches[0][2] == 7.0).all()


def test_request_continues_after_swap_out_and_in_to_new_blocks():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=10, block_size=4, num_host_blocks=3)
    ids = list(range(3, 14))  # 11 tokens: 3 blocks
    runner.execute(RunnerBatch([RunnerRequest("a", ids, 0, 11, [4, 0, 7])]))
    runner.execute(RunnerBatch([], swap_out=[(4, 2), (0, 0), (7, 1)]))
    for t in runner.k_caches + runner.v_caches:
        t.zero_()  # the device blocks are reused by someone else meanwhile
    ids = ids + [42]
    req = RunnerRequest("a", ids, 11, 1, [9, 1, 5])
    out = runner.execute(RunnerBatch([req], swap_in=[(2, 9), (0, 1), (1, 5)]))
    assert (out.logits["a"] - _full_logits(model, ids)[-1]).abs().max().item() < 1e-5


def test_logits_only_for_rows_that_ask():
    runner = ModelRunner(tiny_model(), num_blocks=8, block_size=4)
    a = RunnerRequest("a", list(range(9)), 0, 5, [1, 2], wants_logits=False)
    b = RunnerRequest("b", [5, 6, 7], 0, 3, [3], wants_logits=True, wants_prompt_logits=True)
    out = runner.execute(RunnerBatch([a, b]))
    assert out.sample_request_ids == ["b"] and set(out.logits) == {"b"}
    assert out.sample_logits.shape == (1, 128)
    assert out.prompt_logits["b"].shape == (3, 128)
    assert torch.equal(out.prompt_logits["b"][-1], out.logits["b"])


def test_bad_requests_raise():
    runner = ModelRunner(tiny_model(), num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="cannot compute"):
        runner.execute(RunnerBatch([RunnerRequest("a", [1, 2], 0, 3, [0])]))
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(RunnerBatch([RunnerRequest("a", list(range(9)), 0, 9, [0, 1])]))
    with pytest.raises(ValueError, match="context"):
        runner.execute(RunnerBatch([RunnerRequest("a", [1] * 65, 0, 65, [0, 1, 2])]))


def test_num_blocks_for_memory_hand_computed():
    config = ModelConfig.preset("tiny")  # 2 layers, 2 K/V heads, head_dim 16
    # K and V x 2 layers x 16 tokens x 2 heads x 16 dims x 4 bytes = 8192 bytes a block
    assert ModelRunner.kv_bytes_per_block(config, 16, torch.float32) == 8192
    assert ModelRunner.num_blocks_for_memory(config, 16, 100_000, torch.float32) == 12
    assert ModelRunner.num_blocks_for_memory(config, 16, 100_000, torch.bfloat16) == 24
    assert ModelRunner.num_blocks_for_memory(config, 16, 8191, torch.float32) == 0
    model = tiny_model()
    with pytest.raises(ConfigError, match="num_blocks >= 1"):
        ModelRunner(model, num_blocks=0, block_size=16)
    n = ModelRunner.num_blocks_for_memory(model.config, 4, 50_000, torch.float32)
    runner = ModelRunner(model, num_blocks=n, block_size=4, num_host_blocks=2)
    used = sum(t.numel() * t.element_size() for t in runner.k_caches + runner.v_caches)
    assert used == n * ModelRunner.kv_bytes_per_block(model.config, 4, torch.float32) <= 50_000
    assert runner.k_caches[0].shape == (n, 4, 2, 16) and runner.host_v_caches[1].shape[0] == 2


def test_profile_returns_positive_costs():
    runner = ModelRunner(tiny_model(), num_blocks=8, block_size=4)
    cost = runner.profile(prefill_sizes=(8, 16, 999), decode_batch_sizes=(1, 4), repeats=1)
    assert cost.prefill_s_per_token > 0 and cost.decode_s_per_step > 0
    assert sorted(cost.prefill_s_by_tokens) == [8, 16, 32]  # 999 capped by the 8 x 4 pool
    assert sorted(cost.decode_s_by_batch) == [1, 4]
    assert cost.prefill_s(10) == pytest.approx(10 * cost.prefill_s_per_token)
