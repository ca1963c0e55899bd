"""`fastserve data | train | generate | compress | demo`: the stages that make a model.

Each `_add_*_args` defines one subcommand's flags, each `_cmd_*` calls the stage's Python function
with them; `COMMANDS` lists them for `fastserve.cli.build_parser`. Heavy imports happen inside
the handlers so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from fastserve.cli.command import Command


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files, directories (recursive), .jsonl files, 'builtin:stdlib' (the running "
        "Python's standard library, ~11 MB of .py files) or 'hf:NAME' (needs the datasets "
        "package and network). Default: builtin:stdlib.",
    )
    p.add_argument("--out", required=True, help="output directory for shards, meta.json, tokenizer")
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size to train (default 4096)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="reuse this tokenizer (a tokenizer.json file or a model/shards dir holding one) "
        "instead of training a new one",
    )
    p.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="GLOB",
        help="only read files in input directories matching this glob (repeatable, e.g. "
        "--include '*.py' --include '*.md'); default: every file",
    )
    p.add_argument(
        "--text-field", default="text", help="JSON key holding the text in .jsonl inputs"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction held out for validation (0.1)"
    )
    p.add_argument(
        "--split",
        choices=["docs", "tail"],
        default="docs",
        help="'docs': whole documents go to train or val (seeded shuffle); 'tail': the last "
        "fraction of every document goes to val (nanoGPT's split of a single file)",
    )
    p.add_argument(
        "--max-bytes", type=int, default=None, help="stop reading after this many bytes of text"
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (1337)")


def _cmd_data(args: argparse.Namespace) -> int:
    from fastserve.data import format_report, prepare_data
    from fastserve.utils.console import console

    meta = prepare_data(
        args.inputs or ["builtin:stdlib"],
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_path=args.tokenizer,
        include=args.include,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        split=args.split,
        seed=args.seed,
        max_bytes=args.max_bytes,
        progress=True,
    )
    console.print(format_report(meta))
    console.print(f"[green]wrote[/green] {args.out}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--data-dir style), its help from the field's comment."""
    from fastserve.train.config import TrainConfig, field_help

    helps = field_help(TrainConfig)
    short = {"data_dir": "--data", "out_dir": "--out"}
    for f in dataclasses.fields(TrainConfig):
        flag = short.get(f.name, "--" + f.name.replace("_", "-"))
        names = (
            [flag]
            if flag == "--" + f.name.replace("_", "-")
            else [flag, "--" + f.name.replace("_", "-")]
        )
        help_text = helps.get(f.name, "")
        if f.name == "model_overrides":
            p.add_argument(
                "--set",
                dest="model_overrides",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="Model config override, e.g. --set num_hidden_layers=6 --set "
                "rope_theta=500000 (HF config field names; JSON values). Repeatable.",
            )
            continue
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        kind = {
            "int": int,
            "float": float,
            "str": str,
            "float | None": float,
            "int | None": int,
        }.get(str(f.type), str)
        required = default is dataclasses.MISSING
        p.add_argument(
            *names,
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else default,
            help=help_text + ("" if required else f" (default: {default})"),
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from fastserve.model.config import parse_overrides
    from fastserve.train import train
    from fastserve.train.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["model_overrides"] = parse_overrides(args.model_overrides)
    result = train(TrainConfig(**values))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        from fastserve.utils.console import console

        console.print(f"[green]model[/green] {result.final_dir} ({result.stop_reason})")
    return 0


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF-format model directory (with tokenizer)")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, starts from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (128)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (0.8)"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: the checkpoint's)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from fastserve.data.tokenizer import Tokenizer
    from fastserve.generate import generate_output
    from fastserve.model import load_model
    from fastserve.utils.console import console, err_console

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, device=args.device, dtype=dtype)
    tokenizer = Tokenizer.load(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:  # an empty prompt starts from BOS (or EOS, the document separator)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        prompt_ids = [start if start is not None else tokenizer.eos_token_id]
    out = generate_output(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        seed=args.seed,
    )
    console.print(args.prompt, style="bold", end="", markup=False)
    console.print(tokenizer.decode(out.token_ids), markup=False)
    if out.finish_reason != "length":
        err_console.print(f"[dim]{out.message}[/dim]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastserve.demo import run_demo

    run_demo(
        args.out,
        train_seconds=args.train_seconds,
        device=args.device,
        model=args.model,
        max_bytes=args.max_bytes,
    )
    return 0


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="working directory (runs/demo)")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=240.0,
        help="wall-clock training budget in seconds (240)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--model", default="small", help="model preset or config JSON (small)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="read at most this many bytes of the corpus (default: all ~12 MB)",
    )


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-format model directory to compress")
    p.add_argument(
        "--recipe",
        required=True,
        metavar="RECIPE|PRESET",
        help="a YAML recipe file or a preset: w8a16, w4a16, w4a16-gptq, w4a16-awq, w3a16-gptq, "
        "w8a8; pruning: sparse50-wanda, sparse50-sparsegpt, 2of4-sparsegpt, struct30 (a smaller "
        "dense model); deep-compression (SparseGPT 50%% + 4-bit k-means weight sharing + entropy "
        "coding, decoded at load); see docs/compress.md",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="DATA",
        help="calibration data: a shard dir from `fastserve data`, a text file or directory, "
        "a .jsonl file or 'builtin:stdlib' (default: none, allowed only for data-free recipes: "
        "RTN, Magnitude)",
    )
    p.add_argument("--out", required=True, help="output directory for the compressed model dir")
    p.add_argument(
        "--num-samples", type=int, default=128, help="calibration samples (default: 128)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per calibration sample, capped at the model's context (default: 512)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (0)")
    p.add_argument(
        "--device", default="cpu", help="device the layers are calibrated on (default: cpu)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="float dtype of the saved model (default: the source checkpoint's)",
    )


def _cmd_compress(args: argparse.Namespace) -> int:
    from fastserve.compress import compress
    from fastserve.utils.console import console

    result = compress(
        args.model_dir,
        args.recipe,
        args.calib,
        args.out,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        progress=True,
    )
    size = sum(f.stat().st_size for f in result.out_dir.iterdir() if f.suffix == ".safetensors")
    errors = result.layer_errors
    worst = f", worst layer output error {max(errors):.2e}" if errors else ""
    if result.structure:  # structured pruning: a smaller dense model
        before, after = result.structure["num_parameters"]
        widths = ", ".join(f"{k} {v}" for k, v in result.structure["pruned"].items())
        worst += f", {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters ({widths})"
    console.print(
        f"[green]wrote[/green] {result.out_dir} (recipe {result.recipe.name}, "
        f"{size / 2**20:.1f} MiB of weights, {result.time_s:.1f} s{worst})"
    )
    return 0


COMMANDS = [
    Command(
        "data",
        "clean text, train a BPE tokenizer, write token shards",
        "Read, clean, dedupe and split a corpus, train (or reuse) a byte-level BPE tokenizer, and "
        "write uint16/uint32 token shards plus meta.json into --out.",
        _add_data_args,
        _cmd_data,
    ),
    Command(
        "train",
        "train a Llama-family model on token shards (torchrun for DDP)",
        "Train a model on shards written by `fastserve data`. Writes metrics.jsonl, run.json, "
        "checkpoints/step_N/ and the final HF-format model dir OUT/model. Multi-process: "
        "torchrun --nproc_per_node N -m fastserve train ...",
        _add_train_args,
        _cmd_train,
    ),
    Command(
        "generate",
        "sample text from a model dir (KV cache)",
        "Generate a continuation of --prompt with a FastServe or HF Llama-family dir.",
        _add_generate_args,
        _cmd_generate,
    ),
    Command(
        "compress",
        "quantize, prune or deep-compress a model dir by recipe or preset",
        "Compress MODEL_DIR with a recipe (YAML) or preset, calibrating layer by layer on --calib, "
        "and write a model dir that `generate` and the engine serve.",
        _add_compress_args,
        _cmd_compress,
    ),
    Command(
        "demo",
        "the main job: data (builtin:stdlib) -> train (small) -> generate",
        "End to end on the built-in corpus (no download): tokenizer + shards from the Python "
        "standard library, a few minutes of training of the 'small' preset, then a sample.",
        _add_demo_args,
        _cmd_demo,
    ),
]
