"""The batched sampler: logits processors, per-request seeded sampling, and logprobs.

    batch = SamplingBatch.from_requests(requests_that_sample)   # one row per request
    out = Sampler(seed=0)(logits, batch)                         # logits [B, V] float32
    out.token_ids[i], out.logprobs[i]                            # row i = requests[i]

Per row, in vLLM's order: repetition penalty (HF/vLLM, over prompt + output tokens), frequency
and presence penalties (OpenAI, over output tokens), min_tokens masking of eos / stop_token_ids,
then temperature, min_p, top_k, top_p. Greedy rows (temperature 0) take the argmax of the
penalised logits; the other rows sample by an exponential race, argmax(p / q) with q ~ Exp(1)
drawn from the row's own generator (or the sampler's shared one when the request has no seed).
A seeded row therefore draws the same q whatever else is in the batch: its tokens do not depend
on batch composition. Logprobs are vLLM's default "raw_logprobs": log_softmax of the model's
logits before any processor, with 1-based ranks (rank = #tokens whose logprob >= this one's).

What it does not know: requests' lifecycles, stop decisions, tokenization. Processors are
vectorised over [B, V]; the only per-row loop is the random draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastserve.engine.request import Logprob, Request, SamplingParams

# A (token id, logprob, rank) triple; a row of logprobs is the sampled token's triple first,
# then the top-k triples in rank order (the sampled token may appear twice).
TokenLogprob = tuple[int, float, int]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingBatch:
    # Row i of the logits belongs to one request; every list has one entry per row.
    params: list[SamplingParams]
    # Per-request generator (Request.generator), None -> the sampler's shared generator.
    generators: list[torch.Generator | None]
    # Prompt tokens (repetition penalty only).
    prompt_token_ids: list[list[int]]
    # Tokens generated so far (penalties and min_tokens).
    output_token_ids: list[list[int]]
    # The request's eos; masked while len(output) < min_tokens unless ignore_eos.
    eos_token_ids: list[int | None]

    @classmethod
    def from_requests(cls, requests: Sequence[Request]) -> SamplingBatch:
        return cls(
            params=[r.sampling_params for r in requests],
            generators=[r.generator for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            eos_token_ids=[r.eos_token_id for r in requests],
        )

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class SamplerOutput:
    # The sampled token of each row.
    token_ids: list[int]
    # None when no row asked for logprobs; else per row None (not asked) or the sampled token's
    # (id, logprob, rank) followed by the top-`params.logprobs` triples.
    logprobs: list[list[TokenLogprob] | None] | None


# ---- processors: each takes and returns logits [B, V] (float32) ----------------------------


def _token_mask(
    rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device, counts: bool = False
) -> Tensor:
    """[B, V] occurrence counts (counts=True, float) or presence (bool) of each row's ids.
    Ids outside [0, V) are ignored (they land in a spill column that is dropped)."""
    width = max((len(r) for r in rows), default=0)
    idx = torch.full((len(rows), max(width, 1)), vocab_size, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            idx[i, : len(r)] = torch.tensor(r, dtype=torch.long).clamp(0, vocab_size)
    idx = idx.to(device)
    out = torch.zeros(len(rows), vocab_size + 1, device=device)
    out.scatter_add_(1, idx, torch.ones_like(idx, dtype=out.dtype))
    out = out[:, :vocab_size]
    return out if counts else out > 0


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (prompt + output; x > 0 -> x / rp, else x * rp), then frequency and presence
    (output only): x -= frequency * count + presence * [count > 0]."""
    B, V = logits.shape
    dev = logits.device
    rep = [p.repetition_penalty for p in batch.params]
    freq = [p.frequency_penalty for p in batch.params]
    pres = [p.presence_penalty for p in batch.params]
    if any(r != 1.0 for r in rep):
        seen = _token_mask(
            [a + b for a, b in zip(batch.prompt_token_ids, batch.output_token_ids)], V, dev
        )
        rp = torch.tensor(rep, device=dev).unsqueeze(1).expand(B, V)
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    if any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres):
        counts = _token_mask(batch.output_token_ids, V, dev, counts=True)
        f = torch.tensor(freq, device=dev).unsqueeze(1)
        p = torch.tensor(pres, device=dev).unsqueeze(1)
        logits = logits - f * counts - p * (counts > 0).float()
    return logits


