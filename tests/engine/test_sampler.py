"""Sampler: every processor vs a naive per-row float64 reference, seeded sampling independent of
the batch, greedy == argmax, logprobs == log_softmax of the raw logits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fastserve.engine.request import Request, SamplingParams
from fastserve.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
    process_logits,
    prompt_logprobs,
)

V = 50
NEG_INF = float("-inf")


def make_batch(params, prompts=None, outputs=None, eos=None, generators=None):
    B = len(params)
    return SamplingBatch(
        params=list(params),
        generators=generators or [None] * B,
        prompt_token_ids=prompts or [[0]] * B,
        output_token_ids=outputs or [[]] * B,
        eos_token_ids=eos or [None] * B,
    )


# ---- naive references: one row, python floats (float64) ------------------------------------


def ref_process(row, p: SamplingParams, prompt, output, eos):
    """The documented semantics of SamplingParams, one row at a time, in float64."""
    x = [float(v) for v in row]
    seen = set(prompt) | set(output)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        count = output.count(t)
        x[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    if len(output) < p.min_tokens:
        masked = set(p.stop_token_ids) | ({eos} if eos is not None and not p.ignore_eos else set())
        for t in masked:
            x[t] = NEG_INF
    if p.is_greedy:
        return x
    x = [v / p.temperature for v in x]
    if p.min_p > 0:
        probs = softmax(x)
        x = [NEG_INF if q < p.min_p * max(probs) else v for v, q in zip(x, probs)]
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        x = [v if v >= kth else NEG_INF for v in x]
    if p.top_p < 1:
        probs = softmax(x)
        order = sorted(range(len(x)), key=lambda t: -x[t])
        above, keep = 0.0, set()
        for t in order:
            if above < p.top_p:
                keep.add(t)
            above += probs[t]
        x = [v if t in keep else NEG_INF for t, v in enumerate(x)]
    return x


def softmax(x):
    m = max(x)
    e = [math.exp(v - m) if v != NEG_INF else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


def random_params(rng: random.Random, **fixed) -> SamplingParams:
    kw = dict(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 1, 3, 10]),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.2]),
        min_p=rng.choice([0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.25, -0.5]),
        min_tokens=rng.choice([0, 3]),
        stop_token_ids=rng.choice([[], [7, 8]]),
        ignore_eos=rng.random() < 0.3,
    )
    kw.update(fixed)
    return SamplingParams(**kw)


def random_case(seed: int, B: int = 12):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=gen) * 3
    params = [random_params(rng) for _ in range(B)]
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(1, 8))] for _ in range(B)]
    outputs = [[rng.randrange(V) for _ in range(rng.randrange(0, 6))] for _ in range(B)]
    eos = [rng.choice([None, 1, 2]) for _ in range(B)]
    return logits, make_batch(params, prompts, outputs, eos)


def assert_rows_close(got: torch.Tensor, want: list[list[float]]):
    for g, w in zip(got.tolist(), want):
        for a, b in zip(g, w):
            if b == NEG_INF:
                assert a == NEG_INF
            else:
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


# ---- processors vs the reference -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_penalties_match_reference(seed):
    logits, batch = random_case(seed)
    for p in batch.params:  # penalties only
        p.min_tokens, p.temperature = 0, 0.0
    got = apply_penalties(logits, batch)
    want = [
        ref_process(row, p, pr, out, None)
        for row, p, pr, out in zip(
            logits.tolist(), batch.params, batch.prompt_token_ids, batch.output_token_ids
        )
    ]
    assert_rows_close(got, want)


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0)], [[0]], [[1]])
    assert apply_penalties(logits, batch).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 10)
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=[5]),
        SamplingParams(min_tokens=2, stop_token_ids=[5], ignore_eos=True),
        SamplingParams(min_tokens=2, stop_token_ids=[5]),
    ]
    batch = make_batch(params, outputs=[[3], [3], [3, 4]], eos=[1, 1, 1])
    out = apply_min_tokens(logits, batch)
    assert out[0].isinf().nonzero().flatten().tolist() == [1, 5]
    assert out[1].isinf().nonzero().flatten().tolist() == [5]  # eos not masked: ignore_eos
    assert not out[2].isinf().any()  # min_tokens reached
    zero = make_batch([SamplingParams(min_tokens=1, stop_token_ids=[0])], eos=[None])
    assert apply_min_tokens(logits[:1], zero)[0].isinf().nonzero().flatten().tolist() == [0]


def test_top_k_keeps_exactly_top_k():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([1, 5, V, 17])
    out = apply_top_k_top_p(logits, k, torch.full((4,), 2.0))
    for i in range(4):
        kept = set(torch.isfinite(out[i]).nonzero().flatten().tolist())
        assert kept == set(logits[i].topk(int(k[i])).indices.tolist())
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])


def test_top_k_keeps_ties():
    out = apply_top_k_top_p(
        torch.tensor([[1.0, 3.0, 3.0, 0.0]]), torch.tensor([1]), torch.tensor([2.0])
    )
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for p, want in [(0.5, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        out = apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([p if p < 1 else 2.0]))
        assert int(torch.isfinite(out).sum()) == want, p


def test_min_p_keeps_expected_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.31]))  # threshold 0.155
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("seed", range(6))
def test_full_pipeline_matches_reference(seed):
    logits, batch = random_case(100 + seed, B=16)
    got = process_logits(logits, batch)
    for i in range(len(batch)):
        p = batch.params[i]
        want = ref_process(
            logits[i].tolist(),
            p,
            batch.prompt_token_ids[i],
            batch.output_token_ids[i],
            batch.eos_token_ids[i],
        )
        if p.is_greedy:
            assert int(got[i].argmax()) == max(range(V), key=lambda t: want[t])
        else:
            kept = [t for t in range(V) if want[t] != NEG_INF]
            assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) == set(kept)
            assert got[i].softmax(-1).tolist() == pytest.approx(softmax(want), abs=1e-5)


# ---- sampling ----------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    out = Sampler(seed=0)(logits, make_batch([SamplingParams(temperature=0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.5, top_k=1)] * 16
    for _ in range(3):
        assert Sampler()(logits, make_batch(params)).token_ids == logits.argmax(-1).tolist()


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 20000
    batch = make_batch([SamplingParams(temperature=0.8)] * n)
    ids = Sampler(seed=3)(logits.expand(n, -1), batch).token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=5).double() / n
    want = (logits.double() / 0.8).softmax(-1)
    assert torch.allclose(freq, want, atol=0.015)  # ~4 sigma for p(1-p)/n


def test_samples_stay_in_the_filtered_set():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=2.0, top_k=10, top_p=0.6)
    kept = set(
        torch.isfinite(process_logits(logits, make_batch([params]))).nonzero()[:, 1].tolist()
    )
    sampler = Sampler(seed=5)
    ids = sampler(logits.expand(3000, -1), make_batch([params] * 3000)).token_ids
    assert set(ids) <= kept and len(set(ids)) > 1


def test_seeded_row_is_independent_of_the_batch():
    rng = random.Random(0)
    steps = [torch.randn(6, V, generator=torch.Generator().manual_seed(s)) * 2 for s in range(20)]
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(rows_before: int, rows_after: int, sampler_seed: int) -> list[int]:
        gen = make_generator(1234)
        out = []
        sampler = Sampler(seed=sampler_seed)
        for logits in steps:
            others = [random_params(rng, temperature=1.0) for _ in range(rows_before + rows_after)]
            params = others[:rows_before] + [target] + others[rows_before:]
            gens = [
                make_generator(rng.randrange(100)) if rng.random() < 0.5 else None for _ in params
            ]
            gens[rows_before] = gen
            x = torch.cat([logits[1 : 1 + rows_before], logits[:1], logits[3 : 3 + rows_after]])
            ids = sampler(x, make_batch(params, generators=gens)).token_ids
            out.append(ids[rows_before])
        return out

    alone = run(0, 0, 0)
    assert run(2, 3, 1) == alone
    assert run(1, 0, 2) == alone
    assert run(0, 3, 3) == alone
    assert len(set(alone)) > 3  # it really sampled


def test_different_seeds_differ_and_requests_own_generators():
    logits = torch.zeros(1, V)
    r1 = Request("a", [1], SamplingParams(seed=7, max_tokens=50))
    r2 = Request("b", [1], SamplingParams(seed=8, max_tokens=50))
    r3 = Request("c", [1], SamplingParams(seed=7, max_tokens=50))
    sampler = Sampler()
    seqs = {}
    for r in (r1, r2, r3):
        seqs[r.request_id] = [
            sampler(logits, SamplingBatch.from_requests([r])).token_ids[0] for _ in range(30)
        ]
    assert seqs["a"] == seqs["c"] and seqs["a"] != seqs["b"]


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, V), make_batch([SamplingParams()]))


# ---- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6)) * 2
    params = [
        SamplingParams(temperature=0.7, logprobs=5, repetition_penalty=1.5, presence_penalty=1),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0),
    ]
    out = Sampler(seed=0)(logits, make_batch(params, outputs=[[0, 1, 2]] * 3))
    ref = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[2] is None
    assert len(out.logprobs[1]) == 1 and len(out.logprobs[0]) == 6
    for i in (0, 1):
        tid, lp, rank = out.logprobs[i][0]
        assert tid == out.token_ids[i]
        assert lp == pytest.approx(float(ref[i, tid]), abs=1e-5)
        assert rank == 1 + int((ref[i] > ref[i, tid]).sum())
    top = out.logprobs[0][1:]
    want = ref[0].topk(5)
    assert [t for t, _, _ in top] == want.indices.tolist()
    assert [lp for _, lp, _ in top] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert [r for _, _, r in top] == [1, 2, 3, 4, 5]


def test_prompt_logprobs():
    prompt = [3, 9, 4, 4, 0]
    logits = torch.randn(len(prompt), V, generator=torch.Generator().manual_seed(7))
    out = prompt_logprobs(logits, prompt, k=2, decode=lambda t: f"<{t}>")
    assert len(out) == len(prompt) and out[0] is None
    ref = torch.log_softmax(logits.double(), -1)
    for i in range(1, len(prompt)):
        entry = out[i]
        tid = prompt[i]
        assert entry[tid].logprob == pytest.approx(float(ref[i - 1, tid]), abs=1e-5)
        assert entry[tid].decoded_token == f"<{tid}>"
        top2 = ref[i - 1].topk(2).indices.tolist()
        assert set(entry) == {tid, *top2}
        assert entry[top2[0]].rank == 1
    with pytest.raises(ValueError):
        prompt_logprobs(logits[:2], prompt, k=1)
