"""Offline engine throughput: FastServe's LLM.generate vs HF transformers generate, same prompts.

    python benchmarks/bench_engine.py [--presets small,base] [--num-prompts 64] [--repeats 3]

Workload: --num-prompts prompts of random tokens with mixed lengths (16..256 prompt tokens, 16..128
output tokens, ignore_eos so every request produces exactly its budget), on a random-initialised
model of each preset (throughput does not depend on the weights' values). Figures, output
tokens/s (only the tokens each request asked for count):
  fastserve      LLM.generate over all prompts (continuous batching, paged KV, mlfq)
  gather attention  the same with fused_attention=False (decode K/V gathered, padded SDPA)
  one-at-a-time  FastServe with max_num_seqs=1 (each request alone)
  hf-static      transformers generate in static, left-padded batches of --hf-batch prompts;
                 each batch runs until its longest request is done (what static batching costs)
Each side loads its model once and warms up on a few short prompts before the timed runs.
Medians over --repeats runs; ratios are to hf-static in the same run. "KV live": the share of
reserved KV token slots that hold live tokens, averaged over the steps of one run (paging wastes
at most one partly filled block per request).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model_dir(preset: str, root: Path, max_position_embeddings: int = 512) -> Path:
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import LlamaForCausalLM, ModelConfig, save_model

    texts = [f"line {i} of some text to train a small tokenizer" for i in range(200)]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    vocab = {"small": 4096, "base": 8192}.get(preset, 4096)
    config = ModelConfig.preset(
        preset, vocab_size=vocab, max_position_embeddings=max_position_embeddings
    )
    path = root / preset
    save_model(LlamaForCausalLM(config), path, tokenizer=tokenizer)
    return path


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128))
        for _ in range(n)
    ]


def run_fastserve(path: Path, work, repeats: int = 1, **options) -> list[float]:
    """Output tokens/s of `repeats` timed LLM.generate calls on one engine (after a warm-up)."""
    from fastserve import LLM, SamplingParams

    llm = LLM(str(path), **options)
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in work]
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(prompts[:8], warm, use_tqdm=False)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(m for _, m in work)
        rates.append(produced / elapsed)
    return rates


@torch.no_grad()
def run_hf(path: Path, work, batch_size: int, repeats: int = 1) -> list[float]:
    """Output tokens/s of HF generate over static left-padded batches (after a warm-up)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()

    def once(chunks) -> int:
        useful = 0
        for chunk in chunks:
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (p, _) in enumerate(chunk):  # left padding, as generate expects
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            longest = max(m for _, m in chunk)
            model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=longest,
                min_new_tokens=longest,
                pad_token_id=0,
            )
            useful += sum(m for _, m in chunk)
        return useful

    chunks = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    once([[(p, 4) for p, _ in chunks[0]]])  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        useful = once(chunks)
        rates.append(useful / (time.perf_counter() - t0))
    return rates


def kv_utilization(path: Path, work) -> tuple[float, float]:
    """Step the engine by hand over the workload; at every step compare the KV token slots that
    hold live tokens (each running request's computed tokens) with the slots reserved for them
    (its blocks x block_size). Returns (mean over steps, minimum) of live / reserved."""
    from fastserve.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_model_dir(str(path), EngineConfig(policy="mlfq"))
    for i, (prompt, m) in enumerate(work):
        engine.add_request(f"k{i}", prompt, SamplingParams(max_tokens=m, ignore_eos=True))
    kv, ratios = engine.kv, []
    while engine.has_unfinished_requests():
        engine.step()
        live = reserved = 0
        for rid, table in kv.tables.items():
            request = engine.scheduler.requests.get(rid)
            if request is not None and table:
                live += request.num_computed_tokens
                reserved += len(table) * kv.block_size
        if reserved:
            ratios.append(live / reserved)
    return statistics.fmean(ratios), min(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16, help="HF static batch size (16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-single", action="store_true", help="skip the one-at-a-time run")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"offline output tokens/s ({torch.get_num_threads()} threads)")
    cols = ("model", "fastserve", "gather attention", "hf-static", "one-at-a-time",
            "fastserve / hf", "KV live")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            path = make_model_dir(preset, Path(tmp))
            vocab = {"small": 4096, "base": 8192}.get(preset, 4096)
            work = workload(args.num_prompts, vocab)
            fs = run_fastserve(path, work, args.repeats, policy="mlfq")
            gather = run_fastserve(path, work, args.repeats, policy="mlfq", fused_attention=False)
            hf = run_hf(path, work, args.hf_batch, args.repeats)
            one = (
                run_fastserve(path, work, 1, policy="fcfs", max_num_seqs=1)
                if not args.skip_single
                else [float("nan")]
            )
            live_mean, live_min = kv_utilization(path, work)
            print(f"{preset}: fastserve {fs} gather {gather} hf {hf} single {one} kv live "
                  f"{live_mean} {live_min}")  # fmt: skip
            f, h, o = statistics.median(fs), statistics.median(hf), statistics.median(one)
            g = statistics.median(gather)
            table.add_row(
                preset,
                f"{f:.0f}",
                f"{g:.0f}",
                f"{h:.0f}",
                f"{o:.0f}",
                f"{f / h:.2f}x",
                f"{live_mean:.1%} (min {live_min:.1%})",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