def apply_min_tokens(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """-inf on stop_token_ids and eos (unless ignore_eos) while len(output) < min_tokens."""
    V = logits.shape[1]
    rows, cols = [], []
    for i, (p, out, eos) in enumerate(
        zip(batch.params, batch.output_token_ids, batch.eos_token_ids)
    ):
        if len(out) < p.min_tokens:
            for t in p.masked_token_ids(eos):
                if 0 <= t < V:
                    rows.append(i)
                    cols.append(t)
    if rows:
        logits = logits.clone()
        logits[torch.tensor(rows), torch.tensor(cols)] = float("-inf")
    return logits


def apply_temperature(logits: Tensor, temperatures: Tensor) -> Tensor:
    """logits / t per row; rows with t == 0 (greedy) are divided by 1 (argmax unchanged)."""
    t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return logits / t.unsqueeze(1)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """-inf where p < min_p * max p (row-wise; min_p 0 -> no-op)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Keep each row's top_k logits (ties at the k-th value kept; k = V -> off), then its nucleus:
    drop a token when the tokens ranked above it (after top_k) already reach top_p (p > 1 -> off;
    the most likely token is always kept). One sort serves both."""
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (top_k.clamp(1, V) - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(above >= top_p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


# ---- logprobs --------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> list[list[TokenLogprob]]:
    """Per row of logits [T, V]: (token_ids[t], logprob, rank) then the top-k triples, from
    log-softmax of the logits in float32. rank = #tokens with logprob >= the token's (1 = best)."""
    # logprob = logit - logsumexp(row): the same order as the logits, so the rank and the top-k
    # come from the logits, and no [T, V] log-softmax is written; k = 1 is a max, not a topk.
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    token_ids = token_ids.to(x.device).long()
    chosen_logit = x.gather(1, token_ids.unsqueeze(1))
    ranks = (x >= chosen_logit).sum(dim=-1)
    chosen = chosen_logit - lse
    k = min(k, x.shape[1])
    if k == 1:
        top_vals, top_ids = x.max(dim=-1, keepdim=True)
    else:
        top_vals, top_ids = x.topk(k, dim=-1) if k > 0 else (None, None)
    if k > 0:
        top_vals = top_vals - lse
    rows: list[list[TokenLogprob]] = []
    chosen_l, ranks_l, ids_l = chosen.squeeze(1).tolist(), ranks.tolist(), token_ids.tolist()
    tv = top_vals.tolist() if k > 0 else None
    ti = top_ids.tolist() if k > 0 else None
    for t in range(logits.shape[0]):
        row = [(ids_l[t], chosen_l[t], ranks_l[t])]
        if k > 0:
            row += [(ti[t][j], tv[t][j], j + 1) for j in range(k)]
        rows.append(row)
    return rows


def logprob_dict(
    row: list[TokenLogprob], decode: Callable[[int], str] | None = None
) -> dict[int, Logprob]:
    """A logprobs row as vLLM's {token id: Logprob} (sampled token + top-k, deduplicated)."""
    return {tid: Logprob(lp, rank, decode(tid) if decode else None) for tid, lp, rank in row}


def prompt_logprobs(
    logits: Tensor,
    prompt_token_ids: Sequence[int],
    k: int,
    decode: Callable[[int], str] | None = None,
) -> list[dict[int, Logprob] | None]:
    """Prompt logprobs from the logits of prompt positions 0..T-1 (or 0..T-2): row i predicts
    prompt token i + 1. Returns T entries, the first None (vLLM's shape).

    For chunked prefill, call `token_logprobs(chunk_logits, next_ids, k)` per chunk instead,
    where next_ids are the prompt tokens one position after each chunk position."""
    T = len(prompt_token_ids)
    if logits.shape[0] < T - 1:
        raise ValueError(f"need logits for {T - 1} prompt positions, got {logits.shape[0]}")
    out: list[dict[int, Logprob] | None] = [None]
    if T > 1:
        targets = torch.tensor(list(prompt_token_ids[1:]), dtype=torch.long)
        rows = token_logprobs(logits[: T - 1], targets, k)
        out += [logprob_dict(r, decode) for r in rows]
    return out


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """All processors in order: the logits each row samples from (softmax) or takes the argmax
    of (greedy rows: their params have top_k/top_p/min_p off and temperature counts as 1)."""
    x = apply_penalties(logits.float(), batch)
    x = apply_min_tokens(x, batch)
    params, dev, V = batch.params, x.device, x.shape[1]
    if any(not p.is_greedy and p.temperature != 1.0 for p in params):
        temps = [0.0 if p.is_greedy else p.temperature for p in params]
        x = apply_temperature(x, torch.tensor(temps, device=dev))
    if any(p.min_p > 0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], device=dev))
    top_k = [p.top_k if p.top_k > 0 else V for p in params]
    top_p = [p.top_p if p.top_p < 1 else 2.0 for p in params]  # 2.0: never reached -> off
    if any(k < V for k in top_k) or any(p <= 1 for p in top_p):
        x = apply_top_k_top_p(x, torch.tensor(top_k, device=dev), torch.tensor(top_p, device=dev))
    return x


# ---- the sampler -----------------------------------------------------------------------------


class Sampler:
    """Samples one token per row of a [B, V] logits tensor; see the module docstring."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu"):
        # Shared generator for rows without a seed; seeded -> the engine run is reproducible
        # for a fixed schedule, unseeded -> fresh entropy.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        B = logits.shape[0]
        if len(batch) != B:
            raise ValueError(f"logits have {B} rows but the batch has {len(batch)} requests")
        raw = logits.float()  # never modified in place: the logprobs read it afterwards
        x = process_logits(raw, batch)
        token_ids = x.argmax(dim=-1)  # the answer for greedy rows
        random_rows = [i for i, p in enumerate(batch.params) if not p.is_greedy]
        if random_rows:
            gens = [batch.generators[i] for i in random_rows]
            token_ids[random_rows] = self._race(x[random_rows].softmax(dim=-1), gens)
        ids = token_ids.tolist()
        want_lp = [p.logprobs for p in batch.params]
        logprobs = None
        if any(k is not None for k in want_lp):
            logprobs = self._logprobs(raw, ids, want_lp)
        return SamplerOutput(ids, logprobs)

    def _race(self, probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
        """Exponential race: argmax(p / q) with q ~ Exp(1) i.i.d. is a sample from p. Each row
        draws its own V values from its generator, so a seeded row ignores the other rows."""
        V = probs.shape[1]
        q = torch.empty_like(probs)
        for i, g in enumerate(generators):
            g = g if g is not None else self.generator
            q[i] = torch.empty(V, device=g.device).exponential_(generator=g).to(probs.device)
        return (probs / q.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        raw: Tensor, ids: list[int], want: list[int | None]
    ) -> list[list[TokenLogprob] | None]:
        rows = [i for i, k in enumerate(want) if k is not None]
        k = max(want[i] for i in rows)
        sub = token_logprobs(raw[rows], torch.tensor([ids[i] for i in rows]), k)
        out: list[list[TokenLogprob] | None] = [None] * len(ids)
        for i, row in zip(rows, sub):
            out[i] = row[: 1 + want[i]]
        return out
