"""`fastserve eval TARGET ...` and `fastserve eval compare A.json B.json ...`.

The first evaluates a model dir (fastserve.eval.evaluate) and prints its tables, the second
prints several results files as one table with deltas against the first. One positional list
carries both forms (argparse cannot put a subcommand beside a positional TARGET), so a model
dir named `compare` is given as `./compare`. Heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastserve.cli.command import Command

COMPARE = "compare"


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="TARGET",
        help="a model dir (dense, or compressed by `fastserve compress`); or `compare`, followed "
        "by results files. Server URLs are not supported yet.",
    )
    p.add_argument("files", nargs="*", metavar="RESULTS.json", help="with `compare`: the files")
    p.add_argument(
        "--ref",
        default=None,
        metavar="REF_DIR",
        help="reference model dir (same tokenizer): adds KL divergence, Δp, same-top-token and "
        "ln(PPL/PPL(ref)) on the same tokens (llama.cpp's --kl-divergence statistics)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE|DIR|SHARDS",
        help="text files, directories of text files, or shard dirs from `fastserve data` (their "
        "val split); repeatable",
    )
    p.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="tokens per window (default: the model's max_position_embeddings, at most 2048)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="new tokens scored per window; each has at least context-len - stride tokens of "
        "context (default: context-len / 2; = context-len: non-overlapping windows)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows per forward pass (8); memory ~ batch x context x vocab x 4 bytes",
    )
    p.add_argument("--limit", type=int, default=None, help="score at most N tokens per dataset")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: each checkpoint's)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="results.json",
        help="write the full results as JSON (atomically; nothing is written on an error)",
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from fastserve.errors import ConfigError

    if args.target == COMPARE:
        eval_only = {
            "--ref": args.ref,
            "--data": args.data,
            "--output": args.output,
            "--context-len": args.context_len,
            "--stride": args.stride,
            "--limit": args.limit,
            "--dtype": args.dtype,
        }
        given = [flag for flag, value in eval_only.items() if value not in (None, [])]
        if given:
            raise ConfigError(f"`fastserve eval compare` takes only results files, not {given[0]}.")
        return _compare(args.files)
    if args.files:
        raise ConfigError(
            f"fastserve eval takes one TARGET, got {1 + len(args.files)} "
            f"({args.target}, {', '.join(args.files)}); use --data for datasets."
        )
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give a file name.")

    from fastserve.eval import evaluate
    from fastserve.eval.results import write_results
    from fastserve.eval.tables import results_tables
    from fastserve.utils.console import console

    results = evaluate(
        args.target,
        ref=args.ref,
        data=args.data,
        context_len=args.context_len,
        stride=args.stride,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        progress=True,
    )
    for table in results_tables(results):
        console.print(table)
    if args.output:
        write_results(args.output, results)
        console.print(f"[green]wrote[/green] {args.output}")
    return 0


def _compare(files: list[str]) -> int:
    from fastserve.errors import ConfigError
    from fastserve.eval.results import load_results
    from fastserve.eval.tables import compare_table
    from fastserve.utils.console import console

    if not files:
        raise ConfigError("fastserve eval compare needs results files: compare A.json B.json ...")
    results = [load_results(f) for f in files]
    names = [Path(f).name for f in files]
    labels = names if len(set(names)) == len(names) else list(files)
    console.print(compare_table(results, labels))
    return 0


COMMANDS = [
    Command(
        "eval",
        "perplexity, bits/byte and fidelity (KLD) of a model dir; compare results files",
        "Evaluate TARGET (a model dir, dense or compressed) on --data: sliding-window perplexity "
        "and bits per byte, and with --ref the KL divergence statistics of llama.cpp's "
        "`llama-perplexity --kl-divergence` on the same tokens; prints tables and writes "
        "--output JSON. `fastserve eval compare A.json B.json ...` prints results side by side "
        "with deltas against the first. See docs/eval.md.",
        _add_eval_args,
        _cmd_eval,
    ),
]
