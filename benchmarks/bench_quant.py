"""Quantization quality, size and speed: one markdown table over the compression presets.

    python benchmarks/bench_quant.py --model runs/sh/model --data runs/sh-data
    python benchmarks/bench_quant.py --train-data runs/sh-data --train-steps 2000   # trains first
    python benchmarks/bench_quant.py --model M --data D --speed --speed-preset base
    python benchmarks/bench_quant.py --model M --data D --eval-data wiki.test.raw  # fastserve eval

Rows: fp32, bf16, w8a16, w8a8, w4a16 (RTN), w4a16-gptq, w4a16-awq, w3a16-gptq. Quality columns,
on the val split of --data (non-overlapping windows of --block-size, the first --eval-tokens
tokens), against the fp32 model on the same windows, computed by fastserve.eval:
  bytes      size of the model dir's safetensors files
  ppl        val perplexity; d ppl = relative change vs fp32
  KL mean / KL p99   per-token KL(p_fp32 || p_row) in nats (llama.cpp's statistics)
  top-1      share of positions where the row's most likely token is fp32's
  quant s    wall time of compress() (calibration on the train split of --data)
With --eval-data FILE the quality columns come instead from fastserve.eval's evaluate() on each
saved dir with ref = the fp32 dir, the numbers `fastserve eval DIR --ref FP32 --data FILE
--context-len B --stride S` prints (B = --block-size; S = --stride, default B / 2 as in
`fastserve eval`): sliding windows over the whole file or its first --eval-limit tokens; the
table adds ln(PPL ratio) +- its standard error and the KL median, p95, p99.9 and max, and each
row's results JSON is kept in the work dir (work/eval/ROW.json, for `fastserve eval compare`).
With --seeds N the calibrated rows (GPTQ, AWQ, W8A8's SmoothQuant) are compressed N times with
different calibration windows and show means; a second table gives each seed's perplexity increase
and mean KL as a share of RTN's (w4a16), since at these sizes a single perplexity change is noisy.
Speed columns (--speed): decode tokens/s at batch 1 and 16 (prefill 32 tokens, then --decode-steps
greedy steps with the KV cache), on a random-initialised model of --speed-preset (base: >= 100 MB
fp32 weights, so decode is memory-bound). The MLP width of the speed and --train-preset models is
rounded up to a multiple of 128 so the int4 groups of 128 fit. A format's speed does not depend
on how its values were chosen, so GPTQ/AWQ rows reuse the RTN model of the same scheme.
Compressed dirs keep the source dtype (fp32 activations; the int8/int4 kernels compute in bf16);
--speed-dtype bfloat16 times the quantized formats with their unquantized tensors (norms,
embeddings, the dense lm_head) in bf16, as `fastserve compress --dtype bfloat16` saves them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench_common import decode_rates, dir_bytes, round_up  # benchmarks/ is on sys.path

ROWS = ["fp32", "bf16", "w8a16", "w8a8", "w4a16", "w4a16-gptq", "w4a16-awq", "w3a16-gptq"]
SPEED_FORMAT = {"w4a16-gptq": "w4a16", "w4a16-awq": "w4a16", "w3a16-gptq": "w3a16"}


def train_model(data: str, out: Path, steps: int, preset: str) -> Path:
    from fastserve.model import ModelConfig
    from fastserve.train import train
    from fastserve.train.config import TrainConfig

    # The int4 presets use groups of 128 input columns: round the MLP width up to fit them.
    inter = round_up(ModelConfig.preset(preset).intermediate_size, 128)
    cfg = TrainConfig(
        data_dir=data,
        out_dir=str(out),
        model=preset,
        max_steps=steps,
        model_overrides={"intermediate_size": inter},
    )
    return Path(train(cfg).final_dir)


def eval_data(data: str, model_dir: Path, max_tokens: int):
    """The first max_tokens tokens of the val split of the shard dir `data` (fastserve.eval)."""
    from fastserve.data import Tokenizer
    from fastserve.eval.datasets import load_data

    return load_data(data, Tokenizer.load(model_dir), limit=max_tokens)


def quality(model, data, block_size: int, ref_model=None) -> dict:
    """Perplexity, and against ref_model KL mean / p99 and top-1 agreement (fastserve.eval)."""
    from fastserve.eval.evaluator import evaluate_loaded

    r = evaluate_loaded(model, data, block_size, block_size, batch_size=8, ref_model=ref_model)
    out = {"ppl": r["perplexity"]["ppl"]}
    if r["fidelity"] is not None:
        f = r["fidelity"]
        out.update(kl_mean=f["kld_mean"], kl_p99=f["kld_p99"], top1=f["same_top_pct"] / 100)
    return out


def file_quality(target: Path, ref: Path | None, args, save: Path | None = None) -> dict:
    """fastserve.eval.evaluate() of the model dir `target` on --eval-data against the dir `ref`
    (None: perplexity only), with the sliding windows of `fastserve eval`; `save`: the results
    JSON goes there."""
    from fastserve.eval import evaluate
    from fastserve.eval.results import write_results

    stride = args.stride or max(1, args.block_size // 2)
    r = evaluate(
        target,
        ref=ref,
        data=[args.eval_data],
        context_len=args.block_size,
        stride=stride,
        limit=args.eval_limit,
    )
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        write_results(save, r)
    d = r["datasets"][0]
    out = {"ppl": d["perplexity"]["ppl"], "num_tokens": d["num_tokens"], "stride": stride}
    f = d["fidelity"]
    if f is not None:
        out.update(
            ln_ratio=f["ln_ppl_ratio"],
            ln_ratio_se=f["ln_ppl_ratio_stderr"] or 0.0,
            kl_mean=f["kld_mean"],
            kl_median=f["kld_median"],
            kl_p95=f["kld_p95"],
            kl_p99=f["kld_p99"],
            kl_p99_9=f["kld_p99_9"],
            kl_max=f["kld_max"],
            top1=f["same_top_pct"] / 100,
        )
    return out


def decode_tok_s(model, batch: int, steps: int, vocab: int) -> float:
    # Best of 2: the first run warms kernel caches (int4 weight layout) up.
    return max(decode_rates(model, batch, steps, vocab, runs=2))


def speed_rows(
    preset: str, steps: int, root: Path, rest_dtype: torch.dtype = torch.float32
) -> dict[str, tuple[float, float]]:
    from fastserve.compress import compress_model
    from fastserve.compress.recipe import Recipe
    from fastserve.model import LlamaForCausalLM, ModelConfig

    inter = round_up(ModelConfig.preset(preset).intermediate_size, 128)  # groups of 128 fit
    config = ModelConfig.preset(preset, max_position_embeddings=512, intermediate_size=inter)
    recipes = {
        "w8a16": Recipe.preset("w8a16"),
        "w8a8": Recipe.from_dict({"modifiers": [{"type": "RTN", "bits": 8, "act_bits": 8}]}),
        "w4a16": Recipe.preset("w4a16"),
        "w3a16": Recipe.from_dict(
            {"modifiers": [{"type": "RTN", "bits": 3, "group_size": 128, "symmetric": False}]}
        ),
    }
    result = {}
    for name in ["fp32", "bf16", *recipes]:
        model = LlamaForCausalLM(config).eval()
        if name == "bf16":
            model = model.to(torch.bfloat16)
        elif name in recipes:
            compress_model(model, recipes[name], None)
            model = model.to(rest_dtype)  # norms, embeddings, lm_head; packed weights unchanged
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if name == "fp32":
            print(f"speed model: {preset}, {nbytes / 1e6:.0f} MB fp32 parameters")
        result[name] = tuple(decode_tok_s(model, b, steps, config.vocab_size) for b in (1, 16))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="fp32 model dir to compress (or --train-data)")
    p.add_argument("--data", default=None, help="shard dir: train split calibrates, val evaluates")
    p.add_argument("--train-data", default=None, help="train a model on this shard dir first")
    p.add_argument("--train-steps", type=int, default=2000, help="steps when training (2000)")
    p.add_argument("--train-preset", default="small", help="model preset when training (small)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (all)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration tokens/sample (512)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="calibration seeds per calibrated row (GPTQ, AWQ, SmoothQuant): the table shows "
        "their means, a second table each seed's perplexity change against RTN's (1)",
    )
    p.add_argument("--block-size", type=int, default=256, help="eval window tokens (256)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="val tokens evaluated (65536)")
    p.add_argument(
        "--eval-data",
        default=None,
        help="evaluate on this text file (or dir, or shard dir) with fastserve.eval's evaluate() "
        "against the fp32 dir, instead of the first --eval-tokens of --data's val split",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="--eval-data: new tokens scored per window (block-size / 2, as fastserve eval)",
    )
    p.add_argument(
        "--eval-limit", type=int, default=None, help="--eval-data: first N tokens only (all)"
    )
    p.add_argument("--speed", action="store_true", help="also measure decode tokens/s")
    p.add_argument("--speed-preset", default="base", help="random-init speed model (base)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (32)")
    p.add_argument(
        "--speed-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the unquantized tensors (norms, embeddings, lm_head) of the quantized speed "
        "models (float32)",
    )
    p.add_argument("--work-dir", default=None, help="keep compressed dirs here (default: temp)")
    args = p.parse_args()

    from fastserve.compress import compress
    from fastserve.compress.compressor import needs_calibration
    from fastserve.compress.recipe import Recipe
    from fastserve.data import Tokenizer
    from fastserve.model import load_model, save_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-quant-"))
    data = args.data or args.train_data
    if data is None:
        p.error("give --data (and --model) or --train-data")
    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        if args.train_data is None:
            p.error("give --model or --train-data")
        model_dir = train_model(
            args.train_data, work / "train", args.train_steps, args.train_preset
        )
    rows = args.rows.split(",")

    if args.eval_data is None:
        val = eval_data(data, model_dir, args.eval_tokens)
        fp32 = load_model(model_dir, dtype=torch.float32)
        ref = quality(fp32, val, args.block_size)

        def measure(out: Path, name: str) -> dict:
            return quality(load_model(out), val, args.block_size, fp32)
    else:
        ref = file_quality(model_dir, None, args, work / "eval" / "fp32.json")

        def measure(out: Path, name: str) -> dict:
            return file_quality(out, model_dir, args, work / "eval" / f"{name}.json")

    table: dict[str, dict] = {"fp32": {"bytes": dir_bytes(model_dir), **ref}}
    for row in rows:
        if row == "fp32":
            continue
        if row == "bf16":
            tok = Tokenizer.load(model_dir)  # evaluate() reads the dir's tokenizer
            save_model(load_model(model_dir, dtype=torch.bfloat16), work / "bf16", tokenizer=tok)
            out = work / "bf16"
            q = measure(out, row)
            table[row] = {"bytes": dir_bytes(out), "quant_s": None, **q}
            continue
        seq_len = min(args.seq_len, args.block_size * 2)
        seeds = range(args.seeds) if needs_calibration(Recipe.preset(row)) else range(1)
        runs = []
        for seed in seeds:
            res = compress(model_dir, row, data, work / row, args.num_samples, seq_len, seed=seed)
            q = measure(work / row, row if len(seeds) == 1 else f"{row}-seed{seed}")
            runs.append({"quant_s": res.time_s, **q})
            print(f"{row} seed {seed}: ppl {q['ppl']:.3f}, KL {q['kl_mean']:.4f}", flush=True)
        table[row] = {"bytes": dir_bytes(work / row), "runs": runs}
        table[row].update({k: statistics.mean(r[k] for r in runs) for k in runs[0]})

    rest = getattr(torch, args.speed_dtype)
    speed = speed_rows(args.speed_preset, args.decode_steps, work, rest) if args.speed else {}
    if args.eval_data is None:
        where = f"{val.num_scored} val tokens in windows of {args.block_size}"
    else:
        where = (
            f"{ref['num_tokens']} tokens of {args.eval_data} in windows of {args.block_size}, "
            f"stride {ref['stride']} (fastserve.eval evaluate(), ref = fp32)"
        )
    print(
        f"\nmodel {model_dir}, {where}, "
        f"calibration {args.num_samples} x {args.seq_len} from {data}\n"
    )
    print_table(table, rows, speed, full=args.eval_data is not None)
    ratio_rows = [r for r in rows if r.startswith("w4a16-") and "runs" in table[r]]
    if "w4a16" in table and ratio_rows:
        print_ratios(table, ratio_rows, "w4a16", table["fp32"]["ppl"])


def print_table(table: dict, rows: list[str], speed: dict, full: bool) -> None:
    """The markdown table; `full` (fastserve.eval's statistics on --eval-data) adds
    ln(PPL ratio) +- stderr and the KL median, p95, p99.9 and max."""
    kl_cols = ["KL mean", "KL p99"]
    kl_keys = ["kl_mean", "kl_p99"]
    extra = []
    if full:
        extra = ["ln(PPL ratio)"]
        kl_cols = ["KL mean", "KL median", "KL p95", "KL p99", "KL p99.9", "KL max"]
        kl_keys = ["kl_mean", "kl_median", "kl_p95", "kl_p99", "kl_p99_9", "kl_max"]
    ppl = "ppl" if full else "val ppl"
    cols = ["row", "bytes", ppl, "d ppl", *extra, *kl_cols, "top-1 %", "b1 tok/s", "b16 tok/s"]
    cols.append("quant s")
    print("| " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * (len(cols) - 1))
    base_ppl = table["fp32"]["ppl"]
    for row in ["fp32", *[r for r in rows if r != "fp32"]]:
        t = table[row]
        fmt = SPEED_FORMAT.get(row, row)
        b1, b16 = (f"{v:,.0f}" for v in speed[fmt]) if fmt in speed else ("-", "-")
        if "top1" in t:
            digits = 5 if full else 4  # the KL median of an 8-bit row is ~1e-5
            kl = [f"{t[k]:.{digits}f}" for k in kl_keys] + [f"{100 * t['top1']:.2f}"]
            ratio = [f"{t['ln_ratio']:+.5f} ± {t['ln_ratio_se']:.5f}"] if full else []
        else:
            kl = ["0"] * len(kl_keys) + ["100"]
            ratio = ["0"] if full else []
        qs = f"{t['quant_s']:.1f}" if t.get("quant_s") is not None else "-"
        d_ppl = 100 * (t["ppl"] / base_ppl - 1)
        cells = [row, f"{t['bytes']:,}", f"{t['ppl']:.3f}", f"{d_ppl:+.2f}%", *ratio, *kl]
        print("| " + " | ".join([*cells, b1, b16, qs]) + " |")


def print_ratios(table: dict, rows: list[str], rtn: str, base_ppl: float) -> None:
    """Each calibrated int4 row's perplexity increase and mean KL as a share of RTN's, per
    seed: a perplexity change this small moves with which weights happened to round which way."""
    rtn_d = table[rtn]["ppl"] / base_ppl - 1
    rtn_kl = table[rtn]["kl_mean"]
    print(f"\n| row | d ppl / {rtn}'s, per seed | mean | KL mean / {rtn}'s, per seed | mean |")
    print("| --- | --- | ---: | --- | ---: |")
    for row in rows:
        d = [(r["ppl"] / base_ppl - 1) / rtn_d for r in table[row]["runs"]]
        kl = [r["kl_mean"] / rtn_kl for r in table[row]["runs"]]
        print(
            f"| {row} | {', '.join(f'{v:.2f}' for v in d)} | {statistics.mean(d):.2f}x "
            f"| {', '.join(f'{v:.2f}' for v in kl)} | {statistics.mean(kl):.2f}x |"
        )


if __name__ == "__main__":
    main()
