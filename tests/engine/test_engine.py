"""The engine end to end on a tiny model: outputs equal a no-cache reference loop and HF generate,
under every scheduling path (preemption, swapping, chunked prefill, prefix caching, fcfs/mlfq)."""

from __future__ import annotations

import random

import pytest
import torch

from fastserve.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from fastserve.model import load_model


def _prompts(n: int, seed: int = 0, vocab: int = 300, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int, max_len: int) -> list[int]:
    """No cache, no batching: the full forward again for every new token."""
    ids = list(prompt)
    out = []
    while len(out) < max_tokens and len(ids) < max_len:
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _engine(path, **options) -> LLM:
    return LLM(str(path), **options)


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

CONFIGS = {
    "fcfs": dict(policy="fcfs"),
    "mlfq": dict(policy="mlfq"),
    "priority": dict(policy="priority"),
    "fcfs-preempt-recompute": dict(
        policy="fcfs", num_kv_blocks=12, num_host_blocks=0, preemption_mode="recompute"
    ),
    "fcfs-preempt-swap": dict(
        policy="fcfs", num_kv_blocks=12, num_host_blocks=64, preemption_mode="swap"
    ),
    "mlfq-tiny-pool-swap": dict(
        policy="mlfq", num_kv_blocks=12, num_host_blocks=64, swap_out_threshold=0.5
    ),
    "mlfq-chunked-tiny-budget": dict(policy="mlfq", max_num_batched_tokens=8, max_num_seqs=3),
    "fcfs-chunked-tiny-budget": dict(policy="fcfs", max_num_batched_tokens=5),
    "no-prefix-cache": dict(policy="fcfs", enable_prefix_caching=False),
}

