"""Pruning quality, size and speed: perplexity and KL divergence against sparsity, per method.

    python benchmarks/bench_prune.py --model runs/sh/model --data runs/sh-data \\
        --model runs/std/model --data runs/std-data --owl --speed --encode --out runs/prune.json
    python benchmarks/bench_prune.py --model M --data D --sparsities 0.5,2:4 --methods wanda

Each (--model, --data) pair is a trained float32 model dir and its shard dir: the train split
calibrates, the val split evaluates. Per model, one markdown table of pruned rows, one of the
structured rows, one of the prune -> quantize -> encode rows (--encode), then the goals of the
[prune] issue computed from those numbers.

Pruned rows: every --methods (magnitude, wanda, sparsegpt) at every --sparsities (a fraction, or
an N:M pattern such as 2:4), one-shot, no recovery; --owl adds Wanda and SparseGPT with
`sparsity_profile: owl` at the unstructured sparsities (OWL needs 2 owl_lmbda <= s < 1 - 2
owl_lmbda; magnitude has no OWL). Columns:
  measured   share of exactly-zero weights over all decoder-layer linears of the saved dir
             (of a quantized row: after dequantizing, so weights rounded to 0 count too)
  ppl        val perplexity; d ppl = relative change vs fp32 (the same windows for every row)
  KL mean / KL p99   per-token KL(p_fp32 || p_row) in nats (llama.cpp's statistics)
  top-1      share of positions where the row's most likely token is fp32's
  bytes      the saved dir's safetensors (pruned float linears are stored as bitmasks)
  s          wall time of compress() (load + prune + save); data-free magnitude gets no data
Evaluation is fastserve.eval's evaluate_loaded on each saved dir as load_model reads it, with the
fp32 model as the reference: the numbers `fastserve eval DIR --ref FP32 --data SHARDS --limit N
--context-len B --stride S` prints (N = --eval-tokens, B = --block-size, S = --stride, default B:
non-overlapping windows).

Structured rows: the `struct30` preset (30% of every layer's MLP channels; KV groups only where
the kept heads still divide hidden_size) against the dense model: parameters, ppl, and with
--speed greedy decode tokens/s at batch 1 and 16 (prefill 32 tokens, then --decode-steps steps
with the KV cache; one warm-up run each, then --repeats runs alternating dense and pruned, the
median of each), both float32 with the same prompt, steps and threads. --speed-preset NAME adds
the same comparison on a random-initialised model of that preset (e.g. base: decode memory-bound).

Encode rows (--encode): the `deep-compression` preset (prune -> quantize -> encode; skipped with
a note when this checkout has no such preset), the same recipe at 0 (k-means alone)/30/40/50/60/70%
sparsity with 3- and 4-bit codebooks, and for comparison sparse50-sparsegpt (bitmask
float), SparseGPT 2:4 then GPTQ w4a16 in one recipe, and w4a16-gptq alone: bytes of the dir's
safetensors, the ratio fp32 bytes / bytes, and the quality columns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench_common import decode_rates, decoder_sparsity, dir_bytes  # benchmarks/ is on sys.path

METHODS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
OWL_METHODS = ("wanda", "sparsegpt")
DEFAULT_SPARSITIES = "0.2,0.3,0.4,0.5,0.6,0.7,2:4"
GOAL_RATIO = 1 / 3  # Wanda / SparseGPT d ppl at 50% at most a third of magnitude's
GOAL_SPEEDUP = 1.3  # struct30 decode tokens/s vs dense
GOAL_COMPRESSION = 15.0  # fp32 bytes / compressed bytes ...
GOAL_MAX_D_PPL = 0.05  # ... at a perplexity increase of at most 5%
_W4 = {"bits": 4, "group_size": 128, "symmetric": False, "group_size_fallback": True}


@dataclass
class Row:
    """One compressed model and what was measured on it."""

    name: str  # unique within a model: the work subdir
    method: str  # magnitude | wanda | sparsegpt | struct30 | an encode row's recipe
    profile: str  # uniform | owl | - (not a zeroing pruner)
    target: str  # "50%", "2:4" or "-"
    sparsity: float | None = None  # the target fraction (None: not a zeroing pruner)
    measured: float = 0.0  # zero share of the decoder linears
    ppl: float = 0.0
    d_ppl: float = 0.0  # ppl / fp32 ppl - 1
    kl_mean: float = 0.0
    kl_p99: float = 0.0
    top1: float = 0.0  # fraction, not %
    ln_ratio: float = 0.0  # ln(ppl / fp32 ppl) +- its standard error (fastserve.eval)
    ln_ratio_se: float = 0.0
    bytes: int = 0  # safetensors of the saved dir
    num_params: int = 0
    compress_s: float = 0.0


# ---- recipes -------------------------------------------------------------------------------------


def parse_target(text: str) -> float | str:
    """'0.5' -> 0.5, '2:4' -> '2:4'."""
    return text if ":" in text else float(text)


def target_label(target: float | str) -> str:
    return target if isinstance(target, str) else f"{100 * target:g}%"


def target_fraction(target: float | str) -> float:
    """The share of weights zeroed: the fraction itself, or 1 - N/M."""
    if isinstance(target, str):
        n, m = (int(x) for x in target.split(":"))
        return 1 - n / m
    return target


def prune_recipe(method: str, target: float | str, owl: bool):
    from fastserve.compress.recipe import Recipe

    mod: dict = {"type": METHODS[method]}
    if isinstance(target, str):
        mod.update(sparsity=None, mask_structure=target)
    else:
        mod["sparsity"] = target
    if owl:
        mod["sparsity_profile"] = "owl"
    return Recipe.from_dict({"modifiers": [mod]}, name=f"{method}-{target_label(target)}")


def encode_recipes() -> list[tuple[str, object]]:
    """(row name, Recipe or the reason it is skipped) for the --encode rows."""
    from fastserve.compress.recipe import Recipe
    from fastserve.errors import ConfigError

    out: list[tuple[str, object]] = []
    try:
        out.append(("deep-compression", Recipe.preset("deep-compression")))
    except ConfigError as e:
        out.append(("deep-compression", f"skipped: {e}"))
    # Deep Compression at other operating points: 15x vs fp32 needs ~2.1 bits per weight
    for sparsity, bits in ((0.0, 4), (0.3, 4), (0.4, 4), (0.5, 3), (0.6, 4), (0.6, 3), (0.7, 3)):
        mods = [{"type": "KMeans", "bits": bits, "include_embeddings": True}]
        if sparsity:
            mods.insert(0, {"type": "SparseGPT", "sparsity": sparsity})
        name = f"sparsegpt{round(sparsity * 100)}-kmeans{bits}" if sparsity else f"kmeans{bits}"
        out.append((name, Recipe.from_dict({"modifiers": mods}, name=name)))
    out.append(("sparse50-sparsegpt", Recipe.preset("sparse50-sparsegpt")))
    two_four = [
        {"type": "SparseGPT", "sparsity": 0.5, "mask_structure": "2:4"},
        {"type": "GPTQ", **_W4},
    ]
    out.append(("2of4-sparsegpt-w4a16", Recipe.from_dict({"modifiers": two_four}, name="2of4-w4")))
    out.append(("w4a16-gptq", Recipe.preset("w4a16-gptq")))
    return out


# ---- measuring -----------------------------------------------------------------------------------


class Bench:
    """One model: its fp32 reference, the val windows, and the compress -> evaluate loop."""

    def __init__(self, model_dir: Path, data: str, work: Path, args) -> None:
        from fastserve.data import Tokenizer
        from fastserve.eval.datasets import load_data
        from fastserve.eval.evaluator import evaluate_loaded
        from fastserve.model import load_model

        self.model_dir, self.data, self.work, self.args = model_dir, data, work, args
        self.stride = args.stride or args.block_size
        self.val = load_data(data, Tokenizer.load(model_dir), limit=args.eval_tokens)
        self.fp32 = load_model(model_dir, dtype=torch.float32)
        r = evaluate_loaded(self.fp32, self.val, args.block_size, self.stride)
        self.ppl = r["perplexity"]["ppl"]
        self.bytes = dir_bytes(model_dir)
        self.num_params = self.fp32.num_parameters()

    def run(self, row: Row, recipe) -> Row:
        """Compress with `recipe` into work/row.name, load the saved dir, measure it."""
        from fastserve.compress import compress
        from fastserve.compress.compressor import needs_calibration
        from fastserve.eval.evaluator import evaluate_loaded
        from fastserve.model import load_model

        a = self.args
        out = self.work / row.name
        calib = self.data if needs_calibration(recipe) else None
        res = compress(self.model_dir, recipe, calib, out, a.num_samples, a.seq_len, seed=a.seed)
        model = load_model(out)
        r = evaluate_loaded(model, self.val, a.block_size, self.stride, ref_model=self.fp32)
        f = r["fidelity"]
        row.measured = decoder_sparsity(model)
        row.ppl = r["perplexity"]["ppl"]
        row.d_ppl = row.ppl / self.ppl - 1
        row.kl_mean, row.kl_p99, row.top1 = f["kld_mean"], f["kld_p99"], f["same_top_pct"] / 100
        row.ln_ratio, row.ln_ratio_se = f["ln_ppl_ratio"], f["ln_ppl_ratio_stderr"] or 0.0
        row.bytes = dir_bytes(out)
        row.num_params = model.num_parameters()
        row.compress_s = res.time_s
        others = [
            p.name for p in out.iterdir() if p.suffix not in {".safetensors", ".json", ".yaml"}
        ]
        if others:
            print(f"note: {out} also holds {', '.join(others)} (not counted in bytes)")
        print(
            f"{row.name}: sparsity {100 * row.measured:.1f}%, ppl {row.ppl:.3f} "
            f"({100 * row.d_ppl:+.2f}%), KL {row.kl_mean:.4f}, {row.compress_s:.1f} s",
            flush=True,
        )
        return row


def speed_pair(dense, pruned, steps: int, repeats: int, vocab: int) -> dict[int, list[float]]:
    """{batch: [dense tok/s, pruned tok/s]}: medians of `repeats` alternating runs after one
    warm-up run of each."""
    out = {}
    for batch in (1, 16):
        decode_rates(dense, batch, steps, vocab, runs=1)
        decode_rates(pruned, batch, steps, vocab, runs=1)
        d, p = [], []
        for _ in range(repeats):
            d += decode_rates(dense, batch, steps, vocab, runs=1)
            p += decode_rates(pruned, batch, steps, vocab, runs=1)
        out[batch] = [statistics.median(d), statistics.median(p)]
    return out


def random_init_speed(preset: str, steps: int, repeats: int) -> tuple[int, int, dict]:
    """struct30 vs dense on a random-initialised model of `preset` (random calibration tokens:
    only the shapes matter for speed). Returns (dense params, pruned params, speed_pair)."""
    from fastserve.compress import compress_model
    from fastserve.model import LlamaForCausalLM, ModelConfig

    config = ModelConfig.preset(preset, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    pruned = LlamaForCausalLM(config).eval()
    pruned.load_state_dict(dense.state_dict())
    ids = torch.randint(0, config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    pruned = compress_model(pruned, "struct30", ids).model.eval()
    speed = speed_pair(dense, pruned, steps, repeats, config.vocab_size)
    return dense.num_parameters(), pruned.num_parameters(), speed


def bench_model(model_dir: Path, data: str, work: Path, args) -> dict:
    from fastserve.errors import ConfigError

    bench = Bench(model_dir, data, work, args)
    print(f"\n{model_dir}: {bench.num_params:,} parameters, val ppl {bench.ppl:.3f}", flush=True)
    rows: list[Row] = []
    targets = [parse_target(t) for t in args.sparsities.split(",")]
    for method in args.methods.split(","):
        profiles = ["uniform", "owl"] if args.owl and method in OWL_METHODS else ["uniform"]
        for profile in profiles:
            for t in targets:
                if profile == "owl" and isinstance(t, str):
                    continue  # OWL sets per-layer fractions; N:M fixes them
                label = target_label(t)
                name = f"{method}-{profile}-{label.replace(':', 'of').rstrip('%')}"
                try:
                    recipe = prune_recipe(method, t, profile == "owl")
                except ConfigError as e:  # e.g. OWL's range does not fit the sparsity
                    print(f"{name}: skipped: {e}", flush=True)
                    continue
                row = Row(name, method, profile, label, target_fraction(t))
                rows.append(bench.run(row, recipe))

    from fastserve.compress.recipe import Recipe

    struct = bench.run(Row("struct30", "struct30", "-", "-"), Recipe.preset("struct30"))
    speed = {}
    if args.speed:
        from fastserve.model import load_model

        pruned = load_model(work / "struct30", dtype=torch.float32)
        vocab = bench.fp32.config.vocab_size
        speed["trained"] = {
            "params": [bench.num_params, struct.num_params],
            **speed_pair(bench.fp32, pruned, args.decode_steps, args.repeats, vocab),
        }
        if args.speed_preset:
            n_dense, n_pruned, s = random_init_speed(
                args.speed_preset, args.decode_steps, args.repeats
            )
            speed[f"random-init {args.speed_preset}"] = {"params": [n_dense, n_pruned], **s}

    encode: list[Row] = []
    skipped: list[str] = []
    if args.encode:
        for name, recipe in encode_recipes():
            if isinstance(recipe, str):
                skipped.append(f"{name}: {recipe}")
                print(f"{name}: {recipe}", flush=True)
                continue
            encode.append(bench.run(Row(name, name, "-", "-"), recipe))

    result = {
        "model": str(model_dir),
        "data": data,
        "fp32": {"ppl": bench.ppl, "bytes": bench.bytes, "num_params": bench.num_params},
        "eval": {
            "threads": torch.get_num_threads(),
            "num_tokens": bench.val.num_scored,
            "block_size": args.block_size,
            "stride": bench.stride,
        },
        "rows": [asdict(r) for r in rows],
        "struct30": asdict(struct),
        "speed": {k: {str(b): v for b, v in s.items()} for k, s in speed.items()},
        "encode": [asdict(r) for r in encode],
        "encode_skipped": skipped,
    }
    result["goals"] = goals(result)
    return result


# ---- reporting -----------------------------------------------------------------------------------


def _find(rows: list[dict], method: str, profile: str, target: str) -> dict | None:
    return next(
        (r for r in rows if (r["method"], r["profile"], r["target"]) == (method, profile, target)),
        None,
    )


def goals(res: dict) -> dict:
    """The issue's goals from the measured numbers (None where a row was not run)."""
    rows = res["rows"]
    mag = _find(rows, "magnitude", "uniform", "50%")
    ratios = {}
    for method in OWL_METHODS:
        for profile in ("uniform", "owl"):
            r = _find(rows, method, profile, "50%")
            if r is None or mag is None or mag["d_ppl"] <= 0 or mag["kl_mean"] <= 0:
                continue
            ratios[f"{method}-{profile}"] = {
                "d_ppl_ratio": r["d_ppl"] / mag["d_ppl"],
                "kl_ratio": r["kl_mean"] / mag["kl_mean"],
            }
    speedups = {k: {b: s[b][1] / s[b][0] for b in ("1", "16")} for k, s in res["speed"].items()}
    fp32_bytes = res["fp32"]["bytes"]
    ok = [r for r in res["encode"] if r["d_ppl"] <= GOAL_MAX_D_PPL and r["bytes"] > 0]
    best = max(ok, key=lambda r: fp32_bytes / r["bytes"], default=None)
    seconds: dict[str, list[float]] = {}
    for r in [*rows, res["struct30"], *res["encode"]]:
        key = r["method"] if r["profile"] in ("uniform", "-") else f"{r['method']}-{r['profile']}"
        seconds.setdefault(key, []).append(r["compress_s"])
    return {
        "ratio_vs_magnitude_at_50": ratios,
        "struct30_speedup": speedups,
        "best_compression": None
        if best is None
        else {"row": best["name"], "ratio": fp32_bytes / best["bytes"], "d_ppl": best["d_ppl"]},
        "seconds_per_method": {k: statistics.mean(v) for k, v in seconds.items()},
    }


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def print_model(res: dict) -> None:
    fp = res["fp32"]
    ev = res["eval"]
    print(
        f"\n### {res['model']} ({fp['num_params']:,} parameters, {fp['bytes']:,} bytes fp32; "
        f"val ppl {fp['ppl']:.3f} on {ev['num_tokens']} tokens of {res['data']}, windows of "
        f"{ev['block_size']}, stride {ev['stride']}; {ev['threads']} torch threads)\n"
    )
    print(
        "| method | profile | target | measured | val ppl | d ppl | KL mean | KL p99 | top-1 % "
        "| bytes | s |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in res["rows"]:
        print(
            f"| {r['method']} | {r['profile']} | {r['target']} | {100 * r['measured']:.1f}% "
            f"| {r['ppl']:.3f} | {100 * r['d_ppl']:+.2f}% | {r['kl_mean']:.4f} "
            f"| {r['kl_p99']:.4f} | {100 * r['top1']:.2f} | {r['bytes']:,} "
            f"| {r['compress_s']:.1f} |"
        )

    s = res["struct30"]
    print(
        "\n| row | params | val ppl | d ppl | KL mean | top-1 % | b1 tok/s | b16 tok/s "
        "| b1 vs dense | b16 vs dense | s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    sp = res["speed"].get("trained")
    dense_speed = [f"{sp[b][0]:,.0f}" for b in ("1", "16")] if sp else ["-", "-"]
    pruned_speed = [f"{sp[b][1]:,.0f}" for b in ("1", "16")] if sp else ["-", "-"]
    ratios = [f"{sp[b][1] / sp[b][0]:.2f}x" for b in ("1", "16")] if sp else ["-", "-"]
    ones = "1.00x | 1.00x" if sp else "- | -"
    print(
        f"| dense | {fp['num_params']:,} | {fp['ppl']:.3f} | +0.00% | 0 | 100 "
        f"| {' | '.join(dense_speed)} | {ones} | - |"
    )
    print(
        f"| struct30 | {s['num_params']:,} | {s['ppl']:.3f} | {100 * s['d_ppl']:+.2f}% "
        f"| {s['kl_mean']:.4f} | {100 * s['top1']:.2f} | {' | '.join(pruned_speed)} "
        f"| {' | '.join(ratios)} | {s['compress_s']:.1f} |"
    )
    for key, sp in res["speed"].items():
        if key == "trained":
            continue
        n_dense, n_pruned = sp["params"]
        print(
            f"| {key} dense / struct30 | {n_dense:,} / {n_pruned:,} | - | - | - | - "
            f"| {sp['1'][0]:,.0f} / {sp['1'][1]:,.0f} | {sp['16'][0]:,.0f} / {sp['16'][1]:,.0f} "
            f"| {sp['1'][1] / sp['1'][0]:.2f}x | {sp['16'][1] / sp['16'][0]:.2f}x | - |"
        )

    if res["encode"] or res["encode_skipped"]:
        print(
            "\n| row | bytes | fp32 / bytes | measured | val ppl | d ppl | ln(PPL ratio) "
            "| KL mean | top-1 % | s |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(
            f"| fp32 | {fp['bytes']:,} | 1.00x | 0.0% | {fp['ppl']:.3f} | +0.00% | 0 | 0 "
            "| 100 | - |"
        )
        for r in res["encode"]:
            print(
                f"| {r['name']} | {r['bytes']:,} | {fp['bytes'] / r['bytes']:.2f}x "
                f"| {100 * r['measured']:.1f}% | {r['ppl']:.3f} | {100 * r['d_ppl']:+.2f}% "
                f"| {r['ln_ratio']:+.4f} ± {r['ln_ratio_se']:.4f} | {r['kl_mean']:.4f} "
                f"| {100 * r['top1']:.2f} | {r['compress_s']:.1f} |"
            )
        for line in res["encode_skipped"]:
            print(f"\n{line}")
    print_goals(res["goals"], bool(res["encode"]))


def print_goals(g: dict, encoded: bool) -> None:
    print("\nGoals:")
    ratios = g["ratio_vs_magnitude_at_50"]
    if ratios:
        parts = [
            f"{k} {v['d_ppl_ratio']:.2f}x ({_met(v['d_ppl_ratio'] <= GOAL_RATIO)}; KL "
            f"{v['kl_ratio']:.2f}x)"
            for k, v in ratios.items()
        ]
        print(f"- d ppl at 50% / magnitude's (goal <= {GOAL_RATIO:.2f}x): " + ", ".join(parts))
    else:
        print(
            "- d ppl at 50% / magnitude's: not measured (needs magnitude and wanda/sparsegpt 50%)"
        )
    for key, s in g["struct30_speedup"].items():
        ok = min(s.values()) >= GOAL_SPEEDUP
        print(
            f"- struct30 decode vs dense, {key}: b1 {s['1']:.2f}x, b16 {s['16']:.2f}x "
            f"(goal >= {GOAL_SPEEDUP}x: {_met(ok)})"
        )
    if not g["struct30_speedup"]:
        print("- struct30 decode speed: not measured (--speed)")
    b = g["best_compression"]
    if not encoded:
        print("- compression: not measured (--encode)")
    elif b is None:
        print(f"- compression at d ppl <= {100 * GOAL_MAX_D_PPL:.0f}%: no encode row qualifies")
    else:
        print(
            f"- best compression at d ppl <= {100 * GOAL_MAX_D_PPL:.0f}%: {b['row']} "
            f"{b['ratio']:.2f}x ({100 * b['d_ppl']:+.2f}%; goal >= {GOAL_COMPRESSION:.0f}x: "
            f"{_met(b['ratio'] >= GOAL_COMPRESSION)})"
        )
    secs = ", ".join(f"{k} {v:.1f}" for k, v in g["seconds_per_method"].items())
    print(f"- seconds per compress() (mean over rows): {secs}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="fp32 model dir (repeatable)")
    p.add_argument("--data", action="append", required=True, help="its shard dir (one per model)")
    p.add_argument("--sparsities", default=DEFAULT_SPARSITIES, help=f"({DEFAULT_SPARSITIES})")
    p.add_argument("--methods", default=",".join(METHODS), help="(magnitude,wanda,sparsegpt)")
    p.add_argument("--owl", action="store_true", help="add OWL rows for wanda and sparsegpt")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration tokens/sample (512)")
    p.add_argument("--seed", type=int, default=0, help="calibration windows seed (0)")
    p.add_argument("--block-size", type=int, default=256, help="eval window tokens (256)")
    p.add_argument("--stride", type=int, default=None, help="eval stride (block-size)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="val tokens evaluated (65536)")
    p.add_argument("--speed", action="store_true", help="struct30 vs dense decode tokens/s")
    p.add_argument("--speed-preset", default=None, help="also on a random-init preset (none)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per speed (5; median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    p.add_argument("--encode", action="store_true", help="prune -> quantize -> encode rows")
    p.add_argument("--work-dir", default=None, help="keep compressed dirs here (default: temp)")
    p.add_argument("--out", default=None, help="write all numbers to this JSON file")
    args = p.parse_args()
    if len(args.model) != len(args.data):
        p.error("give one --data per --model")
    for m in args.methods.split(","):
        if m not in METHODS:
            p.error(f"unknown method {m!r}; use {', '.join(METHODS)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-prune-"))
    start = time.perf_counter()
    results = []
    for i, (model, data) in enumerate(zip(args.model, args.data)):
        model_dir = Path(model)
        tag = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        results.append(bench_model(model_dir, data, work / f"{i}-{tag}", args))
        print_model(results[-1])  # each model's tables as soon as they are measured
        if args.out:
            text = json.dumps({"settings": vars(args), "models": results}, indent=2)
            Path(args.out).write_text(text, encoding="utf-8")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; compressed dirs in {work}")


if __name__ == "__main__":
    main()
