"""`fastserve <stage>`: one subcommand per stage of the loop.

    fastserve data      raw text -> tokenizer + token shards
    fastserve train     token shards -> HF-format model dir (single process or torchrun DDP)
    fastserve generate  model dir + prompt -> text (KV-cached sampling, a first look)
    fastserve compress  model dir + recipe -> quantized model dir (fastserve.compress)
    fastserve eval      model dir (+ reference) + data -> perplexity, bits/byte, KLD as JSON
    fastserve demo      data (builtin:stdlib) -> train (small) -> generate, end to end
    fastserve bench serve   load-test an OpenAI-compatible server (vLLM's `bench serve` metrics)
    fastserve serve     model dir -> OpenAI-compatible HTTP server (fastserve.server)
    fastserve chat      terminal chat with a model dir or a server URL (streams tokens)

stages.py defines the subcommands that make a model, eval.py the one that measures it,
serving.py those that serve one (each a `Command`: flags + handler); this module assembles the
parser and runs the handler. Each subcommand only parses flags and calls the stage's Python
function; nothing here is imported by the stages. Heavy imports (torch, tokenizers) happen inside
the handlers so `--help` is instant.
User errors (`FastServeError`) print one red line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastserve.cli import eval as evaluation
from fastserve.cli import serving, stages
from fastserve.cli.serving import SERVE_ENGINE_DEFAULTS
from fastserve.errors import FastServeError

__all__ = ["SERVE_ENGINE_DEFAULTS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from fastserve import __version__

    parser = argparse.ArgumentParser(
        prog="fastserve",
        description="FastServe: data -> tokenizer -> train -> compress -> serve -> evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in stages.COMMANDS + evaluation.COMMANDS + serving.COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastServeError as exc:
        from rich.markup import escape

        from fastserve.utils.console import err_console

        err_console.print("[bold red]error:[/bold red]", escape(str(exc)))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