# The counters (EngineStats fields) a config must drive above zero on the workload below: its
# 12 KV blocks are too few for the 10 prompts, so requests are preempted (and swapped).
MUST_HAPPEN = {
    "fcfs-preempt-recompute": ("num_preemptions",),
    "fcfs-preempt-swap": ("num_preemptions", "num_swap_outs", "num_swap_ins"),
    "mlfq-tiny-pool-swap": ("num_preemptions", "num_swap_outs", "num_swap_ins"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_reference_loop(name, tiny_model_dir, model):
    prompts = _prompts(10, seed=1)
    llm = _engine(tiny_model_dir, **CONFIGS[name])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = reference_greedy(model, prompt, GREEDY.max_tokens, llm.engine.max_model_len)
        assert out.outputs[0].token_ids == expected, name
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.num_free_blocks() == llm.engine.kv.num_blocks
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.stats()
    for counter in MUST_HAPPEN.get(name, ()):
        assert getattr(stats, counter) > 0, f"{name}: {counter} is 0, the path never ran"
    if CONFIGS[name].get("num_host_blocks") == 0:
        assert stats.num_swap_outs == 0  # no host tier: every preemption recomputes
    assert stats.num_swap_ins == stats.num_swap_outs and stats.num_swapped == 0  # all came back


def test_greedy_equals_hf_generate(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = _prompts(6, seed=2)
    llm = _engine(tiny_model_dir, policy="mlfq", max_num_batched_tokens=16)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            hf_ids = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GREEDY.max_tokens,
                min_new_tokens=GREEDY.max_tokens,  # ignore eos, like ignore_eos=True
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == hf_ids


def test_prefix_caching_shares_blocks_and_keeps_outputs(tiny_model_dir, model):
    prompts = _prompts(8, seed=3, shared_prefix=48)
    llm = _engine(tiny_model_dir, policy="fcfs")
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 48 * 6  # later prompts reuse the 3 full shared blocks
    for prompt, out in zip(prompts, outs):
        expected = reference_greedy(model, prompt, GREEDY.max_tokens, llm.engine.max_model_len)
        assert out.outputs[0].token_ids == expected


def test_seeded_sampling_is_independent_of_the_batch(tiny_model_dir):
    llm = _engine(tiny_model_dir, policy="mlfq")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    prompt = _prompts(1, seed=4)[0]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(7, seed=5)
    unseeded = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    mixed = llm.generate(
        others[:3] + [prompt] + others[3:],
        [unseeded] * 3 + [params] + [unseeded] * 4,
        use_tqdm=False,
    )
    assert mixed[3].outputs[0].token_ids == alone
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_n_outputs_use_seed_plus_index(tiny_model_dir):
    llm = _engine(tiny_model_dir)
    prompt = _prompts(1, seed=6)[0]
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for i, o in enumerate(out.outputs):
        single = SamplingParams(max_tokens=12, temperature=1.0, seed=11 + i, ignore_eos=True)
        assert llm.generate([prompt], single, use_tqdm=False)[0].outputs[0].token_ids == o.token_ids


def test_abort_frees_blocks_at_once(tiny_model_dir):
    engine = LLMEngine.from_model_dir(str(tiny_model_dir), EngineConfig(policy="fcfs"))
    total = engine.kv.num_blocks
    for i, prompt in enumerate(_prompts(4, seed=7)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.num_free_blocks() < total
    for i in range(4):
        engine.abort_request(f"r{i}")
    assert engine.num_free_blocks() == total
    assert not engine.has_unfinished_requests()
    assert engine.step() == []


def test_bad_input(tiny_model_dir, model):
    llm = _engine(tiny_model_dir, policy="fcfs")
    max_len = llm.engine.max_model_len
    ok = _prompts(1, seed=8)[0]
    too_long = [5] * (max_len + 1)
    outs = llm.generate([ok, too_long, ok], GREEDY, use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error"
    assert "max_model_len" in str(outs[1].outputs[0].stop_reason)
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].outputs[0].finish_reason == "length"
    # max_tokens past the context: stops at the context with "length"
    long_prompt = [7] * (max_len - 5)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    out = llm.generate([long_prompt], params, use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].outputs[0].token_ids) == 5
    for bad, name in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
    ]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="lifo")


def test_text_prompts_stop_strings_and_metrics(tiny_model_dir):
    llm = _engine(tiny_model_dir)
    out = llm.generate("the cat", SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0]
    full = out.outputs[0].text
    assert out.prompt == "the cat" and full
    assert full == llm.tokenizer.decode(out.outputs[0].token_ids)
    stop = full[3:6]
    if stop.strip():
        stopped = llm.generate(
            "the cat", SamplingParams(max_tokens=20, temperature=0, stop=[stop]), use_tqdm=False
        )[0].outputs[0]
        assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
        assert stopped.text == full[: full.index(stop)]
    m = out.metrics
    assert m.ttft_s is not None and m.e2e_s >= m.ttft_s >= 0
    assert m.queue_s is not None and 0 <= m.queue_s <= m.ttft_s
    assert len(m.itl_s) == len(out.outputs[0].token_ids) - 1 and min(m.itl_s) >= 0


@pytest.mark.parametrize("budget", [512, 7])  # one chunk, and prefill chunks of 7 tokens
def test_prompt_and_sample_logprobs_equal_log_softmax(budget, tiny_model_dir, model):
    llm = _engine(tiny_model_dir, policy="fcfs", max_num_batched_tokens=budget)
    prompt = _prompts(1, seed=9, shared_prefix=33)[0]
    llm.generate([prompt], GREEDY, use_tqdm=False)  # warm the prefix cache with this prompt
    params = SamplingParams(
        max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True
    )
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    ids = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        token = prompt[pos]
        assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        top = ref[pos - 1].topk(2).indices.tolist()
        assert set(top) <= set(entry)
    total = 0.0
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3 or token in row.topk(3).indices.tolist()
        total += entry[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 7},  # chunked prefill
        {"num_kv_blocks": 12, "num_host_blocks": 0, "preemption_mode": "recompute"},
    ],
)
def test_prompt_logprobs_start_reuses_a_shared_context(options, tiny_model_dir, model):
    """prompt_logprobs_start = s (FastServe's scoring extension): entries before s are None, the
    others equal log_softmax, and the context's full blocks come from the prefix cache."""
    llm = _engine(tiny_model_dir, policy="fcfs", **options)
    context = _prompts(1, seed=4, shared_prefix=40)[0][:40]
    prompts = [context + p for p in _prompts(4, seed=5)]
    start = len(context)
    params = SamplingParams(
        max_tokens=1, temperature=0, prompt_logprobs=1, prompt_logprobs_start=start
    )
    outs = llm.generate(prompts, params, use_tqdm=False)
    if "num_kv_blocks" not in options:  # the two full context blocks, reused three times
        assert llm.engine.stats().prefix_cache_hits >= 3 * 32
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt]))[0].double(), dim=-1)
        assert out.prompt_logprobs[:start] == [None] * start
        assert len(out.prompt_logprobs) == len(prompt)
        for pos in range(start, len(prompt)):
            entry = out.prompt_logprobs[pos]
            logprob = entry[prompt[pos]].logprob
            assert logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
            assert max(lp.logprob for lp in entry.values()) == pytest.approx(
                ref[pos - 1].max().item(), abs=1e-4
            )
    assert llm.engine.num_free_blocks() == llm.engine.kv.num_blocks
